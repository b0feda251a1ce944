# A "kernel" that runs through a code page and sometimes patches it (alternatives-style: an
# 8-byte store flips a site between a 5-byte NOP and a 5-byte JMP, both followed by a NOP3).
#   r8 iterations, r9 patch period (patch after every r9-th iteration)
#   REPORT(2, patch site address); DONE(patches)
    .include "common.inc"
    mov $2, %ebx
    mov $patch_site, %rcx
    HC HC_REPORT
    xor %rsi, %rsi
    xor %r12, %r12
loop:
    cmp %r8, %rsi
    jae finish
    jmp patch_site
back:
    lea 1(%rsi), %rax
    xor %edx, %edx
    div %r9
    test %rdx, %rdx
    jnz next
    mov $patch_site, %rdi
    mov (%rdi), %rax
    movabs $0x001f0f0000441f0f, %rcx     # nop5; nop3
    movabs $0x001f0f00000003e9, %rdx     # jmp +3; nop3
    cmp %rcx, %rax
    cmove %rdx, %rcx
    mov %rcx, (%rdi)
    inc %r12
next:
    inc %rsi
    jmp loop
finish:
    mov %r12, %rbx
    HC HC_DONE
    hlt

    .balign 4096
code_region:
patch_site:
    .byte 0x0f, 0x1f, 0x44, 0x00, 0x00, 0x0f, 0x1f, 0x00
    jmp back
    .balign 4096
