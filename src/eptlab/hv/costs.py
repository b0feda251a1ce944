"""Cycles charged for hypervisor work the translation engine does not model. One place, so
every application prices an exit, an INVEPT, an EPT edit and a copy the same way, and turns
cycles into time with the same clock."""

from __future__ import annotations

VMEXIT_CYCLES = 1_500  # VM exit + VM entry round trip, handler dispatch included
INVEPT_CYCLES = 500  # the instruction; refill walks are counted by the engine
EPT_EDIT_CYCLES = 20  # read-modify-write of one EPT entry
COPY_BYTES_PER_CYCLE = 8  # memcpy / memset bandwidth
FRAME_ALLOC_CYCLES = 200  # taking a frame from the host allocator
CYCLES_PER_US = 3_000  # a 3 GHz clock: converts modelled cycles into modelled time
EMULATE_CYCLES = 2_500  # fetch + decode a trapped access, check it, perform or refuse it
