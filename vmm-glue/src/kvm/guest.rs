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
//! | `ws_base` (default 1 MiB).. | working set |

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

/// The guest program (loaded at [`CODE`]). Registers: r15 parameter block, r14 passes done,
/// r13 checksum, r8 ws_base, r9 stride, r10 delay, r11 previous stamp multiplier
/// (`passes * K`), r12 this pass's (`(passes + 1) * K`), rbx current page, rcx pages left,
/// rsi offset in page, rdi word address, rax/rdx/rbp scratch. No stack, no memory but the
/// parameter block and the working set.
#[rustfmt::skip]
pub const PROGRAM: &[u8] = &[
    // start: load the parameters and the state kept in the parameter block.
    0x41, 0xbf, 0x00, 0x80, 0x00, 0x00,             // 0x00 mov r15d, 0x8000    ; r15 = parameter block
    0x4d, 0x8b, 0x77, 0x28,                         // 0x06 mov r14, [r15+0x28] ; passes done (0 at boot)
    0x4d, 0x8b, 0x6f, 0x30,                         // 0x0a mov r13, [r15+0x30] ; checksum so far
    0x4d, 0x8b, 0x47, 0x08,                         // 0x0e mov r8, [r15+0x08]  ; ws_base
    0x4d, 0x8b, 0x4f, 0x18,                         // 0x12 mov r9, [r15+0x18]  ; stride
    // pass: one sweep over the working set.
    0x4d, 0x8b, 0x57, 0x20,                         // 0x16 mov r10, [r15+0x20] ; delay (reread each pass)
    0x48, 0xb8, 0x15, 0x7c, 0x4a, 0x7f,
    0xb9, 0x79, 0x37, 0x9e,                         // 0x1a movabs rax, K
    0x4d, 0x89, 0xf3,                               // 0x24 mov r11, r14        ; r11 = passes
    0x4c, 0x0f, 0xaf, 0xd8,                         // 0x27 imul r11, rax       ; r11 = passes * K (old stamp)
    0x4d, 0x8d, 0x24, 0x03,                         // 0x2b lea r12, [r11+rax]  ; r12 = (passes+1) * K (new)
    0x4c, 0x89, 0xc3,                               // 0x2f mov rbx, r8         ; rbx = first page
    0x49, 0x8b, 0x4f, 0x10,                         // 0x32 mov rcx, [r15+0x10] ; rcx = ws_pages
    // page: one page.
    0x31, 0xf6,                                     // 0x36 xor esi, esi        ; offset = 0
    // wloop: one stamped word.
    0x48, 0x8d, 0x3c, 0x33,                         // 0x38 lea rdi, [rbx+rsi]  ; rdi = word address
    0x4d, 0x85, 0xf6,                               // 0x3c test r14, r14       ; first pass?
    0x74, 0x0b,                                     // 0x3f jz write (+0x0b)    ; nothing to verify yet
    0x48, 0x89, 0xf8,                               // 0x41 mov rax, rdi
    0x4c, 0x31, 0xd8,                               // 0x44 xor rax, r11        ; rax = stamp(addr, passes)
    0x48, 0x39, 0x07,                               // 0x47 cmp [rdi], rax      ; what the last pass wrote?
    0x75, 0x6f,                                     // 0x4a jne bad (+0x6f)
    // write:
    0x48, 0x89, 0xf8,                               // 0x4c mov rax, rdi
    0x4c, 0x31, 0xe0,                               // 0x4f xor rax, r12        ; rax = stamp(addr, passes+1)
    0x48, 0x89, 0x07,                               // 0x52 mov [rdi], rax      ; store it
    0x49, 0x01, 0xc5,                               // 0x55 add r13, rax        ; checksum += stamp
    0x4c, 0x01, 0xce,                               // 0x58 add rsi, r9         ; offset += stride
    0x48, 0x81, 0xfe, 0x00, 0x10, 0x00, 0x00,       // 0x5b cmp rsi, 4096
    0x72, 0xd4,                                     // 0x62 jb wloop (-0x2c)
    0x4c, 0x89, 0xd0,                               // 0x64 mov rax, r10        ; pace: rax = delay
    // delay: spin `delay` times.
    0x48, 0x85, 0xc0,                               // 0x67 test rax, rax
    0x74, 0x07,                                     // 0x6a jz next (+0x07)
    0xf3, 0x90,                                     // 0x6c pause
    0x48, 0xff, 0xc8,                               // 0x6e dec rax
    0xeb, 0xf4,                                     // 0x71 jmp delay (-0x0c)
    // next: advance to the next page, or end the pass.
    0x48, 0x81, 0xc3, 0x00, 0x10, 0x00, 0x00,       // 0x73 add rbx, 4096
    0x48, 0xff, 0xc9,                               // 0x7a dec rcx
    0x75, 0xb7,                                     // 0x7d jnz page (-0x49)
    0x49, 0xff, 0xc6,                               // 0x7f inc r14             ; one more pass done
    0x4d, 0x89, 0x77, 0x28,                         // 0x82 mov [r15+0x28], r14 ; publish passes
    0x4d, 0x89, 0x6f, 0x30,                         // 0x86 mov [r15+0x30], r13 ; publish checksum
    // report through the ports: counter lo/hi, checksum lo/hi.
    0xba, 0xe0, 0x00, 0x00, 0x00,                   // 0x8a mov edx, 0xE0
    0x44, 0x89, 0xf0,                               // 0x8f mov eax, r14d
    0xef,                                           // 0x92 out dx, eax         ; counter low
    0xba, 0xe4, 0x00, 0x00, 0x00,                   // 0x93 mov edx, 0xE4
    0x4c, 0x89, 0xf0,                               // 0x98 mov rax, r14
    0x48, 0xc1, 0xe8, 0x20,                         // 0x9b shr rax, 32
    0xef,                                           // 0x9f out dx, eax         ; counter high
    0xba, 0xe8, 0x00, 0x00, 0x00,                   // 0xa0 mov edx, 0xE8
    0x44, 0x89, 0xe8,                               // 0xa5 mov eax, r13d
    0xef,                                           // 0xa8 out dx, eax         ; checksum low
    0xba, 0xec, 0x00, 0x00, 0x00,                   // 0xa9 mov edx, 0xEC
    0x4c, 0x89, 0xe8,                               // 0xae mov rax, r13
    0x48, 0xc1, 0xe8, 0x20,                         // 0xb1 shr rax, 32
    0xef,                                           // 0xb5 out dx, eax         ; checksum high
    0xe9, 0x5b, 0xff, 0xff, 0xff,                   // 0xb6 jmp pass (-0xa5)
    // bad: a word does not hold what the last pass wrote. Report it, count it, rewrite it.
    0x48, 0x8b, 0x2f,                               // 0xbb mov rbp, [rdi]      ; rbp = value found
    0x49, 0xff, 0x47, 0x38,                         // 0xbe inc qword [r15+0x38]; errors += 1
    0xba, 0xf0, 0x00, 0x00, 0x00,                   // 0xc2 mov edx, 0xF0
    0x89, 0xf8,                                     // 0xc7 mov eax, edi
    0xef,                                           // 0xc9 out dx, eax         ; address low
    0xba, 0xf4, 0x00, 0x00, 0x00,                   // 0xca mov edx, 0xF4
    0x48, 0x89, 0xf8,                               // 0xcf mov rax, rdi
    0x48, 0xc1, 0xe8, 0x20,                         // 0xd2 shr rax, 32
    0xef,                                           // 0xd6 out dx, eax         ; address high
    0xba, 0xf8, 0x00, 0x00, 0x00,                   // 0xd7 mov edx, 0xF8
    0x89, 0xe8,                                     // 0xdc mov eax, ebp
    0xef,                                           // 0xde out dx, eax         ; found low
    0xba, 0xfc, 0x00, 0x00, 0x00,                   // 0xdf mov edx, 0xFC
    0x48, 0x89, 0xe8,                               // 0xe4 mov rax, rbp
    0x48, 0xc1, 0xe8, 0x20,                         // 0xe7 shr rax, 32
    0xef,                                           // 0xeb out dx, eax         ; found high
    0xe9, 0x5b, 0xff, 0xff, 0xff,                   // 0xec jmp write (-0xa5)
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
        assert_eq!(PROGRAM.len(), 0xf1);
        assert_eq!(PROGRAM[0x3f..0x41], [0x74, 0x0b]); // jz write: 0x41 + 0x0b = 0x4c
        assert_eq!(PROGRAM[0x4c], 0x48); // write: mov rax, rdi
        assert_eq!(PROGRAM[0xbb], 0x48); // bad: mov rbp, [rdi]
    }

    #[test]
    fn page_tables_cover_memory() {
        let e = page_table_entries(1 << 30);
        assert_eq!(e.len(), 1 + 1 + 512);
        let e = page_table_entries(3 << 20);
        assert_eq!(e.len(), 1 + 1 + 2);
    }
}
