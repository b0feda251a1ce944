"""dirty-log on KVM: which pages did the guest write, and what does knowing it cost?

The ``write_set`` guest stores to a set of pages, round after round (a ROUND hypercall ends
each). After every round the VMM collects the dirty set, by one of:

* ``log``: the data slot has ``KVM_MEM_LOG_DIRTY_PAGES``; ``KVM_GET_DIRTY_LOG`` returns (and
  clears, re-protecting the pages) the slot's bitmap. Writes run free: no exit.
* ``ring``: KVM's dirty ring (``KVM_CAP_DIRTY_LOG_RING``), KVM's counterpart of the PML log:
  KVM pushes each first write to a page into a per-vCPU ring the VMM harvests, then
  ``KVM_RESET_DIRTY_RINGS``. A full ring exits (``DIRTY_RING_FULL``, the PML-full exit).
* ``trap``: the data slot is read-only (``KVM_MEM_READONLY``): every write exits as MMIO, the
  VMM records the page and performs the store itself.

The dirty set of every round must equal the set of pages written (``exact``).

Exits are counted twice: ``exits`` are those that reach this VMM (trapped writes, ring-full
exits); ``kvm_exits_per_write`` and ``kvm_pf_per_write`` come from KVM's own vCPU statistics
(``KVM_GET_STATS_FD``: ``exits``, ``pf_taken``) and include what KVM handles without telling the
VMM, e.g. under shadow paging the write-protect fault of each round's first store to a page.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from ...arch.exits import EptQual, EptViolation, PmlFull
from ...errors import ConfigError
from ...hv.exits import ExitAction, Vmcall
from .. import abi
from ..backend import HC_ROUND, PAGE, KvmExit, KvmGuest, default_slots
from ..fds import Kvm, dirty_pages
from ..memory import GuestMemory
from .common import Row, WritePattern, flavour_columns, put_list, user_mode

MODES = ("log", "ring", "trap")
DATA_SLOT = 1
PATTERN = 0x5A5A_0000_0000_0000


@dataclass(frozen=True)
class DirtyLogParams:
    """Parameters of the KVM dirty-logging application."""
    memory_mib: int = 64
    pages: int = 512  # distinct pages written per round
    rounds: int = 3
    modes: tuple[str, ...] = MODES
    ring_entries: int = 4096  # dirty ring size (a power of two)
    seed: int = 0
    guest_cpl: int = 3


@dataclass
class DirtyLogOutcome:
    """What one dirty-logging mode reported, round by round, and what it cost."""
    mode: str
    written: set[int]
    dirty: list[set[int]] = field(default_factory=list)  # per round
    write_exits: int = 0  # exits caused by writes: trapped writes, ring-full exits
    other_exits: int = 0  # hypercalls (ROUND, DONE)
    run_seconds: float = 0.0
    harvest_seconds: float = 0.0
    harvested_pages: int = 0
    kernel_exits: int = 0
    insn_emulated: int = 0
    kernel_pf: int = 0  # page faults KVM itself took (its ``pf_taken`` statistic)

    @property
    def writes(self) -> int:
        """Writes the guest made: pages per round x rounds."""
        return len(self.written) * len(self.dirty)

    @property
    def exact(self) -> bool:
        """Whether every round reported exactly the pages written."""
        return bool(self.dirty) and all(d == self.written for d in self.dirty)


class _Collector:
    """The exit handler of one mode: harvests at each ROUND, traps writes in ``trap``."""

    def __init__(self, guest: KvmGuest, mode: str, outcome: DirtyLogOutcome) -> None:
        self.guest, self.mode, self.outcome = guest, mode, outcome
        self.slot = guest.slots[DATA_SLOT]
        self.pending: set[int] = set()
        self.ring_carry: set[int] = set()  # harvested early (ring full) within a round

    def harvest(self) -> set[int]:
        start = time.perf_counter()
        g = self.guest
        if self.mode == "log":
            bitmap = g.vm.get_dirty_log(DATA_SLOT, self.slot.size // PAGE)
            pages = {self.slot.gpa + int(p) * PAGE for p in dirty_pages(bitmap)}
        elif self.mode == "ring":
            assert g.ring is not None
            entries = g.ring.harvest()
            g.vm.reset_dirty_rings()
            pages = {g.slots[slot & 0xFFFF].gpa + offset * PAGE for slot, offset in entries}
        else:
            pages = set(self.pending)
            self.pending.clear()
        self.outcome.harvest_seconds += time.perf_counter() - start
        self.outcome.harvested_pages += len(pages)
        return pages

    def __call__(self, e: KvmExit) -> ExitAction | None:
        record = e.record
        if isinstance(record, EptViolation) and record.qualification & EptQual.WRITE:
            if self.mode != "trap" or self.guest.slot_of(record.gpa) != DATA_SLOT:
                return None
            self.outcome.write_exits += 1
            self.pending.add(record.gpa & ~(PAGE - 1))
            self.guest.emulate_write(e)
            return ExitAction.SKIP
        if isinstance(record, PmlFull):  # the dirty ring is full: harvest now, keep the pages
            self.outcome.write_exits += 1
            self.ring_carry |= self.harvest()
            return ExitAction.RETRY
        if isinstance(record, Vmcall):
            self.outcome.other_exits += 1
            if record.number == HC_ROUND:
                self.outcome.dirty.append(self.harvest() | self.ring_carry)
                self.ring_carry = set()
        return None


def run_mode(kvm: Kvm, mode: str, pattern: WritePattern, memory: int, rounds: int,
             ring_entries: int = 4096, *, user: bool = True) -> DirtyLogOutcome:
    """One guest run in ``mode``; the dirty set of each round."""
    if mode not in MODES:
        raise ConfigError("modes", f"{mode!r} is not one of {MODES}")
    if rounds < 1:
        raise ConfigError("rounds", "must be at least 1")
    flags = {"log": abi.MemFlag.LOG_DIRTY_PAGES, "ring": abi.MemFlag.LOG_DIRTY_PAGES,
             "trap": abi.MemFlag.READONLY}[mode]
    if mode == "ring":
        if not kvm.check_extension(abi.Cap.DIRTY_LOG_RING):
            raise ConfigError("modes", "this KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING)")
        if ring_entries < 1024 or ring_entries & (ring_entries - 1):
            # KVM keeps a reserve (64 entries + the CPU's PML buffer) below the soft limit
            raise ConfigError("ring_entries", "must be a power of two, at least 1024")
    outcome = DirtyLogOutcome(mode, pattern.pages)
    slots = default_slots(memory, data_flags=flags)
    with KvmGuest(kvm, GuestMemory(memory), "write_set", slots=slots,
                  dirty_ring=ring_entries if mode == "ring" else 0, user=user) as guest:
        collector = _Collector(guest, mode, outcome)
        at = put_list(guest, pattern.addresses)
        guest.start(r8=at, r9=len(pattern), r10=rounds, r11=PATTERN)
        result = guest.run(collector)
        outcome.run_seconds = result.seconds
        outcome.kernel_exits, outcome.insn_emulated = result.kernel_exits, result.insn_emulated
        outcome.kernel_pf = result.kernel.get("pf_taken", 0)
        for i, address in enumerate(pattern.addresses[:8]):  # the stores reached memory
            if guest.memory.read_u64(int(address)) != PATTERN + rounds - 1:
                raise ConfigError("mode", f"{mode}: write {i} did not reach memory")
    return outcome


class DirtyLog:
    """Dirty logging on KVM: bitmap, ring and write-protect traps."""
    name = "dirty-log"

    def rows(self, p: DirtyLogParams) -> Iterator[Row]:
        """One row per mode."""
        memory = p.memory_mib << 20
        pattern = WritePattern.random(memory, p.pages, p.seed)
        with Kvm.open() as kvm:
            for mode in p.modes:
                o = run_mode(kvm, mode, pattern, memory, p.rounds, p.ring_entries,
                             user=user_mode(p.guest_cpl))
                yield {
                    "mode": mode,
                    "rounds": p.rounds,
                    "pages_written": len(o.written),
                    "writes": o.writes,
                    "dirty_pages_reported": len(o.dirty[-1]) if o.dirty else 0,
                    "exact": o.exact,
                    "exits": o.write_exits,
                    "exits_per_write": round(o.write_exits / max(o.writes, 1), 4),
                    "hypercall_exits": o.other_exits,
                    "us_per_write": round(o.run_seconds * 1e6 / max(o.writes, 1), 3),
                    "harvest_pages_per_s": round(o.harvested_pages / o.harvest_seconds)
                    if o.harvest_seconds > 0 else None,
                    "kernel_exits": o.kernel_exits,
                    "insn_emulated": o.insn_emulated,
                    "kvm_exits_per_write": round(o.kernel_exits / max(o.writes, 1), 4),
                    "kvm_pf_per_write": round(o.kernel_pf / max(o.writes, 1), 4),
                    **flavour_columns(p.guest_cpl),
                }
