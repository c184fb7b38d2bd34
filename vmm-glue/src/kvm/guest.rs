//! The guest program Ferry runs on KVM, and the memory layout it expects.
//!
//! A stock Linux kernel does not boot on this machine's KVM (it is PVM-based), so the guest is a
//! small 64-bit program, hand-assembled below. The VMM puts the vCPU straight into long mode
//! (CR0.PG, CR4.PAE, EFER.LME/LMA, a 64-bit code segment) with identity-mapped page tables it
//! writes itself, so the guest has no mode-switching code: it starts at [`CODE`] already in
//! 64-bit mode, with interrupts off and no IDT (an exception would be a triple fault, which the
//! VMM reports as a fatal exit).
//!
//! By default the program runs at CPL 3 (user-mode segments, RFLAGS.IOPL = 3 so that `OUT` is
//! allowed, user-accessible page tables). On this machine's PVM-based KVM, guest code at CPL 0
//! is emulated instruction by instruction (measured: about 2 µs per instruction; a 4 MiB working
//! set rewritten 4 times a second), while CPL 3 code runs natively (measured: a 64 MiB working
//! set rewritten 217 times a second, 13.9 GB/s, without dirty logging). On a VMX/SVM host both
//! run natively; [`crate::kvm::GuestConfig::user_mode`] chooses.
//!
//! With dirty logging on, each page's first write after a `KVM_GET_DIRTY_LOG` takes a
//! write-protection fault, which costs about 20 µs on PVM: a guest rewriting 64 MiB then dirties
//! about 50,000 pages (200 MiB) a second, whatever its own speed.
//!
//! # What the guest does
//! It rewrites a working set of `ws_pages` pages starting at `ws_base`, forever, one *pass* after
//! another. Pass `g` (1, 2, ...) writes, every `stride` bytes of every page, the 64-bit value
//!
//! ```text
//!     stamp(addr, g) = addr XOR (g * K)        K = 0x9E3779B97F4A7C15 (odd, so invertible)
//! ```
//!
//! Before overwriting a word it checks that the word holds `stamp(addr, g - 1)`, what the previous
//! pass wrote there (pass 1 checks nothing: memory starts zeroed). A page that a migration lost
//! (zero), delivered stale (an older generation), delivered to the wrong address (wrong `addr`
//! part) or tore (some words new, some old) fails the check. Each failing word is reported
//! through ports [`PORT_ERR_ADDR_LO`]..[`PORT_ERR_VAL_HI`] (address, then the value found) and
//! counted at [`P_ERRORS`]; the guest then writes the right stamp and goes on.
//!
//! The guest keeps a pass counter (in r14) and a running checksum (in r13): the wrapping sum of
//! every value it has written. Both are deterministic functions of the parameters and the pass
//! number ([`expected_checksum`]), so a test can check them. At the end of each pass it stores
//! them in the parameter block and reports them through four 32-bit `OUT`s
//! ([`PORT_COUNT_LO`], [`PORT_COUNT_HI`], [`PORT_SUM_LO`], [`PORT_SUM_HI`]); the VMM latches the
//! halves and records a report on the last one.
//!
//! # Disk
//! With a disk ([`P_DISK_SLOTS`] non-zero), after each report the guest does one request on the
//! block device ([`super::block`]) over disk 0: pass `g` reads request slot `(g - 1) % slots`
//! ([`P_DISK_COUNT`] sectors at sector `slot * count`) into its buffer at [`P_DISK_BUF`],
//! checks that every word holds [`super::block::disk_stamp`]`(offset, g - slots)`, what the
//! last write of that slot put there (zeros before the first), fills the buffer with the stamps
//! of generation `g` and writes it back (reusing the request registers of the read, so they must
//! survive a migration between the two). A word found wrong is reported through ports
//! [`super::block::PORT_DERR_OFF_LO`]..[`super::block::PORT_DERR_VAL_HI`] and counted at
//! [`P_DISK_ERRORS`]; a request whose status is not OK is counted at [`P_DISK_IO_ERRORS`];
//! after a write succeeds the guest publishes `g` at [`P_DISK_GEN`]. So a block that a storage
//! move lost, delivered stale or put at the wrong offset fails the guest's check `slots` passes
//! after it was written, and [`super::block::check_guest_disk`] checks the whole file from the
//! host.
//!
//! The pace is `delay` iterations of `PAUSE` after each page; the guest rereads `delay` from the
//! parameter block at every pass, so the VMM can change it while the guest runs. `ws_base`,
//! `ws_pages` and `stride` are read once at start (they live in registers from then on).
//!
//! # Guest-physical layout
//! | GPA | what |
//! |---|---|
//! | 0x1000 | PML4 (one entry) |
//! | 0x2000 | PDPT (one entry per GiB) |
//! | 0x3000..0x7000 | page directories: 2 MiB pages identity-mapping guest memory (up to 4 GiB) |
//! | 0x7000 | GDT: null, code (0x08), data (0x10), user code (0x18), user data (0x20) |
//! | 0x8000 | parameter block ([`P_MAGIC`]..[`P_ERRORS`]) |
//! | 0x9000 | code ([`PROGRAM`]) |
//! | 0x20000 | disk buffer ([`DISK_BUF`], up to 128 KiB) |
//! | `ws_base` (default 1 MiB).. | working set |
//!
//! The program's source is `guest.S` beside this file (GNU as, Intel syntax); [`PROGRAM`] is
//! its assembled bytes, listed with their disassembly, and a test checks that they match where
//! binutils is installed.

