# Touch N pages with a stride and a pattern; report the guest's TSC cycles for the loop.
#   r8 first address, r9 count, r10 stride (bytes), r11 pattern, r12 1 = write, 0 = read
#   REPORT(1, cycles); DONE(0)
    .include "common.inc"
    RDTSC64 %r14
    mov %r8, %rdi
    mov %r9, %rcx
    test %rcx, %rcx
    jz measured
    test %r12, %r12
    jz reads
writes:
    mov %r11, (%rdi)
    add %r10, %rdi
    dec %rcx
    jnz writes
    jmp measured
reads:
    mov (%rdi), %rax
    add %r10, %rdi
    dec %rcx
    jnz reads
measured:
    RDTSC64 %rcx
    sub %r14, %rcx
    mov $1, %ebx
    HC HC_REPORT
    xor %ebx, %ebx
    HC HC_DONE
    hlt
