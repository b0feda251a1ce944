"""prefetch on KVM: populate a hinted guest range before the guest touches it, or let it fault.

Methods, each on a fresh VM whose memory has never been touched:

* ``demand``: nothing ahead; the guest's first touch of each page faults (host page fault,
  KVM's second-level or shadow mapping built on the way).
* ``prefault``: ``KVM_PRE_FAULT_MEMORY`` on the range (KVM maps it in its second-level tables
  ahead of the guest) where the kernel supports it (capability 236). Where it does not (here:
  ``EOPNOTSUPP``), host-side population of the backing with ``madvise(MADV_POPULATE_WRITE)``;
  the row's ``mechanism`` says which ran.
* ``populate``: ``MADV_POPULATE_WRITE`` always (the host side only).

The ``touch`` guest writes one word per page of the range and reports the cycles of its loop
(its own TSC) through a hypercall. ``host_faults`` are the process's minor page faults while the
guest ran (KVM faults guest memory in on the vCPU thread); ``kernel_exits`` the vCPU's exits
handled inside KVM (its binary statistics), ``faults_or_exits`` their sum.
"""

from __future__ import annotations

import errno
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass

from ...errors import ConfigError, KvmError
from .. import abi
from ..backend import DATA_BASE, PAGE, KvmGuest
from ..fds import Kvm
from ..memory import GuestMemory
from .common import Row, flavour_columns, user_mode

METHODS = ("demand", "prefault", "populate")
REPORT_CYCLES = 1


@dataclass(frozen=True)
class PrefetchParams:
    """Parameters of the KVM prefetch application."""
    memory_mib: int = 128
    range_mib: int = 64  # the hinted range, from the start of the data region
    methods: tuple[str, ...] = METHODS
    repeats: int = 3  # runs per method (fresh VM each); the row has the median
    guest_cpl: int = 3


@dataclass
class PrefetchOutcome:
    """One prefetch method: the mechanism used and the guest's cycles per page."""
    method: str
    mechanism: str  # KVM_PRE_FAULT_MEMORY, MADV_POPULATE_WRITE or none
    pages: int
    guest_cycles: int
    host_faults: int
    kernel_exits: int
    userspace_exits: int
    prefetch_seconds: float
    note: str = ""
    insn_emulated: int = 0


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run_method(kvm: Kvm, method: str, memory: int, length: int, *,
               user: bool = True) -> PrefetchOutcome:
    """Run the guest over ``length`` bytes after prefetching with ``method``."""
    if method not in METHODS:
        raise ConfigError("methods", f"{method!r} is not one of {METHODS}")
    if length <= 0 or length % PAGE or DATA_BASE + length > memory:
        raise ConfigError("range_mib", "the range must fit the data region")
    with KvmGuest(kvm, GuestMemory(memory), "touch", user=user) as guest:
        mechanism, note = "none", ""
        start = time.perf_counter()
        if method == "prefault":
            if kvm.check_extension(abi.Cap.PRE_FAULT_MEMORY):
                try:
                    guest.vcpu.pre_fault_memory(DATA_BASE, length)  # the whole range
                    mechanism = "KVM_PRE_FAULT_MEMORY"
                except KvmError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                        raise
                    note = str(exc)
            else:
                note = "KVM_CAP_PRE_FAULT_MEMORY is 0 here"
        if method == "populate" or (method == "prefault" and mechanism == "none"):
            guest.memory.populate_write(DATA_BASE, length)
            mechanism = "MADV_POPULATE_WRITE"
        prefetch_seconds = time.perf_counter() - start
        guest.start(r8=DATA_BASE, r9=length // PAGE, r10=PAGE, r11=1, r12=1)
        faults = _minor_faults()
        result = guest.run()
        faults = _minor_faults() - faults
    return PrefetchOutcome(
        method, mechanism, length // PAGE, result.reports[REPORT_CYCLES], faults,
        result.kernel_exits, result.total_exits, prefetch_seconds, note, result.insn_emulated,
    )


class Prefetch:
    """Backing a range before the guest touches it, on KVM."""
    name = "prefetch"

    def rows(self, p: PrefetchParams) -> Iterator[Row]:
        """One row per method and repeat."""
        if p.repeats < 1:
            raise ConfigError("repeats", "must be at least 1")
        with Kvm.open() as kvm:
            for method in p.methods:
                runs = sorted(
                    (run_method(kvm, method, p.memory_mib << 20, p.range_mib << 20,
                                user=user_mode(p.guest_cpl))
                     for _ in range(p.repeats)),
                    key=lambda o: o.guest_cycles,
                )
                o = runs[len(runs) // 2]
                yield {
                    "method": method,
                    "mechanism": o.mechanism,
                    "prefault": o.mechanism != "none",
                    "pages": o.pages,
                    "guest_cycles": o.guest_cycles,
                    "cycles_per_page": round(o.guest_cycles / o.pages, 1),
                    "faults_or_exits": o.host_faults + o.kernel_exits,
                    "host_faults": o.host_faults,
                    "kernel_exits": o.kernel_exits,
                    "userspace_exits": o.userspace_exits,
                    "insn_emulated": o.insn_emulated,
                    "prefetch_ms": round(o.prefetch_seconds * 1e3, 3),
                    "note": o.note,
                    **flavour_columns(p.guest_cpl),
                }