use ferry_transport::wire::PAGE_SIZE;

/// GPA of the PML4.
pub const PML4: u64 = 0x1000;
/// GPA of the PDPT.
pub const PDPT: u64 = 0x2000;
/// GPA of the first page directory.
pub const PD: u64 = 0x3000;
/// Page directories available: the identity map covers at most this many GiB.
pub const MAX_PDS: u64 = 4;
/// GPA of the GDT.
pub const GDT: u64 = 0x7000;
/// GPA of the parameter block.
pub const PARAMS: u64 = 0x8000;
/// GPA where the program is loaded and starts.
pub const CODE: u64 = 0x9000;
/// Lowest GPA a working set may start at.
pub const WS_MIN: u64 = 0x10_0000;
/// GPA of the guest's disk buffer.
pub const DISK_BUF: u64 = 0x2_0000;

/// Parameter block: magic ("FERRYGST" little-endian).
pub const P_MAGIC: u64 = 0x00;
/// Parameter block: working-set base GPA (read once at start).
pub const P_WS_BASE: u64 = 0x08;
/// Parameter block: working-set pages (read once at start).
pub const P_WS_PAGES: u64 = 0x10;
/// Parameter block: bytes between stamped words in a page (8..=4096, multiple of 8; read once).
pub const P_STRIDE: u64 = 0x18;
/// Parameter block: PAUSE iterations after each page (reread every pass).
pub const P_DELAY: u64 = 0x20;
/// Parameter block: passes completed (written by the guest).
pub const P_PASSES: u64 = 0x28;
/// Parameter block: running checksum (written by the guest).
pub const P_CHECKSUM: u64 = 0x30;
/// Parameter block: words that failed verification (written by the guest).
pub const P_ERRORS: u64 = 0x38;
/// Parameter block: GPA of the disk buffer (read every pass).
pub const P_DISK_BUF: u64 = 0x40;
/// Parameter block: disk request slots (0 = no disk I/O; read every pass).
pub const P_DISK_SLOTS: u64 = 0x48;
/// Parameter block: sectors per disk request (read every pass).
pub const P_DISK_COUNT: u64 = 0x50;
/// Parameter block: disk words that failed verification (written by the guest).
pub const P_DISK_ERRORS: u64 = 0x58;
/// Parameter block: the last generation written to the disk (written by the guest).
pub const P_DISK_GEN: u64 = 0x60;
/// Parameter block: disk requests whose status was not OK (written by the guest).
pub const P_DISK_IO_ERRORS: u64 = 0x68;
/// Magic value at [`P_MAGIC`].
pub const MAGIC: u64 = u64::from_le_bytes(*b"FERRYGST");

/// Port: pass counter, low 32 bits.
pub const PORT_COUNT_LO: u16 = 0xE0;
/// Port: pass counter, high 32 bits.
pub const PORT_COUNT_HI: u16 = 0xE4;
/// Port: checksum, low 32 bits.
pub const PORT_SUM_LO: u16 = 0xE8;
/// Port: checksum, high 32 bits (completes a report).
pub const PORT_SUM_HI: u16 = 0xEC;
/// Port: address of a word that failed verification, low 32 bits.
pub const PORT_ERR_ADDR_LO: u16 = 0xF0;
/// Port: that address, high 32 bits.
pub const PORT_ERR_ADDR_HI: u16 = 0xF4;
/// Port: value found there, low 32 bits.
pub const PORT_ERR_VAL_LO: u16 = 0xF8;
/// Port: value found, high 32 bits (completes an error record).
pub const PORT_ERR_VAL_HI: u16 = 0xFC;

