# Ferry's KVM guest program (64-bit, loaded at 0x9000, no stack). See guest.rs for the layout,
# the parameter block and the ports. Assemble: as --64 guest.S -o guest.o && objcopy -O binary guest.o guest.bin
.intel_syntax noprefix
.code64
start:                              # load the parameters and the state kept in the parameter block
    mov r15d, 0x8000                # r15 = parameter block
    mov r14, [r15+0x28]             # passes done (0 at boot)
    mov r13, [r15+0x30]             # checksum so far
    mov r8, [r15+0x08]              # ws_base
    mov r9, [r15+0x18]              # stride
pass:                               # one sweep over the working set
    mov r10, [r15+0x20]             # delay (reread each pass)
    movabs rax, 0x9E3779B97F4A7C15  # K
    mov r11, r14
    imul r11, rax                   # r11 = passes * K (old stamp)
    lea r12, [r11+rax]              # r12 = (passes+1) * K (new stamp)
    mov rbx, r8                     # rbx = first page
    mov rcx, [r15+0x10]             # rcx = ws_pages
page:
    xor esi, esi                    # offset = 0
wloop:                              # one stamped word
    lea rdi, [rbx+rsi]              # rdi = word address
    test r14, r14                   # first pass?
    jz write                        # nothing to verify yet
    mov rax, rdi
    xor rax, r11                    # rax = stamp(addr, passes)
    cmp [rdi], rax                  # what the last pass wrote?
    jne bad
write:
    mov rax, rdi
    xor rax, r12                    # rax = stamp(addr, passes+1)
    mov [rdi], rax                  # store it
    add r13, rax                    # checksum += stamp
    add rsi, r9                     # offset += stride
    cmp rsi, 4096
    jb wloop
    mov rax, r10                    # pace: rax = delay
delay:
    test rax, rax
    jz next
    pause
    dec rax
    jmp delay
next:
    add rbx, 4096
    dec rcx
    jnz page
    inc r14                         # one more pass done
    mov [r15+0x28], r14             # publish passes
    mov [r15+0x30], r13             # publish checksum
    mov edx, 0xE0
    mov eax, r14d
    out dx, eax                     # counter low
    mov edx, 0xE4
    mov rax, r14
    shr rax, 32
    out dx, eax                     # counter high
    mov edx, 0xE8
    mov eax, r13d
    out dx, eax                     # checksum low
    mov edx, 0xEC
    mov rax, r13
    shr rax, 32
    out dx, eax                     # checksum high (completes a report)
disk:                               # disk step of pass g = r14: slot (g-1) mod slots
    mov rcx, [r15+0x48]             # rcx = slots
    test rcx, rcx
    jz pass                         # no disk
    lea rax, [r14-1]
    xor edx, edx
    div rcx                         # rdx = (g-1) mod slots
    mov rbx, [r15+0x50]             # rbx = sectors per request
    imul rdx, rbx
    mov rsi, rdx                    # rsi = first sector
    xor eax, eax
    mov r12, r14
    sub r12, rcx                    # g - slots: the generation this slot holds
    cmovb r12, rax                  # (0 = never written: zeros)
    movabs rax, 0x9E3779B97F4A7C15  # K
    mov r11, r12
    imul r11, rax                   # r11 = old generation * K
    mov r12, r14
    imul r12, rax                   # r12 = g * K
    mov rbp, rbx
    shl rbp, 9                      # rbp = bytes per request
    mov r10, rsi
    shl r10, 9                      # r10 = disk offset of the request
    mov rdi, [r15+0x40]             # rdi = buffer
    mov edx, 0x100
    mov eax, esi
    out dx, eax                     # sector low
    mov edx, 0x104
    mov rax, rsi
    shr rax, 32
    out dx, eax                     # sector high
    mov edx, 0x108
    mov eax, ebx
    out dx, eax                     # count
    mov edx, 0x10C
    mov eax, edi
    out dx, eax                     # buffer low
    mov edx, 0x110
    mov rax, rdi
    shr rax, 32
    out dx, eax                     # buffer high
    mov edx, 0x118
    mov eax, 1
    out dx, eax                     # command: read
    mov edx, 0x11C
    in eax, dx                      # status
    test eax, eax
    jnz rerr
    xor ecx, ecx                    # verify: rcx = offset in the buffer
vloop:
    lea rax, [r10+rcx]
    lea rax, [rax*2+1]
    imul rax, r11                   # rax = disk_stamp(offset, old generation)
    cmp [rdi+rcx], rax
    jne dbad
vnext:
    add rcx, 8
    cmp rcx, rbp
    jb vloop
fill:
    xor ecx, ecx
floop:
    lea rax, [r10+rcx]
    lea rax, [rax*2+1]
    imul rax, r12                   # rax = disk_stamp(offset, g)
    mov [rdi+rcx], rax
    add rcx, 8
    cmp rcx, rbp
    jb floop
    mov edx, 0x118
    mov eax, 2
    out dx, eax                     # command: write (the other registers still hold the request)
    mov edx, 0x11C
    in eax, dx                      # status
    test eax, eax
    jnz werr
    mov [r15+0x60], r14             # publish the last generation written
    jmp pass
rerr:                               # the read failed: count it, write the slot anyway
    inc qword ptr [r15+0x68]
    jmp fill
werr:                               # the write failed: count it
    inc qword ptr [r15+0x68]
    jmp pass
bad:                                # a memory word does not hold what the last pass wrote
    mov rbp, [rdi]                  # rbp = value found
    inc qword ptr [r15+0x38]        # errors += 1
    mov edx, 0xF0
    mov eax, edi
    out dx, eax                     # address low
    mov edx, 0xF4
    mov rax, rdi
    shr rax, 32
    out dx, eax                     # address high
    mov edx, 0xF8
    mov eax, ebp
    out dx, eax                     # found low
    mov edx, 0xFC
    mov rax, rbp
    shr rax, 32
    out dx, eax                     # found high (completes an error record)
    jmp write
dbad:                               # a disk word does not hold what the guest wrote there
    inc qword ptr [r15+0x58]        # disk errors += 1
    lea rbx, [r10+rcx]              # rbx = disk offset of the word
    mov edx, 0x130
    mov eax, ebx
    out dx, eax                     # offset low
    mov edx, 0x134
    mov rax, rbx
    shr rax, 32
    out dx, eax                     # offset high
    mov rbx, [rdi+rcx]              # rbx = value found
    mov edx, 0x138
    mov eax, ebx
    out dx, eax                     # found low
    mov edx, 0x13C
    mov rax, rbx
    shr rax, 32
    out dx, eax                     # found high (completes a disk error record)
    jmp vnext
