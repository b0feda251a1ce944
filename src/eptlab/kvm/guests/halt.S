# Halt at once (HLT exit).
    .include "common.inc"
    hlt
    jmp main