/// Multiplier of the generation stamp.
pub const K: u64 = 0x9E37_79B9_7F4A_7C15;
/// `K`'s inverse modulo 2^64: `found ^ addr` times this gives the generation found.
pub const K_INV: u64 = 0xF1DE_83E1_9937_733D;

/// The value pass `gen` writes at `addr`.
pub fn stamp(addr: u64, gen: u64) -> u64 {
    addr ^ gen.wrapping_mul(K)
}

/// Which generation a word found at `addr` holds (meaningful when it is a stamp).
pub fn generation_of(addr: u64, found: u64) -> u64 {
    (found ^ addr).wrapping_mul(K_INV)
}

/// The checksum the guest reports after `passes` passes.
pub fn expected_checksum(ws_base: u64, ws_pages: u64, stride: u64, passes: u64) -> u64 {
    let mut sum = 0u64;
    for g in 1..=passes {
        for p in 0..ws_pages {
            let page = ws_base + p * PAGE_SIZE as u64;
            let mut off = 0;
            while off < PAGE_SIZE as u64 {
                sum = sum.wrapping_add(stamp(page + off, g));
                off += stride;
            }
        }
    }
    sum
}

/// The guest program (loaded at [`CODE`]), assembled from `guest.S`. Registers: r15 parameter
/// block, r14 passes done, r13 checksum, r8 ws_base, r9 stride, r10 delay, r11 previous stamp
/// multiplier (`passes * K`), r12 this pass's (`(passes + 1) * K`), rbx current page, rcx pages
/// left, rsi offset in page, rdi word address, rax/rdx/rbp scratch; in the disk step rsi is the
/// first sector, rbx the sectors, rbp the bytes, r10 the disk offset, rdi the buffer, rcx the
/// offset in it, r11/r12 the old and new generation times K. No stack, no memory but the
/// parameter block, the disk buffer and the working set.
#[rustfmt::skip]
pub const PROGRAM: &[u8] = &[
    // start:
    0x41, 0xbf, 0x00, 0x80, 0x00, 0x00,            // 0x000 mov r15d,0x8000
    0x4d, 0x8b, 0x77, 0x28,                        // 0x006 mov r14,[r15+0x28]
    0x4d, 0x8b, 0x6f, 0x30,                        // 0x00a mov r13,[r15+0x30]
    0x4d, 0x8b, 0x47, 0x08,                        // 0x00e mov r8,[r15+0x8]
    0x4d, 0x8b, 0x4f, 0x18,                        // 0x012 mov r9,[r15+0x18]
    // pass:
    0x4d, 0x8b, 0x57, 0x20,                        // 0x016 mov r10,[r15+0x20]
    0x48, 0xb8, 0x15, 0x7c, 0x4a, 0x7f, 0xb9, 0x79, 0x37, 0x9e, // 0x01a movabs rax,0x9e3779b97f4a7c15
    0x4d, 0x89, 0xf3,                              // 0x024 mov r11,r14
    0x4c, 0x0f, 0xaf, 0xd8,                        // 0x027 imul r11,rax
    0x4d, 0x8d, 0x24, 0x03,                        // 0x02b lea r12,[r11+rax*1]
    0x4c, 0x89, 0xc3,                              // 0x02f mov rbx,r8
    0x49, 0x8b, 0x4f, 0x10,                        // 0x032 mov rcx,[r15+0x10]
    // page:
    0x31, 0xf6,                                    // 0x036 xor esi,esi
    // wloop:
    0x48, 0x8d, 0x3c, 0x33,                        // 0x038 lea rdi,[rbx+rsi*1]
    0x4d, 0x85, 0xf6,                              // 0x03c test r14,r14
    0x74, 0x0f,                                    // 0x03f je 50 <write>
    0x48, 0x89, 0xf8,                              // 0x041 mov rax,rdi
    0x4c, 0x31, 0xd8,                              // 0x044 xor rax,r11
    0x48, 0x39, 0x07,                              // 0x047 cmp [rdi],rax
    0x0f, 0x85, 0x79, 0x01, 0x00, 0x00,            // 0x04a jne 1c9 <bad>
    // write:
    0x48, 0x89, 0xf8,                              // 0x050 mov rax,rdi
    0x4c, 0x31, 0xe0,                              // 0x053 xor rax,r12
    0x48, 0x89, 0x07,                              // 0x056 mov [rdi],rax
    0x49, 0x01, 0xc5,                              // 0x059 add r13,rax
    0x4c, 0x01, 0xce,                              // 0x05c add rsi,r9
    0x48, 0x81, 0xfe, 0x00, 0x10, 0x00, 0x00,      // 0x05f cmp rsi,0x1000
    0x72, 0xd0,                                    // 0x066 jb 38 <wloop>
    0x4c, 0x89, 0xd0,                              // 0x068 mov rax,r10
    // delay:
    0x48, 0x85, 0xc0,                              // 0x06b test rax,rax
    0x74, 0x07,                                    // 0x06e je 77 <next>
    0xf3, 0x90,                                    // 0x070 pause
    0x48, 0xff, 0xc8,                              // 0x072 dec rax
    0xeb, 0xf4,                                    // 0x075 jmp 6b <delay>
    // next:
    0x48, 0x81, 0xc3, 0x00, 0x10, 0x00, 0x00,      // 0x077 add rbx,0x1000
    0x48, 0xff, 0xc9,                              // 0x07e dec rcx
    0x75, 0xb3,                                    // 0x081 jne 36 <page>
    0x49, 0xff, 0xc6,                              // 0x083 inc r14
    0x4d, 0x89, 0x77, 0x28,                        // 0x086 mov [r15+0x28],r14
    0x4d, 0x89, 0x6f, 0x30,                        // 0x08a mov [r15+0x30],r13
    0xba, 0xe0, 0x00, 0x00, 0x00,                  // 0x08e mov edx,0xe0
    0x44, 0x89, 0xf0,                              // 0x093 mov eax,r14d
    0xef,                                          // 0x096 out dx,eax
    0xba, 0xe4, 0x00, 0x00, 0x00,                  // 0x097 mov edx,0xe4
    0x4c, 0x89, 0xf0,                              // 0x09c mov rax,r14
    0x48, 0xc1, 0xe8, 0x20,                        // 0x09f shr rax,0x20
    0xef,                                          // 0x0a3 out dx,eax
    0xba, 0xe8, 0x00, 0x00, 0x00,                  // 0x0a4 mov edx,0xe8
    0x44, 0x89, 0xe8,                              // 0x0a9 mov eax,r13d
    0xef,                                          // 0x0ac out dx,eax
    0xba, 0xec, 0x00, 0x00, 0x00,                  // 0x0ad mov edx,0xec
    0x4c, 0x89, 0xe8,                              // 0x0b2 mov rax,r13
    0x48, 0xc1, 0xe8, 0x20,                        // 0x0b5 shr rax,0x20
    0xef,                                          // 0x0b9 out dx,eax
    // disk:
    0x49, 0x8b, 0x4f, 0x48,                        // 0x0ba mov rcx,[r15+0x48]
    0x48, 0x85, 0xc9,                              // 0x0be test rcx,rcx
    0x0f, 0x84, 0x4f, 0xff, 0xff, 0xff,            // 0x0c1 je 16 <pass>
    0x49, 0x8d, 0x46, 0xff,                        // 0x0c7 lea rax,[r14-0x1]
    0x31, 0xd2,                                    // 0x0cb xor edx,edx
    0x48, 0xf7, 0xf1,                              // 0x0cd div rcx
    0x49, 0x8b, 0x5f, 0x50,                        // 0x0d0 mov rbx,[r15+0x50]
    0x48, 0x0f, 0xaf, 0xd3,                        // 0x0d4 imul rdx,rbx
    0x48, 0x89, 0xd6,                              // 0x0d8 mov rsi,rdx
    0x31, 0xc0,                                    // 0x0db xor eax,eax
    0x4d, 0x89, 0xf4,                              // 0x0dd mov r12,r14
    0x49, 0x29, 0xcc,                              // 0x0e0 sub r12,rcx
    0x4c, 0x0f, 0x42, 0xe0,                        // 0x0e3 cmovb r12,rax
    0x48, 0xb8, 0x15, 0x7c, 0x4a, 0x7f, 0xb9, 0x79, 0x37, 0x9e, // 0x0e7 movabs rax,0x9e3779b97f4a7c15
    0x4d, 0x89, 0xe3,                              // 0x0f1 mov r11,r12
    0x4c, 0x0f, 0xaf, 0xd8,                        // 0x0f4 imul r11,rax
    0x4d, 0x89, 0xf4,                              // 0x0f8 mov r12,r14
    0x4c, 0x0f, 0xaf, 0xe0,                        // 0x0fb imul r12,rax
    0x48, 0x89, 0xdd,                              // 0x0ff mov rbp,rbx
    0x48, 0xc1, 0xe5, 0x09,                        // 0x102 shl rbp,0x9
    0x49, 0x89, 0xf2,                              // 0x106 mov r10,rsi
    0x49, 0xc1, 0xe2, 0x09,                        // 0x109 shl r10,0x9
    0x49, 0x8b, 0x7f, 0x40,                        // 0x10d mov rdi,[r15+0x40]
    0xba, 0x00, 0x01, 0x00, 0x00,                  // 0x111 mov edx,0x100
    0x89, 0xf0,                                    // 0x116 mov eax,esi
    0xef,                                          // 0x118 out dx,eax
    0xba, 0x04, 0x01, 0x00, 0x00,                  // 0x119 mov edx,0x104
    0x48, 0x89, 0xf0,                              // 0x11e mov rax,rsi
    0x48, 0xc1, 0xe8, 0x20,                        // 0x121 shr rax,0x20
    0xef,                                          // 0x125 out dx,eax
    0xba, 0x08, 0x01, 0x00, 0x00,                  // 0x126 mov edx,0x108
    0x89, 0xd8,                                    // 0x12b mov eax,ebx
    0xef,                                          // 0x12d out dx,eax
    0xba, 0x0c, 0x01, 0x00, 0x00,                  // 0x12e mov edx,0x10c
    0x89, 0xf8,                                    // 0x133 mov eax,edi
    0xef,                                          // 0x135 out dx,eax
    0xba, 0x10, 0x01, 0x00, 0x00,                  // 0x136 mov edx,0x110
    0x48, 0x89, 0xf8,                              // 0x13b mov rax,rdi
    0x48, 0xc1, 0xe8, 0x20,                        // 0x13e shr rax,0x20
    0xef,                                          // 0x142 out dx,eax
    0xba, 0x18, 0x01, 0x00, 0x00,                  // 0x143 mov edx,0x118
    0xb8, 0x01, 0x00, 0x00, 0x00,                  // 0x148 mov eax,0x1
    0xef,                                          // 0x14d out dx,eax
    0xba, 0x1c, 0x01, 0x00, 0x00,                  // 0x14e mov edx,0x11c
    0xed,                                          // 0x153 in eax,dx
    0x85, 0xc0,                                    // 0x154 test eax,eax
    0x75, 0x62,                                    // 0x156 jne 1ba <rerr>
    0x31, 0xc9,                                    // 0x158 xor ecx,ecx
    // vloop:
    0x49, 0x8d, 0x04, 0x0a,                        // 0x15a lea rax,[r10+rcx*1]
    0x48, 0x8d, 0x04, 0x45, 0x01, 0x00, 0x00, 0x00, // 0x15e lea rax,[rax*2+0x1]
    0x49, 0x0f, 0xaf, 0xc3,                        // 0x166 imul rax,r11
    0x48, 0x39, 0x04, 0x0f,                        // 0x16a cmp [rdi+rcx*1],rax
    0x0f, 0x85, 0x8b, 0x00, 0x00, 0x00,            // 0x16e jne 1ff <dbad>
    // vnext:
    0x48, 0x83, 0xc1, 0x08,                        // 0x174 add rcx,0x8
    0x48, 0x39, 0xe9,                              // 0x178 cmp rcx,rbp
    0x72, 0xdd,                                    // 0x17b jb 15a <vloop>
    // fill:
    0x31, 0xc9,                                    // 0x17d xor ecx,ecx
    // floop:
    0x49, 0x8d, 0x04, 0x0a,                        // 0x17f lea rax,[r10+rcx*1]
    0x48, 0x8d, 0x04, 0x45, 0x01, 0x00, 0x00, 0x00, // 0x183 lea rax,[rax*2+0x1]
    0x49, 0x0f, 0xaf, 0xc4,                        // 0x18b imul rax,r12
    0x48, 0x89, 0x04, 0x0f,                        // 0x18f mov [rdi+rcx*1],rax
    0x48, 0x83, 0xc1, 0x08,                        // 0x193 add rcx,0x8
    0x48, 0x39, 0xe9,                              // 0x197 cmp rcx,rbp
    0x72, 0xe3,                                    // 0x19a jb 17f <floop>
    0xba, 0x18, 0x01, 0x00, 0x00,                  // 0x19c mov edx,0x118
    0xb8, 0x02, 0x00, 0x00, 0x00,                  // 0x1a1 mov eax,0x2
    0xef,                                          // 0x1a6 out dx,eax
    0xba, 0x1c, 0x01, 0x00, 0x00,                  // 0x1a7 mov edx,0x11c
    0xed,                                          // 0x1ac in eax,dx
    0x85, 0xc0,                                    // 0x1ad test eax,eax
    0x75, 0x0f,                                    // 0x1af jne 1c0 <werr>
    0x4d, 0x89, 0x77, 0x60,                        // 0x1b1 mov [r15+0x60],r14
    0xe9, 0x5c, 0xfe, 0xff, 0xff,                  // 0x1b5 jmp 16 <pass>
    // rerr:
    0x49, 0xff, 0x47, 0x68,                        // 0x1ba inc [r15+0x68]
    0xeb, 0xbd,                                    // 0x1be jmp 17d <fill>
    // werr:
    0x49, 0xff, 0x47, 0x68,                        // 0x1c0 inc [r15+0x68]
    0xe9, 0x4d, 0xfe, 0xff, 0xff,                  // 0x1c4 jmp 16 <pass>
    // bad:
    0x48, 0x8b, 0x2f,                              // 0x1c9 mov rbp,[rdi]
    0x49, 0xff, 0x47, 0x38,                        // 0x1cc inc [r15+0x38]
    0xba, 0xf0, 0x00, 0x00, 0x00,                  // 0x1d0 mov edx,0xf0
    0x89, 0xf8,                                    // 0x1d5 mov eax,edi
    0xef,                                          // 0x1d7 out dx,eax
    0xba, 0xf4, 0x00, 0x00, 0x00,                  // 0x1d8 mov edx,0xf4
    0x48, 0x89, 0xf8,                              // 0x1dd mov rax,rdi
    0x48, 0xc1, 0xe8, 0x20,                        // 0x1e0 shr rax,0x20
    0xef,                                          // 0x1e4 out dx,eax
    0xba, 0xf8, 0x00, 0x00, 0x00,                  // 0x1e5 mov edx,0xf8
    0x89, 0xe8,                                    // 0x1ea mov eax,ebp
    0xef,                                          // 0x1ec out dx,eax
    0xba, 0xfc, 0x00, 0x00, 0x00,                  // 0x1ed mov edx,0xfc
    0x48, 0x89, 0xe8,                              // 0x1f2 mov rax,rbp
    0x48, 0xc1, 0xe8, 0x20,                        // 0x1f5 shr rax,0x20
    0xef,                                          // 0x1f9 out dx,eax
    0xe9, 0x51, 0xfe, 0xff, 0xff,                  // 0x1fa jmp 50 <write>
    // dbad:
    0x49, 0xff, 0x47, 0x58,                        // 0x1ff inc [r15+0x58]
    0x49, 0x8d, 0x1c, 0x0a,                        // 0x203 lea rbx,[r10+rcx*1]
    0xba, 0x30, 0x01, 0x00, 0x00,                  // 0x207 mov edx,0x130
    0x89, 0xd8,                                    // 0x20c mov eax,ebx
    0xef,                                          // 0x20e out dx,eax
    0xba, 0x34, 0x01, 0x00, 0x00,                  // 0x20f mov edx,0x134
    0x48, 0x89, 0xd8,                              // 0x214 mov rax,rbx
    0x48, 0xc1, 0xe8, 0x20,                        // 0x217 shr rax,0x20
    0xef,                                          // 0x21b out dx,eax
    0x48, 0x8b, 0x1c, 0x0f,                        // 0x21c mov rbx,[rdi+rcx*1]
    0xba, 0x38, 0x01, 0x00, 0x00,                  // 0x220 mov edx,0x138
    0x89, 0xd8,                                    // 0x225 mov eax,ebx
    0xef,                                          // 0x227 out dx,eax
    0xba, 0x3c, 0x01, 0x00, 0x00,                  // 0x228 mov edx,0x13c
    0x48, 0x89, 0xd8,                              // 0x22d mov rax,rbx
    0x48, 0xc1, 0xe8, 0x20,                        // 0x230 shr rax,0x20
    0xef,                                          // 0x234 out dx,eax
    0xe9, 0x3a, 0xff, 0xff, 0xff,                  // 0x235 jmp 174 <vnext>
];

