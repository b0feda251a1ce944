# r8 hypercalls of the NOP kind, back to back (measures the exit round trip); DONE(0)
    .include "common.inc"
    mov %r8, %rsi
    test %rsi, %rsi
    jz finish
again:
    HC HC_NOP
    dec %rsi
    jnz again
finish:
    xor %ebx, %ebx
    HC HC_DONE
    hlt
