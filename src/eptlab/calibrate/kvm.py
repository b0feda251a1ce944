"""The KVM side of a calibration, taken from eptlab's KVM backend (``eptlab.kvm``): what an exit,
a write-protect trap, a dirty-log harvest and a fork cost *as eptlab's Python VMM sees them*
(every figure includes the Python run loop, which is what eptlab's KVM applications pay).

On ``kvm_pvm`` (these machines) the guest runs under shadow paging and an "exit" is a PVM
round trip through the host kernel, not a VMX transition: none of these is a hardware VM-exit
cost, and the profile does not use them for ``vmexit_cycles``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from ..kvm.apps.common import WritePattern
from ..kvm.apps.dirty_log import DirtyLogOutcome, run_mode
from ..kvm.apps.fork import fork_once
from ..kvm.backend import KvmGuest, flavour
from ..kvm.fds import Kvm
from ..kvm.memory import GuestMemory
from ..native import Samples
from .plan import Plan


@dataclass
class KvmResults:
    flavour: str = ""
    exit_us: Samples | None = None
    wp_trap_us: Samples | None = None
    harvest_ns_per_page: Samples | None = None
    fork_ms: dict[int, Samples] = field(default_factory=dict)  # by guest MiB

    @property
    def fork_ms_per_gib(self) -> Samples | None:
        """Extra fork time per GiB of guest memory: the slope between the smallest and the
        largest guest measured (k-th sorted sample of one against the k-th of the other), or
        with one size its time per GiB."""
        if not self.fork_ms:
            return None
        small, big = min(self.fork_ms), max(self.fork_ms)
        if small == big:
            return Samples(tuple(v * 1024 / big for v in self.fork_ms[big].values))
        gib = (big - small) / 1024
        return Samples(tuple((b - a) / gib for a, b in zip(
            sorted(self.fork_ms[small].values), sorted(self.fork_ms[big].values),
            strict=False)))


class KvmCalibration:
    """Each step yields a label (progress); ``results`` holds the samples."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.results = KvmResults()

    def steps(self) -> int:
        return 3 + len(self.plan.kvm_fork_mibs)

    def run(self) -> Iterator[str]:
        p, r = self.plan, self.results
        r.flavour = flavour().label
        with Kvm.open() as kvm:
            r.exit_us = self._exits(kvm)
            yield f"KVM exit round trip: {r.exit_us.median:.2f} us"
            r.wp_trap_us = self._traps(kvm)
            yield f"KVM write-protect trap: {r.wp_trap_us.median:.2f} us"
            r.harvest_ns_per_page = self._harvest(kvm)
            yield f"KVM dirty-log harvest: {r.harvest_ns_per_page.median:.0f} ns/page"
            for mib in p.kvm_fork_mibs:
                r.fork_ms[mib] = self._fork(kvm, mib)
                yield f"KVM fork of {mib} MiB: {r.fork_ms[mib].median:.2f} ms"

    def _exits(self, kvm: Kvm) -> Samples:
        """``pingpong``: N NOP hypercalls (``out`` to the hypercall port), each an exit to
        this process and back; seconds of the whole run / (N + 1)."""
        n, values = self.plan.kvm_exits, []
        with KvmGuest(kvm, GuestMemory(8 << 20), "pingpong") as guest:
            for i in range(self.plan.repeats + 1):
                guest.start(r8=n)
                result = guest.run(timeout=60.0)
                if i:  # the first run warms up (page faults, caches)
                    values.append(result.seconds * 1e6 / (n + 1))
        return Samples(tuple(values))

    def _write_runs(self, kvm: Kvm, mode: str, memory: int, pages: int) -> Iterator[
            DirtyLogOutcome]:
        """``write_set`` in dirty-log ``mode`` (two rounds) over ``memory`` bytes, once per
        repeat, each repeat writing its own seeded random set of ``pages`` pages."""
        for i in range(self.plan.repeats):
            pattern = WritePattern.random(memory, pages, self.plan.seed + i)
            yield run_mode(kvm, mode, pattern, memory, rounds=2)

    def _traps(self, kvm: Kvm) -> Samples:
        """``write_set`` into a read-only memslot: every write exits as MMIO and the VMM
        performs it; run seconds / writes."""
        runs = self._write_runs(kvm, "trap", 16 << 20, self.plan.kvm_trap_pages)
        return Samples(tuple(o.run_seconds * 1e6 / o.writes for o in runs))

    def _harvest(self, kvm: Kvm) -> Samples:
        """``KVM_GET_DIRTY_LOG`` after each round of ``write_set`` (dirty logging on the data
        slot): harvest seconds / pages harvested (the bitmap ioctl, which also re-protects the
        pages, and decoding it into page addresses)."""
        runs = self._write_runs(kvm, "log", 64 << 20, self.plan.kvm_harvest_pages)
        return Samples(tuple(o.harvest_seconds * 1e9 / o.harvested_pages for o in runs))

    def _fork(self, kvm: Kvm, mib: int) -> Samples:
        """``fork_once``: a new VM, memslots over a ``MAP_PRIVATE`` view of the parent's memfd
        and a vCPU with its registers; milliseconds per clone."""
        p, values = self.plan, []
        for i in range(p.repeats):
            outcome = fork_once(kvm, mib << 20, clones=2, pages=16, seed=p.seed + i)
            values += [s * 1e3 for s in outcome.fork_seconds]
        return Samples(tuple(values))
