# A loop over a working set with rare wild writes to pseudo-random pages (64-bit LCG).
#   r8 working-set base, r9 working-set pages, r10 iterations, r11 wild period,
#   r12 wild-region base, r13 wild-region pages, r14 rotation period, r15 seed
#   every iteration i stores i into working-set page i mod r9; after every r11-th iteration one
#   wild store to a random page of the wild region, its address appended to the log at LOG_AREA;
#   after every r14-th iteration ROUND(i); finally DONE(wild writes)
    .include "common.inc"
    mov $LOG_AREA, %rbp
    xor %rsi, %rsi
loop:
    cmp %r10, %rsi
    jae finish
    mov %rsi, %rax
    xor %edx, %edx
    div %r9
    shl $12, %rdx
    add %r8, %rdx
    mov %rsi, (%rdx)
    lea 1(%rsi), %rax
    xor %edx, %edx
    div %r11
    test %rdx, %rdx
    jnz rotate
    movabs $6364136223846793005, %rax
    imul %rax, %r15
    movabs $1442695040888963407, %rax
    add %rax, %r15
    mov %r15, %rax
    shr $33, %rax
    xor %edx, %edx
    div %r13
    shl $12, %rdx
    add %r12, %rdx
    mov %r15, (%rdx)
    mov %rdx, (%rbp)
    add $8, %rbp
rotate:
    lea 1(%rsi), %rax
    xor %edx, %edx
    div %r14
    test %rdx, %rdx
    jnz next
    mov %rsi, %rbx
    HC HC_ROUND
next:
    inc %rsi
    jmp loop
finish:
    mov %rbp, %rbx
    sub $LOG_AREA, %rbx
    shr $3, %rbx
    HC HC_DONE
    hlt
