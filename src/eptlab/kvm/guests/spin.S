# Spin forever without exiting (the VMM's watchdog must stop it).
    .include "common.inc"
spin:
    jmp spin
