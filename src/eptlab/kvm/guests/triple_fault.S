# Raise #UD with no IDT: #UD -> #GP -> #DF -> triple fault (shutdown).
    .include "common.inc"
    ud2
    hlt
