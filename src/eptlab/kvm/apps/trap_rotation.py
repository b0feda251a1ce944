"""trap-rotation on KVM: catch rare wild writes by write-protecting a rotating sample of memory.

The ``wild`` guest loops over a small working set and, after every ``wild_period``-th
iteration, stores to a pseudo-random page of the wild region (its log of those addresses, in
the parameter area, is the ground truth). The data region is split into memslots of
``chunk_mib``; at every rotation (a ROUND hypercall each ``rotate_period`` iterations) the VMM
draws a new sample of ``trap_fraction`` of the chunks and makes them read-only
(``KVM_MEM_READONLY``: a slot is deleted and created again to change it), the rest writable.
A write into a read-only chunk exits; the VMM performs it (the guest goes on) and, when it is
one of the wild ones, counts a detection. The working set lives in the first chunk, which is
in the sample space too: when it is sampled its writes trap, which is the rotation's cost.
(userfaultfd write-protection would give 4 KiB granularity; read-only memslots are used here.)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ...arch.exits import EptQual, EptViolation
from ...errors import ConfigError, GuestError
from ...hv.exits import ExitAction, Vmcall
from .. import abi
from ..backend import (
    BOOT_SIZE,
    DATA_BASE,
    HC_ROUND,
    LOG_AREA,
    PAGE,
    KvmExit,
    KvmGuest,
    default_slots,
)
from ..fds import Kvm
from ..memory import GuestMemory
from .common import Row, flavour_columns, user_mode


@dataclass(frozen=True)
class TrapRotationParams:
    """Parameters of the KVM trap-rotation application."""
    memory_mib: int = 66
    chunk_mib: int = 2
    trap_fractions: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 1.0)
    iterations: int = 20_000
    working_set_pages: int = 16
    wild_period: int = 200  # one wild write after every 200th iteration
    rotate_period: int = 1_000
    seed: int = 1
    guest_cpl: int = 3


@dataclass
class RotationOutcome:
    """One trap fraction: bugs injected and detected, exits, time."""
    trap_fraction: float
    bugs_injected: int
    bugs_detected: int
    trap_exits: int  # trapped writes (working set and wild)
    rotations: int
    slot_changes: int
    seconds: float
    kernel_exits: int = 0
    insn_emulated: int = 0


class _Rotator:
    def __init__(self, guest: KvmGuest, fraction: float, wild_base: int, seed: int) -> None:
        self.guest, self.fraction, self.wild_base = guest, fraction, wild_base
        self.rng = np.random.default_rng(seed)
        self.chunks = list(range(1, len(guest.slots)))  # slot 0 is the boot region
        self.detected: list[int] = []
        self.trap_exits = self.rotations = self.slot_changes = 0
        self.rotate()

    def rotate(self) -> None:
        k = round(self.fraction * len(self.chunks))
        sample = set(self.rng.choice(self.chunks, k, replace=False).tolist()) if k else set()
        for index in self.chunks:
            flags = abi.MemFlag.READONLY if index in sample else 0
            if self.guest.slots[index].flags != flags:
                self.guest.set_slot_flags(index, flags)
                self.slot_changes += 1
        self.rotations += 1

    def __call__(self, e: KvmExit) -> ExitAction | None:
        record = e.record
        if isinstance(record, EptViolation) and record.qualification & EptQual.WRITE:
            if self.guest.slot_of(record.gpa) is None:
                return None
            self.trap_exits += 1
            if record.gpa >= self.wild_base:
                self.detected.append(record.gpa & ~(PAGE - 1))
            self.guest.emulate_write(e)
            return ExitAction.SKIP
        if isinstance(record, Vmcall) and record.number == HC_ROUND:
            self.rotate()
        return None


def run_fraction(kvm: Kvm, p: TrapRotationParams, fraction: float) -> RotationOutcome:
    """Run the wild-write guest with ``fraction`` of its memory trapped at a time."""
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError("trap_fractions", f"{fraction} is not in [0, 1]")
    for name in ("iterations", "working_set_pages", "wild_period", "rotate_period"):
        if getattr(p, name) < 1:
            raise ConfigError(name, "must be at least 1")
    memory, chunk = p.memory_mib << 20, p.chunk_mib << 20
    slots = default_slots(memory, chunk=chunk)
    if len(slots) < 3:
        raise ConfigError("memory_mib", "needs at least two chunks (working set + wild region)")
    if p.working_set_pages * PAGE > chunk:
        raise ConfigError("working_set_pages", "the working set must fit the first chunk")
    wild_base = DATA_BASE + chunk
    wild_pages = (memory - wild_base) // PAGE
    if p.iterations // p.wild_period > (BOOT_SIZE - LOG_AREA) // 8:
        raise ConfigError("iterations", "too many wild writes for the log")
    with KvmGuest(kvm, GuestMemory(memory), "wild", slots=slots,
                  user=user_mode(p.guest_cpl)) as guest:
        rotator = _Rotator(guest, fraction, wild_base, p.seed)
        guest.start(r8=DATA_BASE, r9=p.working_set_pages, r10=p.iterations, r11=p.wild_period,
                    r12=wild_base, r13=wild_pages, r14=p.rotate_period, r15=p.seed)
        result = guest.run(rotator, timeout=60.0)
        injected = result.status or 0
        log = np.frombuffer(guest.memory.read(LOG_AREA, 8 * injected), "<u8")
        truth = [int(a) & ~(PAGE - 1) for a in log]
    if Counter(rotator.detected) - Counter(truth):  # every detection is a logged wild write
        raise GuestError("wild", "a trapped write in the wild region is not in the guest's log")
    return RotationOutcome(fraction, injected, len(rotator.detected), rotator.trap_exits,
                           rotator.rotations, rotator.slot_changes, result.seconds,
                           result.kernel_exits, result.insn_emulated)


class TrapRotation:
    """Rotating write traps over guest memory on KVM."""
    name = "trap-rotation"

    def rows(self, p: TrapRotationParams) -> Iterator[Row]:
        """One row per trap fraction."""
        with Kvm.open() as kvm:
            for fraction in p.trap_fractions:
                o = run_fraction(kvm, p, fraction)
                yield {
                    "trap_fraction": fraction,
                    "bugs_injected": o.bugs_injected,
                    "bugs_detected": o.bugs_detected,
                    "detection_rate": round(o.bugs_detected / max(o.bugs_injected, 1), 3),
                    "exits": o.trap_exits,
                    "rotations": o.rotations,
                    "slot_changes": o.slot_changes,
                    "run_ms": round(o.seconds * 1e3, 1),
                    "kernel_exits": o.kernel_exits,
                    "insn_emulated": o.insn_emulated,
                    **flavour_columns(p.guest_cpl),
                }
