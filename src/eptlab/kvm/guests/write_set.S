# Write a given set of addresses, round after round.
#   r8 list of addresses (u64, written by the VMM), r9 count, r10 rounds, r11 pattern
#   each round r stores pattern + r at every address, then ROUND(r); finally DONE(0)
    .include "common.inc"
    xor %r13, %r13
round:
    cmp %r10, %r13
    jae finish
    lea (%r11, %r13), %r12
    mov %r8, %rsi
    mov %r9, %rcx
    test %rcx, %rcx
    jz end_round
store:
    mov (%rsi), %rdi
    mov %r12, (%rdi)
    add $8, %rsi
    dec %rcx
    jnz store
end_round:
    mov %r13, %rbx
    HC HC_ROUND
    inc %r13
    jmp round
finish:
    xor %ebx, %ebx
    HC HC_DONE
    hlt
