# Transactions (Intel TSX RTM) over the data region, the abort status of every attempt logged.
#   r8  warm runs (24 bytes each: address, count, stride), r9 their number
#   r10 transaction runs (per_tx runs per transaction), r11 transactions, r12 per_tx
#   r13 max retries, r14 rounds, r15 the log (16 bytes per entry)
# Warm-up: `or $0` at every address of the warm runs (outside any transaction), then a read of
# every word of the transaction runs (so reading them inside a transaction is no first touch),
# then ROUND(-1). Each round runs every transaction: XBEGIN, a store of the transaction's index
# at every address of its runs, XEND; an abort retries up to r13 times, then the fallback does
# the stores without a transaction. Log entry (as eptlab.kvm.txplan.AttemptLog decodes it):
#   kind << 56 | tx << 32 | status (kind 0 abort, 1 commit, 2 fallback), then RDTSC cycles
# from before XBEGIN to after XEND (commit) or to the abort path (abort). ROUND(rounds left)
# after each round, DONE(end of the log) at the end.
    .include "common.inc"

# the stores of one transaction: rsi its runs, rdi their number, rbx the value
.macro STORE_RUNS
1:  test %rdi, %rdi
    jz 4f
    mov (%rsi), %rax
    mov 8(%rsi), %rcx
    mov 16(%rsi), %rdx
    test %rcx, %rcx
    jz 3f
2:  mov %rbx, (%rax)
    add %rdx, %rax
    dec %rcx
    jnz 2b
3:  add $24, %rsi
    dec %rdi
    jmp 1b
4:
.endm

# rsi = r10 + rbx * r12 * 24, rdi = r12: the runs of transaction rbx
.macro TX_RUNS
    mov %rbx, %rsi
    imul %r12, %rsi
    lea (%rsi, %rsi, 2), %rsi
    shl $3, %rsi
    add %r10, %rsi
    mov %r12, %rdi
.endm

    mov %r8, %rsi
    mov %r9, %rdi
warm_run:
    test %rdi, %rdi
    jz warm_done
    mov (%rsi), %rax
    mov 8(%rsi), %rcx
    mov 16(%rsi), %rdx
    test %rcx, %rcx
    jz warm_next
warm_store:
    orq $0, (%rax)
    add %rdx, %rax
    dec %rcx
    jnz warm_store
warm_next:
    add $24, %rsi
    dec %rdi
    jmp warm_run
warm_done:
    mov %r10, %rsi
    mov %r11, %rcx
    imul %r12, %rcx
    lea (%rcx, %rcx, 2), %rcx
pre_read:
    test %rcx, %rcx
    jz pre_done
    mov (%rsi), %rax
    add $8, %rsi
    dec %rcx
    jmp pre_read
pre_done:
    mov $-1, %rbx
    HC HC_ROUND

round_loop:
    test %r14, %r14
    jz finish
    xor %ebx, %ebx
tx_loop:
    cmp %r11, %rbx
    jae end_round
    xor %ebp, %ebp
attempt:
    TX_RUNS
    RDTSC64 %r9
    xbegin aborted
    STORE_RUNS
    xend
    RDTSC64 %rax
    sub %r9, %rax
    mov %rax, 8(%r15)
    mov $1, %eax
    shl $56, %rax
    mov %rbx, %rcx
    shl $32, %rcx
    or %rcx, %rax
    mov %rax, (%r15)
    add $16, %r15
    inc %rbx
    jmp tx_loop
aborted:
    mov %eax, %r8d
    RDTSC64 %rax
    sub %r9, %rax
    mov %rax, 8(%r15)
    mov %rbx, %rcx
    shl $32, %rcx
    or %r8, %rcx
    mov %rcx, (%r15)
    add $16, %r15
    inc %rbp
    cmp %r13, %rbp
    jbe attempt
    TX_RUNS
    STORE_RUNS
    mov $2, %eax
    shl $56, %rax
    mov %rbx, %rcx
    shl $32, %rcx
    or %rcx, %rax
    mov %rax, (%r15)
    movq $0, 8(%r15)
    add $16, %r15
    inc %rbx
    jmp tx_loop
end_round:
    dec %r14
    mov %r14, %rbx
    HC HC_ROUND
    jmp round_loop
finish:
    mov %r15, %rbx
    HC HC_DONE
    hlt