/// GDT entries: null; kernel 64-bit code (0x08: L=1, P, DPL 0, execute/read, accessed); kernel
/// data (0x10: P, read/write, accessed, 4 KiB granularity); user 64-bit code (0x18, DPL 3); user
/// data (0x20, DPL 3).
pub const GDT_ENTRIES: [u64; 5] =
    [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x00af_fb00_0000_ffff, 0x00cf_f300_0000_ffff];

/// Page-table words to write so that `[0, mem_bytes)` is identity-mapped with 2 MiB pages:
/// (gpa, value) pairs. `mem_bytes` must be at most `MAX_PDS` GiB.
pub fn page_table_entries(mem_bytes: u64) -> Vec<(u64, u64)> {
    const P_RW: u64 = 0x7; // present, writable, user-accessible (the guest may run at CPL 3)
    const PS: u64 = 0x80; // 2 MiB page
    let mut v = vec![(PML4, PDPT | P_RW)];
    let two_mib = 2 << 20;
    let pages = mem_bytes.div_ceil(two_mib);
    for gib in 0..pages.div_ceil(512) {
        v.push((PDPT + gib * 8, (PD + gib * 0x1000) | P_RW));
    }
    for i in 0..pages {
        v.push((PD + i * 8, (i * two_mib) | P_RW | PS));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_generation_roundtrip() {
        assert_eq!(K.wrapping_mul(K_INV), 1);
        for (addr, g) in [(0x10_0000, 1), (0x3fff_f000, 77), (0x12_3458, u64::from(u32::MAX) + 5)] {
            assert_eq!(generation_of(addr, stamp(addr, g)), g);
        }
    }

    #[test]
    fn program_jumps_land_on_labels() {
        // rel8/rel32 targets computed from the listing offsets above.
        assert_eq!(PROGRAM.len(), 0x23a);
        assert_eq!(PROGRAM[0x3f..0x41], [0x74, 0x0f]); // jz write: 0x41 + 0x0f = 0x50
        assert_eq!(PROGRAM[0x50..0x53], [0x48, 0x89, 0xf8]); // write: mov rax, rdi
        assert_eq!(PROGRAM[0x4a..0x50], [0x0f, 0x85, 0x79, 0x01, 0x00, 0x00]); // jne bad: 0x50 + 0x179
        assert_eq!(PROGRAM[0x1c9..0x1cc], [0x48, 0x8b, 0x2f]); // bad: mov rbp, [rdi]
    }

    /// The listed bytes are `guest.S` assembled (where binutils is installed).
    #[test]
    fn program_is_the_assembled_source() {
        let dir = tempfile::tempdir().unwrap();
        let src = concat!(env!("CARGO_MANIFEST_DIR"), "/src/kvm/guest.S");
        let obj = dir.path().join("guest.o");
        let bin = dir.path().join("guest.bin");
        let run = |cmd: &str, args: &[&std::ffi::OsStr]| std::process::Command::new(cmd).args(args).status();
        match run("as", &["--64".as_ref(), src.as_ref(), "-o".as_ref(), obj.as_os_str()]) {
            Ok(st) if st.success() => {}
            Ok(st) => panic!("as failed on guest.S: {st}"),
            Err(e) => {
                println!("SKIP: program_is_the_assembled_source: no GNU as ({e})");
                return;
            }
        }
        let st = run("objcopy", &["-O".as_ref(), "binary".as_ref(), obj.as_os_str(), bin.as_os_str()]).unwrap();
        assert!(st.success());
        assert_eq!(std::fs::read(&bin).unwrap(), PROGRAM, "PROGRAM differs from guest.S assembled");
    }

    #[test]
    fn page_tables_cover_memory() {
        let e = page_table_entries(1 << 30);
        assert_eq!(e.len(), 1 + 1 + 512);
        let e = page_table_entries(3 << 20);
        assert_eq!(e.len(), 1 + 1 + 2);
    }
}
