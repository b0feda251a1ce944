# Issue a hypercall number the VMM does not know.
    .include "common.inc"
    mov $0x1234, %ebx
    HC 0x7777
    hlt
