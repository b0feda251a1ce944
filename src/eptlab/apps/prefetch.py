"""The prefetch hypercall: a guest announces a guest-physical region before touching it, and the
hypervisor backs and maps it and warms the calling vCPU's GPA->HPA caches, so that the accesses
that follow take fewer EPT violations and shorter walks. Several vCPUs remap pages of the same
VM meanwhile (copy-on-write breaks, page migration, balloon releases); an EPT lock, INVEPT and
the shootdown protocol keep every access away from host frames that were freed or given to
someone else, and a checker follows every access to prove it.

The hypercall
    ``VMCALL`` with RAX = :data:`PREFETCH_HYPERCALL`, arguments ``(gpa, length, flags)``:
    ``[gpa, gpa + length)`` must be 4 KiB aligned and inside guest memory (else ``-EINVAL``).
    ``flags``: :data:`PREFETCH_2M` backs holes with 2 MiB pages where a whole 2 MiB region of the
    range is unmapped (4 KiB elsewhere); :data:`PREFETCH_NO_WARM` skips the warming. The handler
    returns 0 at once and queues the work as steps on the calling vCPU (it runs no guest code
    until the last step), so the prefetch takes time and other vCPUs run between its steps.

The prefetch, batch by batch (``batch`` 4 KiB pages, or one 2 MiB page)
    1. *scan* (takes the EPT lock): read each entry of the batch; a hole gets a frame (from the
       :class:`FramePool`, zeroed) and the leaf value to install; a present leaf is read to be
       rewritten with the software bit :data:`PREFETCHED` (bit 52: ignored by the processor,
       SDM Vol. 3C Table 29-6) -- a read-modify-write of the entry.
    2. *commit*: store every planned entry value, release the lock. Time passes between scan and
       commit (the scheduler runs a quantum of every other vCPU), as while a real handler zeroes
       frames; the lock is what keeps another EPT editor out of that window. No INVEPT is
       needed: entries only go from not present to present, or change an ignored bit.
    3. *warm*: a read through the guest kernel's direct map on the calling vCPU, for the first
       page of every 2 MiB region of the range (and every 2 MiB page) and for the first
       ``warm_pages`` pages (64: what the nested TLB holds). Its two-dimensional walk fills that
       vCPU's EPT paging-structure caches for the region -- a later walk of any GPA in it reads
       only the last EPT entry -- and its nested TLB (GPA->HPA) for the page: GPA-side caches
       that the guest's own accesses hit whatever their guest-virtual address. It also leaves
       direct-map entries in the TLBs and lines in the data caches. Its cost is the engine cycles
       of those reads (plus any exit they take), charged to the prefetch, not to the guest's
       accesses. Without a guest kernel (no direct map) nothing is warmed.

Remapping (another vCPU's activity) and the protocol
    Every EPT editor takes :class:`EptLock`: the prefetch (scan..commit), the EPT-violation
    handler (lazy backing of a first touch, copy-on-write break on a write to a shared page), page
    migration (:meth:`PrefetchApp.migrate`, a host-side event placed between a vCPU's accesses),
    the balloon (:data:`BALLOON_HYPERCALL`, the guest's balloon driver releasing a page) and KSM
    merging (:meth:`PrefetchApp.merge`, which makes two pages share one read-only frame: the
    copy-on-write breaks come from the guest's writes to them). A remap, in the correct protocol:
    take the lock, edit the entry, INVEPT on every vCPU of the VM (:meth:`VM.shootdown`) *before*
    the old frame is released or reused, release the lock. Released frames go to the
    :class:`FramePool` (LIFO, like Linux's per-CPU free lists), so a frame freed by one remap is
    soon given to another page: a stale translation then reaches another page's data.

    The simulation runs one thing at a time, so "waiting for the lock" is modelled by letting the
    holder finish: a vCPU that finds the lock held by a prefetch between its scan and commit runs
    that prefetch's commit first (the holder finishes its critical section while the waiter
    spins), then takes the lock; ``lock.contended`` counts these waits.

    Broken variants, to prove the checker can fail: ``protocol="no_invept"`` (remaps release the
    old frame without a shootdown: other vCPUs, and the initiator, keep using it from their TLBs)
    and ``protocol="no_lock"`` (nobody takes the lock: a remap or a first-touch backing lands
    between a prefetch's scan and commit, and the commit writes back the stale entry -- the freed
    frame -- or overwrites a page another vCPU already backed and cached).

The checker (:class:`StaleUseChecker`)
    :class:`ObservedEngine` is the engine with every performed access's HPA recorded and handed
    to observers after each run (before any Python changes anything). For each access the checker
    finds its GPA (software walk of the vCPU's guest page tables, cached per page) and judges the
    frame against the ground truth at that moment -- the EPTs of all VMs and the host's reference
    counts: *freed* (no reference left, or parked in a free-frame cache such as the pool),
    *reassigned* (the access's GPA no longer maps that frame: it belongs to another page, to
    nobody, or to the hypervisor), *aliased* (the GPA maps it, but more mappings point at it than
    it has references: a dangling entry shares a frame that was given to someone else). Each is a
    stale use.

Costs (cycles, the fields of :class:`Costs`, taken from the active cost profile like the
copy-on-write app's; the default profile's values in brackets): a VM exit round trip
(1,500); an INVEPT (500); a shootdown costs each other vCPU an IPI exit plus its INVEPT; writing
an entry (20); allocating a frame (200); zeroing or copying (8 bytes per cycle); delivering a
guest page fault (1,000). Per-access cycles
(:class:`CycleMeter`): the engine's translation and data cycles of the access (measured by running
accesses one at a time), plus what it caused -- the failed attempt, the exit and the handler's
work (backing, copy, shootdown) are added to the access that exited; an IPI is added to the next
access of the vCPU it interrupted; a remap placed in a vCPU's program is charged to that vCPU.
The engine charges no cycles for a walk that ends in an exit (its references do fill the caches);
the meter costs it from the engine's statistics: the walk start plus each walk reference at the
latency of the cache level that served it.

Modelling limits
    A remap is atomic between accesses (its IPIs are delivered at once), so inside one remap the
    order "shoot down, then release" is not observable here: the broken variant modelled is the
    missing shootdown, not a late one. The guest kernel's own first writes to unbacked memory
    (:meth:`VM.write_u64` backs pages through :meth:`VM.back`) do not take the app's lock; the
    scenarios keep them (guest page-table pages) out of prefetched ranges. The commit stores
    whole entries, which would also overwrite EPT accessed/dirty flags the processor set since the
    scan; the scenarios run without EPT A/D.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal, Protocol

import numpy as np
import numpy.typing as npt

from ..arch.access import Access
from ..arch.bits import PAGE_SHIFT, PAGE_SIZE, PageSize, bits
from ..arch.ept import Ept, EptEntry, ept_address, ept_is_leaf, ept_is_present
from ..arch.exits import EptQual, EptViolation, ExitReason, GuestFault, VmExit
from ..costs import active_profile
from ..errors import ConfigError, EptlabError, MappingError, OutOfMemory
from ..guest import GuestKernel
from ..guest.layout import DIRECT_MAP_BASE, KernelImage
from ..hv import VCPU, VM, Exit, ExitAction, GuestAction, Hypercall, Hypervisor, Run
from ..hv.host import HostMemory
from ..hv.program import Segment
from ..memory.physical import PhysicalMemory
from ..mmu.config import CacheConfig, MmuConfig
from ..mmu.context import CpuFeatures
from ..mmu.engine import Accesses, ChunkResult, Engine
from ..mmu.kernels import layout as L
from ..mmu.peek import Peeker
from ..traces.model import TraceChunk

if TYPE_CHECKING:
    from ..guest.kernel import Process

I64 = npt.NDArray[np.int64]

PREFETCH_HYPERCALL = 0x5046  # "PF"
BALLOON_HYPERCALL = 0x424C  # "BL"
PREFETCH_2M = 1 << 0
PREFETCH_NO_WARM = 1 << 1
EINVAL = 22

PREFETCHED = 1 << 52  # software-available EPT bit: "covered by a prefetch"
COW = 1 << 53  # software-available EPT bit: read-only because the frame is shared (KSM)

ProtocolName = Literal["correct", "no_lock", "no_invept"]
PROTOCOLS: tuple[ProtocolName, ...] = ("correct", "no_lock", "no_invept")
_2M = PageSize.SIZE_2M.value
_4K = PageSize.SIZE_4K


def _cycles(key: str) -> int:
    return active_profile().cycles(key)


@dataclass(frozen=True)
class Costs:
    """Cycles charged for work the engine does not model (see the module docstring)."""

    exit_cycles: int = field(default_factory=lambda: _cycles("vmexit_cycles"))
    invept_cycles: int = field(default_factory=lambda: _cycles("invept_cycles"))
    entry_cycles: int = field(default_factory=lambda: _cycles("ept_edit_cycles"))
    alloc_cycles: int = field(default_factory=lambda: _cycles("frame_alloc_cycles"))
    bytes_per_cycle: float = field(
        default_factory=lambda: active_profile()["copy_bytes_per_cycle"]
    )
    guest_fault_cycles: int = field(default_factory=lambda: _cycles("guest_fault_cycles"))

    def page(self, size: int) -> int:
        """Allocate, zero (or copy) and map one page of ``size`` bytes."""
        return self.alloc_cycles + int(size // self.bytes_per_cycle) + self.entry_cycles

    @property
    def ipi_cycles(self) -> int:
        """What a shootdown costs each vCPU it interrupts."""
        return self.exit_cycles + self.invept_cycles


# --- the EPT lock and the frame pool -------------------------------------------------------------


class LockHolder(Protocol):
    """Something that can hold the EPT lock across scheduling points and finish on demand."""

    name: str

    def finish_critical_section(self) -> None: ...


class EptLock:
    """The VM's EPT lock. ``enforced=False`` (the ``no_lock`` variant) makes it a no-op.

    Only a prefetch holds it across scheduling points (from scan to commit); every other editor
    holds it inside one synchronous call. A waiter lets the holder finish (see module docs)."""

    def __init__(self, enforced: bool = True) -> None:
        self.enforced = enforced
        self.holder: LockHolder | str | None = None
        self.acquisitions = 0
        self.contended = 0

    def acquire(self, who: LockHolder | str) -> None:
        if not self.enforced:
            return
        while self.holder is not None:
            holder = self.holder
            if isinstance(holder, str):
                raise EptlabError(f"EPT lock: {who!r} waits for {holder!r}, which cannot progress")
            self.contended += 1
            holder.finish_critical_section()
            if self.holder is holder:
                raise EptlabError(f"EPT lock: {holder.name} did not release the lock")
        self.holder = who
        self.acquisitions += 1

    def release(self, who: LockHolder | str) -> None:
        if not self.enforced:
            return
        if self.holder is not who:
            raise EptlabError(f"EPT lock released by {who!r}, held by {self.holder!r}")
        self.holder = None


class FramePool:
    """A LIFO cache of released 4 KiB host frames (the pool keeps the frame's last reference).

    :meth:`release` drops a mapping's reference: a frame still mapped elsewhere only loses the
    reference; a frame whose last mapping goes is parked here (up to ``capacity``) and handed
    out, zeroed, by the next :meth:`alloc` -- so freed frames are reused at once, as a real
    allocator's hot free lists do. Parked frames count as free for the checker."""

    def __init__(self, host: HostMemory, capacity: int = 64) -> None:
        self.host, self.capacity = host, capacity
        self._frames: list[int] = []
        self.reused = 0

    def alloc(self) -> int:
        if self._frames:
            hpa = self._frames.pop()
            self.host.memory.discard(hpa >> PAGE_SHIFT)  # zeroed for its new owner
            self.reused += 1
            return hpa
        return self.host.alloc(_4K)

    def release(self, hpa: int) -> None:
        if self.host.refs(hpa) == 1 and len(self._frames) < self.capacity:
            self._frames.append(hpa)
        else:
            self.host.release(hpa)

    def held(self) -> Collection[int]:
        """HPAs of the parked frames."""
        return self._frames


# --- the application ---------------------------------------------------------------------------


class PrefetchApp:
    """The prefetch hypercall and the remapping operations of one VM, under one protocol.

    One per hypervisor (hypercall numbers are global)::

        hv = Hypervisor()
        engine = ObservedEngine.install(hv)       # optional: to check or to meter accesses
        vm = hv.create_vm("guest", 64 << 20)      # lazily backed
        app = PrefetchApp(hv, vm)                 # registers the hypercalls and the handler
        engine.observers.append(checker := StaleUseChecker(hv, holders=[app.pool]))
        ...                                       # vCPUs, a guest, programs with
        vcpu.load([Hypercall(PREFETCH_HYPERCALL, (gpa, length, 0)), Run(chunk)])
        hv.run()
        assert checker.stale_uses == 0

    :func:`play` does all of it for a :class:`Scenario`.
    """

    def __init__(
        self,
        hv: Hypervisor,
        vm: VM,
        *,
        protocol: ProtocolName = "correct",
        batch: int = 16,
        warm_pages: int = 64,
        costs: Costs | None = None,
        pool_capacity: int = 64,
        meter: CycleMeter | None = None,
        number: int = PREFETCH_HYPERCALL,
        balloon_number: int = BALLOON_HYPERCALL,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ConfigError("protocol", f"{protocol!r} is not one of {', '.join(PROTOCOLS)}")
        if batch < 1:
            raise ConfigError("batch", f"{batch} is not a positive number of pages")
        self.hv, self.vm, self.protocol, self.batch = hv, vm, protocol, batch
        self.warm_pages = warm_pages
        self.costs = costs or Costs()
        self.lock = EptLock(enforced=protocol != "no_lock")
        self.pool = FramePool(hv.host, pool_capacity)
        self.meter = meter
        self.counters: Counter[str] = Counter()
        self.prefetch_cycles: Counter[int] = Counter()  # by vCPU engine id
        self.warm_translation_cycles: Counter[int] = Counter()
        self.warm_accesses: Counter[int] = Counter()
        self.prefetches: list[Prefetch] = []
        self._busy: dict[int, Prefetch] = {}  # engine id -> prefetch in progress
        self._maxphy = vm.ept.maxphyaddr
        self._addr_mask = bits(self._maxphy - 1, PAGE_SHIFT)
        hv.hypercall(number, "prefetch")(self._prefetch_hypercall)
        hv.hypercall(balloon_number, "balloon")(self._balloon_hypercall)
        hv.on(ExitReason.EPT_VIOLATION, self._on_ept_violation)

    # -- accounting ---------------------------------------------------------------------------

    def charge(self, vcpu: VCPU | None, cycles: int) -> None:
        """Charge hypervisor work: to the prefetch when the vCPU is inside one, else to the
        vCPU's next access (through the meter); host-side work (``vcpu=None``) is not charged."""
        if vcpu is None:
            self.counters["host_cycles"] += cycles
        elif vcpu.engine_id in self._busy:
            self.prefetch_cycles[vcpu.engine_id] += cycles
        elif self.meter is not None:
            self.meter.charge(vcpu.engine_id, cycles)

    def _shootdown(self, initiator: VCPU | None) -> None:
        """INVEPT on every vCPU of the VM, unless the protocol is the broken ``no_invept``."""
        if self.protocol == "no_invept":
            self.counters["shootdowns_skipped"] += 1
            return
        self.vm.shootdown(initiator)  # counted in the VM's counters
        self.charge(initiator, self.costs.invept_cycles)
        for v in self.vm.vcpus:
            if v is not initiator:
                self.charge(v, self.costs.ipi_cycles)

    # -- EPT entries --------------------------------------------------------------------------

    def _read(self, slot: int) -> int:
        return self.hv.host.memory.read_u64(slot)

    def _write(self, slot: int, value: int) -> None:
        self.hv.host.memory.write_u64(slot, value)

    def leaf_value(self, hpa: int, size: PageSize) -> int:
        """A fresh read-write-execute write-back leaf, marked :data:`PREFETCHED`."""
        entry = EptEntry(level=size.level, address=hpa, page_size=size != _4K)
        return entry.encode(self._maxphy) | PREFETCHED

    def _small_leaf(self, gpa: int) -> tuple[int, int] | None:
        """(entry address, value) of the 4 KiB leaf mapping ``gpa``, splitting a large page
        first; None if unmapped."""
        leaf = self.vm.ept.lookup(gpa)
        if leaf is None:
            return None
        if leaf.level > 1:
            self.vm.ept.split(gpa)
            self.counters["splits"] += 1
            leaf = self.vm.ept.lookup(gpa)
            assert leaf is not None
        return leaf.entry_address, leaf.value

    def _frame(self, value: int) -> int:
        return ept_address(value, 1, self._maxphy)

    # -- the hypercall ------------------------------------------------------------------------

    def _prefetch_hypercall(self, vcpu: VCPU, args: tuple[int, ...]) -> int:
        gpa, length, flags = (tuple(args) + (0, 0, 0))[:3]
        if vcpu.vm is not self.vm or vcpu.engine_id in self._busy:
            return -EINVAL
        if length <= 0 or gpa % PAGE_SIZE or length % PAGE_SIZE or gpa + length > self.vm.memory:
            self.counters["prefetch_rejected"] += 1
            return -EINVAL
        prefetch = Prefetch(
            self,
            vcpu,
            gpa,
            length,
            PageSize.SIZE_2M if flags & PREFETCH_2M else _4K,
            warm=not flags & PREFETCH_NO_WARM,
        )
        self.prefetches.append(prefetch)
        self._busy[vcpu.engine_id] = prefetch
        self.counters["prefetches"] += 1
        self.prefetch_cycles[vcpu.engine_id] += self.costs.exit_cycles
        vcpu.program = itertools.chain(prefetch.segments(), vcpu.program)
        return 0

    def _done(self, prefetch: Prefetch) -> None:
        self._busy.pop(prefetch.vcpu.engine_id, None)

    def warm_address(self, vcpu: VCPU, gpa: int) -> int | None:
        """A guest-virtual address the vCPU can read ``gpa`` through (the guest kernel's direct
        map, as a signed 64-bit value), or None if there is none."""
        if not isinstance(vcpu.guest_os, GuestKernel):
            return None
        return DIRECT_MAP_BASE - (1 << 64) + gpa

    # -- exits --------------------------------------------------------------------------------

    def _on_ept_violation(self, exit_: Exit) -> ExitAction | None:
        record = exit_.record
        if exit_.vcpu.vm is not self.vm or not isinstance(record, EptViolation):
            return None
        if not 0 <= record.gpa < self.vm.memory:
            return None
        rights = EptQual.READABLE | EptQual.WRITABLE | EptQual.EXECUTABLE
        if not record.qualification & rights:
            fixed = self._back_on_fault(exit_.vcpu, record.gpa)
        elif record.qualification & EptQual.WRITE and not record.qualification & EptQual.WRITABLE:
            fixed = self._cow_break(exit_.vcpu, record.gpa)
        else:
            fixed = False
        return ExitAction.RETRY if fixed else None

    def back(self, gpa: int, vcpu: VCPU | None = None) -> bool:
        """Back the page holding ``gpa`` (a first touch) under the lock; False if mapped."""
        self.lock.acquire("back")
        try:
            if self.vm.ept.lookup(gpa) is not None:
                return False
            size = self.vm.backing
            base = gpa & ~(size - 1)
            hpa = self.pool.alloc() if size == _4K else self.hv.host.alloc(size)
            try:
                self.vm.ept.tables.map(base, hpa, size)
            except MappingError:  # a table below the large page: back 4 KiB instead
                self.hv.host.release(hpa, size)
                size, base = _4K, gpa & ~(PAGE_SIZE - 1)
                hpa = self.pool.alloc()
                self.vm.ept.tables.map(base, hpa, size)
            self.vm.counters["pages_backed"] += 1
            self.counters["lazy_backings"] += 1
            self.charge(vcpu, self.costs.page(size))
            return True
        finally:
            self.lock.release("back")

    def _back_on_fault(self, vcpu: VCPU, gpa: int) -> bool:
        if not self.back(gpa, vcpu):
            # mapped meanwhile (by a prefetch). The vCPU may have walked through a stale cached
            # paging-structure entry: flush its GPA-side caches so that the retry walks afresh.
            self.vm.invept([vcpu])
            self.counters["fault_raced"] += 1
        return True

    def _cow_break(self, vcpu: VCPU, gpa: int) -> bool:
        """A write to a page made read-only by :meth:`merge`: give the writer its own copy."""
        self.lock.acquire("cow")
        try:
            leaf = self.vm.ept.lookup(gpa)
            if leaf is None or leaf.value & Ept.W:
                # fixed meanwhile; the vCPU may still cache the read-only entry: flush it
                self.vm.invept([vcpu])
                self.counters["cow_raced"] += 1
                return True
            if not leaf.value & COW:
                return False  # read-only for another reason: not ours
            found = self._small_leaf(gpa)
            assert found is not None
            slot, value = found
            old = self._frame(value)
            if self.hv.host.refs(old) > 1:
                new = self.pool.alloc()
                self.hv.host.memory.copy_frame(old >> PAGE_SHIFT, new >> PAGE_SHIFT)
                self._write(slot, (value & ~self._addr_mask & ~COW) | new | Ept.W)
                self._shootdown(vcpu)
                self.pool.release(old)
                self.counters["cow_breaks"] += 1
                self.charge(vcpu, self.costs.page(PAGE_SIZE))
            else:  # the other sharers are gone: take the frame over, no copy
                self._write(slot, (value & ~COW) | Ept.W)
                self.vm.invept([vcpu])  # drop the read-only translation (no spurious fault)
                self.counters["cow_reuses"] += 1
                self.charge(vcpu, self.costs.entry_cycles + self.costs.invept_cycles)
            return True
        finally:
            self.lock.release("cow")

    # -- remapping operations -----------------------------------------------------------------

    def migrate(self, vcpu: VCPU | None, gpa: int) -> bool:
        """Move the page holding ``gpa`` to a new host frame (copy, remap, shoot down, release
        the old frame). False if the page is not mapped."""
        self.lock.acquire("migrate")
        try:
            found = self._small_leaf(gpa)
            if found is None:
                self.counters["migrate_skipped"] += 1
                return False
            slot, value = found
            old = self._frame(value)
            new = self.pool.alloc()
            self.hv.host.memory.copy_frame(old >> PAGE_SHIFT, new >> PAGE_SHIFT)
            self._write(slot, (value & ~self._addr_mask) | new)
            self._shootdown(vcpu)
            self.pool.release(old)
            self.counters["migrations"] += 1
            self.charge(vcpu, self.costs.page(PAGE_SIZE))
            return True
        finally:
            self.lock.release("migrate")

    def balloon(self, vcpu: VCPU | None, gpa: int) -> bool:
        """Release the page holding ``gpa`` to the host (unmap, shoot down, release). False if
        it was not mapped. A later touch backs it again."""
        self.lock.acquire("balloon")
        try:
            found = self._small_leaf(gpa)
            if found is None:
                self.counters["balloon_skipped"] += 1
                return False
            slot, value = found
            self._write(slot, 0)
            self._shootdown(vcpu)
            self.pool.release(self._frame(value))
            self.counters["balloon_releases"] += 1
            self.charge(vcpu, self.costs.entry_cycles)
            return True
        finally:
            self.lock.release("balloon")

    def _balloon_hypercall(self, vcpu: VCPU, args: tuple[int, ...]) -> int:
        self.charge(vcpu, self.costs.exit_cycles)
        if not args or not 0 <= args[0] < self.vm.memory:
            return -EINVAL
        return int(self.balloon(vcpu, args[0]))

    def merge(self, vcpu: VCPU | None, keep: int, dup: int) -> bool:
        """KSM: let the page at ``dup`` share the frame of the page at ``keep`` (contents taken
        as identical), both read-only and marked :data:`COW`; release ``dup``'s frame. A write
        to either then breaks the sharing. False if either is unmapped or they already share."""
        self.lock.acquire("merge")
        try:
            a, b = self._small_leaf(keep), self._small_leaf(dup)
            if a is None or b is None or self._frame(a[1]) == self._frame(b[1]):
                self.counters["merge_skipped"] += 1
                return False
            frame, old = self._frame(a[1]), self._frame(b[1])
            self._write(a[0], (a[1] & ~Ept.W) | COW)
            self._write(b[0], (b[1] & ~self._addr_mask & ~Ept.W) | frame | COW)
            self.hv.host.share(frame)
            self._shootdown(vcpu)
            self.pool.release(old)
            self.counters["merges"] += 1
            self.charge(vcpu, 2 * self.costs.entry_cycles)
            return True
        finally:
            self.lock.release("merge")


class Prefetch:
    """One prefetch hypercall in progress: steps (scan, commit, warm per batch) that run as
    :class:`~eptlab.hv.GuestAction` segments on the calling vCPU."""

    def __init__(
        self, app: PrefetchApp, vcpu: VCPU, gpa: int, length: int, size: PageSize, warm: bool
    ) -> None:
        self.app, self.vcpu, self.gpa, self.length, self.size = app, vcpu, gpa, length, size
        self.warm = warm
        self.name = f"prefetch@{vcpu.name}"
        self.batches = self._batches()
        phases = ("scan", "commit", "warm") if warm else ("scan", "commit")
        self.steps = [(p, b) for b in range(len(self.batches)) for p in phases]
        self.next_step = 0
        self._plan: list[tuple[int, int]] = []  # (entry address, value) to store at commit
        self._touched: list[int] = []  # GPAs of the pages (or 2 MiB pages) of the batch
        self.pages_backed = 0
        self.entries_rewritten = 0
        self._new_frames = 0

    def _batches(self) -> list[list[tuple[int, PageSize]]]:
        units: list[tuple[int, PageSize]] = []
        end = self.gpa + self.length
        address = self.gpa
        while address < end:
            base = address & ~(_2M - 1)
            if self.size == PageSize.SIZE_2M and base == address and base + _2M <= end:
                units.append((base, PageSize.SIZE_2M))
                address += _2M
            else:
                units.append((address, _4K))
                address += PAGE_SIZE
        batches: list[list[tuple[int, PageSize]]] = []
        for unit in units:
            if unit[1] != _4K or not batches or len(batches[-1]) >= self.app.batch:
                batches.append([])
            if batches[-1] and batches[-1][0][1] != _4K:
                batches.append([])
            batches[-1].append(unit)
        return batches

    def segments(self) -> Iterator[Segment]:
        for k, (phase, b) in enumerate(self.steps):
            yield GuestAction(self._action(k), label=f"prefetch-{phase}-{b}")

    def _action(self, k: int) -> Callable[[VCPU], None]:
        def step(_vcpu: VCPU) -> None:
            self.advance_to(k)

        return step

    @property
    def done(self) -> bool:
        return self.next_step >= len(self.steps)

    def advance_to(self, k: int) -> None:
        """Run the steps up to ``k`` that have not run yet (a lock waiter may have run some)."""
        while self.next_step <= k:
            phase, b = self.steps[self.next_step]
            self.next_step += 1
            getattr(self, f"_{phase}")(b)
        if self.done:
            self.app._done(self)

    def finish_critical_section(self) -> None:
        while self.app.lock.holder is self:
            self.advance_to(self.next_step)

    # -- the steps ------------------------------------------------------------------------------

    def _scan(self, b: int) -> None:
        app = self.app
        app.lock.acquire(self)
        tables, costs = app.vm.ept.tables, app.costs
        self._plan, self._touched, self._new_frames = [], [], 0
        for gpa, size in self.batches[b]:
            if size == PageSize.SIZE_2M:
                try:
                    slot = tables.entry_address(gpa, 2, create=True)
                except MappingError:
                    continue  # inside a 1 GiB page: already mapped
                value = app._read(slot)
                if not ept_is_present(value):
                    hpa = app.hv.host.alloc(size)
                    self._plan.append((slot, app.leaf_value(hpa, size)))
                    self._touched.append(gpa)
                    self.pages_backed += 1
                    self._new_frames += 1
                    app.prefetch_cycles[self.vcpu.engine_id] += costs.page(size)
                    continue
                if ept_is_leaf(value, 2):
                    self._plan.append((slot, value | PREFETCHED))
                    self._touched.append(gpa)
                    self.entries_rewritten += 1
                    continue
                for page in range(gpa, gpa + _2M, PAGE_SIZE):  # a 4 KiB table: page by page
                    self._scan_4k(page)
            else:
                self._scan_4k(gpa)

    def _scan_4k(self, gpa: int) -> None:
        app = self.app
        try:
            slot = app.vm.ept.tables.entry_address(gpa, 1, create=True)
        except MappingError:
            return  # inside a large page: already mapped
        value = app._read(slot)
        if ept_is_present(value):
            self._plan.append((slot, value | PREFETCHED))
            self.entries_rewritten += 1
        else:
            hpa = app.pool.alloc()
            self._plan.append((slot, app.leaf_value(hpa, _4K)))
            self.pages_backed += 1
            self._new_frames += 1
            app.prefetch_cycles[self.vcpu.engine_id] += app.costs.page(PAGE_SIZE)
        self._touched.append(gpa)

    def _commit(self, b: int) -> None:
        app = self.app
        for slot, value in self._plan:  # blind stores: the lock made the scan's view current
            app._write(slot, value)
        app.prefetch_cycles[self.vcpu.engine_id] += len(self._plan) * app.costs.entry_cycles
        app.vm.counters["pages_backed"] += self._new_frames
        app.counters["prefetch_entries"] += len(self._plan)
        app.lock.release(self)

    def _worth_warming(self, gpa: int) -> bool:
        """The first page of each 2 MiB region of the range (its EPT paging-structure-cache
        entries serve every page of the region) and the first ``warm_pages`` pages (what the
        nested TLB can hold of the pages the guest touches first)."""
        first_in_region = gpa % _2M == 0 or gpa == self.gpa
        return first_in_region or gpa < self.gpa + self.app.warm_pages * PAGE_SIZE

    def _warm(self, b: int) -> None:
        app, vcpu = self.app, self.vcpu
        chosen = [g for g in self._touched if self._worth_warming(g)]
        addresses = [app.warm_address(vcpu, gpa) for gpa in chosen]
        gvas = [a for a in addresses if a is not None]
        if len(gvas) < len(addresses):
            app.counters["warm_skipped"] += len(addresses) - len(gvas)  # no direct map
        if not gvas:
            return
        engine = app.hv.engine
        vid = vcpu.engine_id
        accesses = Accesses.build(np.array(gvas, np.int64), Access.READ, 0, vid)
        before = engine.stats(vid)
        pos = 0
        with labelled(engine, "warm"):
            while pos < len(accesses):
                result = engine.run(accesses, pos)
                pos = result.stopped_at
                if result.fault is not None:
                    os_ = vcpu.guest_os
                    if os_ is None or not os_.handle_fault(vcpu, result.fault):
                        pos += 1
                        app.counters["warm_unresolved"] += 1
                elif result.exit is not None:
                    app.prefetch_cycles[vid] += app.costs.exit_cycles
                    app.hv.handle(Exit(vcpu, result.exit), expect=ExitAction.RETRY)
        after = engine.stats(vid)
        app.prefetch_cycles[vid] += after.cycles - before.cycles
        app.warm_translation_cycles[vid] += after.translation_cycles - before.translation_cycles
        app.warm_accesses[vid] += after.accesses - before.accesses
        app.counters["warmed"] += len(gvas)


# --- observing every access ---------------------------------------------------------------------


@dataclass(frozen=True)
class ObservedRun:
    """One engine run as observers see it: ``accesses[start:stop]`` were performed."""

    accesses: Accesses
    start: int
    stop: int
    hpa: I64  # HPA of each performed access
    cycles: I64 | None  # engine cycles of each performed access (per-access mode)
    exit: VmExit | None
    fault: GuestFault | None
    failed_cycles: int  # cycles of the attempt that stopped the run (per-access mode)
    label: str

    @property
    def vcpu(self) -> npt.NDArray[np.int32]:
        return self.accesses.vcpu[self.start : self.stop]

    @property
    def gva(self) -> I64:
        return self.accesses.gva[self.start : self.stop]


Observer = Callable[[ObservedRun], None]


class ObservedEngine(Engine):
    """The engine, recording the HPA of every performed access and handing each run to the
    observers right after it (before any software changes a table). With
    ``per_access_cycles`` it runs accesses one at a time and reports each one's cycles."""

    def __init__(
        self,
        memory: PhysicalMemory,
        config: MmuConfig | None = None,
        features: CpuFeatures | None = None,
        *,
        per_access_cycles: bool = False,
    ) -> None:
        super().__init__(memory, config, features)
        self.observers: list[Observer] = []
        self.per_access_cycles = per_access_cycles
        self.label = "guest"

    @classmethod
    def install(cls, hv: Hypervisor, *, per_access_cycles: bool = False) -> ObservedEngine:
        """Replace ``hv``'s engine (same memory, configuration and features) before any vCPU
        exists."""
        if any(vm.vcpus for vm in hv.vms):
            raise ConfigError("ObservedEngine", "install it before adding vCPUs")
        engine = cls(
            hv.host.memory, hv.engine.config, hv.features, per_access_cycles=per_access_cycles
        )
        hv.engine = engine
        return engine

    def run(
        self,
        accesses: Accesses,
        start: int = 0,
        *,
        record_hpa: bool = False,
        log_references: int = 0,
    ) -> ChunkResult:
        if not self.observers:
            return super().run(
                accesses, start, record_hpa=record_hpa, log_references=log_references
            )
        cycles: I64 | None = None
        failed = 0
        if self.per_access_cycles and not log_references:
            result, cycles, failed = self._run_singly(accesses, start)
        else:
            result = super().run(accesses, start, record_hpa=True, log_references=log_references)
        assert result.hpa is not None
        observed = ObservedRun(
            accesses,
            start,
            result.stopped_at,
            result.hpa[start : result.stopped_at],
            cycles,
            result.exit,
            result.fault,
            failed,
            self.label,
        )
        for observer in self.observers:
            observer(observed)
        return result if record_hpa else dataclasses.replace(result, hpa=None)

    def _run_singly(self, accesses: Accesses, start: int) -> tuple[ChunkResult, I64, int]:
        n = len(accesses)
        hpa = np.full(n, -1, np.int64)
        cycles = np.zeros(max(0, n - start), np.int64)
        for i in range(start, n):
            v = int(accesses.vcpu[i])
            one = Accesses(
                accesses.gva[i : i + 1],
                accesses.kind[i : i + 1],
                accesses.user[i : i + 1],
                accesses.vcpu[i : i + 1],
            )
            before = self._stats[v].copy()
            r = super().run(one, 0, record_hpa=True)
            spent = int(self._stats[v, L.ST_CYCLES] - before[L.ST_CYCLES])
            if not r.done:
                failed = self._failed_walk_cycles(self._stats[v] - before)
                return ChunkResult(i, r.exit, r.fault, hpa), cycles[: i - start], failed
            assert r.hpa is not None
            hpa[i] = r.hpa[0]
            cycles[i - start] = spent
        return ChunkResult(n, None, None, hpa), cycles, 0

    def _failed_walk_cycles(self, delta: I64) -> int:
        """Cycles of an attempt that ended in an exit or a fault. The kernels charge it
        nothing, but its statistics are counted: the walk start and each walk reference at the
        latency of the cache level that served it (paging-structure-cache probes, 1 cycle
        each, are not counted: a slight underestimate)."""
        served = delta[L.ST_WALK_CACHE : L.ST_WALK_CACHE + 4]
        latency = self._cost[4:8]
        return int(delta[L.ST_WALKS] * self._cost[3] + served @ latency)


@contextmanager
def labelled(engine: Engine, label: str) -> Iterator[None]:
    """Label the accesses run inside the block (e.g. "warm"), if the engine is observed."""
    if not isinstance(engine, ObservedEngine):
        yield
        return
    previous, engine.label = engine.label, label
    try:
        yield
    finally:
        engine.label = previous


# --- the stale-use checker ---------------------------------------------------------------------


class FrameHolder(Protocol):
    """A hypervisor component that keeps free frames (they count as freed)."""

    def held(self) -> Collection[int]: ...


@dataclass(frozen=True)
class StaleUse:
    vcpu: str
    label: str
    gva: int
    gpa: int
    hpa: int
    kind: str  # freed, reassigned, aliased


def ept_pages(vm: VM) -> tuple[I64, I64]:
    """Every 4 KiB guest-physical page the VM's EPT maps, and its host frame number (large
    pages expanded), read straight from the EPT tables in host memory."""
    tables = vm.ept.tables
    memory = vm.hv.host.memory
    maxphy = vm.ept.maxphyaddr
    gpas: list[I64] = []
    hpas: list[I64] = []
    stack = [(tables.root, tables.levels, 0)]
    while stack:
        table, level, base = stack.pop()
        words = memory.peek_frame(table >> PAGE_SHIFT)
        if words is None:
            continue
        present = (words & np.uint64(7)) != 0
        if tables.mbec:
            present |= (words & np.uint64(Ept.XU)) != 0
        index = np.nonzero(present)[0]
        if not len(index):
            continue
        values = words[index]
        shift = PAGE_SHIFT + 9 * (level - 1)
        if level == 1:
            leaf = np.ones(len(index), bool)
        elif level in (2, 3):
            leaf = (values & np.uint64(Ept.PS)) != 0
        else:
            leaf = np.zeros(len(index), bool)
        if leaf.any():
            li, lv = index[leaf].astype(np.int64), values[leaf]
            frames = (lv & np.uint64(bits(maxphy - 1, shift))).astype(np.int64) >> PAGE_SHIFT
            span = 1 << (9 * (level - 1))
            offsets = np.arange(span, dtype=np.int64)
            first_gpa = (base >> PAGE_SHIFT) + (li << (shift - PAGE_SHIFT))
            gpas.append((first_gpa[:, None] + offsets).ravel())
            hpas.append((frames[:, None] + offsets).ravel())
        mask = bits(maxphy - 1, PAGE_SHIFT)
        for i, value in zip(index[~leaf].tolist(), values[~leaf].tolist(), strict=True):
            stack.append((int(value) & mask, level - 1, base + (i << shift)))
    if not gpas:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(gpas), np.concatenate(hpas)


class StaleUseChecker:
    """Follows every access (an :class:`ObservedEngine` observer) and flags each use of a host
    frame that is freed or given to someone else at that moment (see the module docstring)."""

    MAX_EXAMPLES: ClassVar[int] = 20

    def __init__(self, hv: Hypervisor, *, holders: Sequence[FrameHolder] = ()) -> None:
        self.hv = hv
        self.holders = list(holders)
        self.checked = 0
        self.unresolved = 0  # accesses whose GVA the software walk could not translate
        self.by_kind: Counter[str] = Counter()
        self.examples: list[StaleUse] = []
        self._gpa_cache: dict[tuple[int, int], int] = {}  # (cr3, GVA page) -> GPA page
        self._peeker = Peeker(hv.host.memory, hv.features.maxphyaddr)

    @property
    def stale_uses(self) -> int:
        return sum(self.by_kind.values())

    def forget_guest_mappings(self) -> None:
        """Drop the cached GVA->GPA translations (call it after the guest remaps memory)."""
        self._gpa_cache.clear()

    def _vcpus(self) -> dict[int, VCPU]:
        return {v.engine_id: v for vm in self.hv.vms for v in vm.vcpus}

    def _guest_page(self, vcpu: VCPU, gva_page: int) -> int:
        """GPA page number of a GVA page number, by a read-only software walk (-1 if
        unmapped)."""
        key = (vcpu.guest.cr3, gva_page)
        cached = self._gpa_cache.get(key)
        if cached is not None:
            return cached
        gpa = self._peeker.gpa(vcpu.guest, vcpu.vmcs, gva_page << PAGE_SHIFT)
        if gpa is None:
            return -1
        self._gpa_cache[key] = gpa >> PAGE_SHIFT
        return gpa >> PAGE_SHIFT

    def __call__(self, run: ObservedRun) -> None:
        n = run.stop - run.start
        if n <= 0:
            return
        self._peeker.forget()  # the EPT may have changed since the last run was checked
        self.checked += n
        vids, gvas, hpas = run.vcpu, run.gva, run.hpa
        frames = hpas >> PAGE_SHIFT
        vcpus = self._vcpus()
        # GPA page of every access
        gpa_pages = np.full(n, -1, np.int64)
        keys = np.stack([vids.astype(np.int64), gvas >> PAGE_SHIFT], axis=1)
        unique, inverse = np.unique(keys, axis=0, return_inverse=True)
        inverse = inverse.ravel()
        resolved = np.array(
            [self._guest_page(vcpus[int(v)], int(p)) for v, p in unique.tolist()], np.int64
        )
        gpa_pages = resolved[inverse]
        # the ground truth now: every VM's EPT, the host's reference counts, parked frames
        snapshots = {id(vm): ept_pages(vm) for vm in self.hv.vms}
        all_frames = np.sort(np.concatenate([s[1] for s in snapshots.values()] or [frames[:0]]))
        holders: set[int] = set()
        for holder in self.holders:
            holders.update(h >> PAGE_SHIFT for h in holder.held())
        hv_owned: set[int] = set()
        for vm in self.hv.vms:
            hv_owned.update(t >> PAGE_SHIFT for t in vm.ept.tables.tables)
            hv_owned.update(
                v.vmcs.pml_address >> PAGE_SHIFT for v in vm.vcpus if v.vmcs.pml_enabled
            )
        used = np.unique(frames)
        refs = np.array([self.hv.host.refs(int(f) << PAGE_SHIFT) for f in used], np.int64)
        parked = np.array([int(f) in holders for f in used], bool)
        owned = np.array([int(f) in hv_owned for f in used], np.int64)
        mappers = np.searchsorted(all_frames, used, "right") - np.searchsorted(
            all_frames, used, "left"
        )
        where = np.searchsorted(used, frames)
        freed = ((refs == 0) | parked)[where]
        aliased_frame = (mappers > refs - owned - parked)[where]
        # what the access's own VM maps at its GPA now
        current = np.full(n, -1, np.int64)
        for vid in np.unique(vids).tolist():
            g_pages, h_frames = snapshots[id(vcpus[int(vid)].vm)]
            order = np.argsort(g_pages)
            g_sorted, h_sorted = g_pages[order], h_frames[order]
            sel = np.nonzero(vids == vid)[0]
            at = np.minimum(np.searchsorted(g_sorted, gpa_pages[sel]), max(0, len(g_sorted) - 1))
            if len(g_sorted):
                hit = g_sorted[at] == gpa_pages[sel]
                current[sel[hit]] = h_sorted[at[hit]]
        unresolved = gpa_pages < 0
        self.unresolved += int(unresolved.sum())
        reassigned = ~freed & ~unresolved & (current != frames)
        aliased = ~freed & ~reassigned & ~unresolved & aliased_frame
        for kind, flags in (("freed", freed), ("reassigned", reassigned), ("aliased", aliased)):
            count = int(flags.sum())
            if not count:
                continue
            self.by_kind[kind] += count
            for i in np.nonzero(flags)[0][: self.MAX_EXAMPLES - len(self.examples)].tolist():
                self.examples.append(
                    StaleUse(
                        vcpus[int(vids[i])].name,
                        run.label,
                        int(gvas[i]) & ((1 << 64) - 1),
                        int(gpa_pages[i]) << PAGE_SHIFT,
                        int(hpas[i]),
                        kind,
                    )
                )


# --- per-access cycles --------------------------------------------------------------------------


class CycleMeter:
    """Per-access cycles of the guest's own accesses (runs labelled "guest"), with the costs
    they caused added (see the module docstring). Needs ``ObservedEngine(per_access_cycles=
    True)``."""

    def __init__(self, costs: Costs | None = None) -> None:
        self.costs = costs or Costs()
        self.pending: Counter[int] = Counter()
        self.samples: defaultdict[int, list[I64]] = defaultdict(list)
        self.exits = 0
        self.failed_walk_cycles = 0  # walks that ended in an exit or fault (not in the stats)

    def charge(self, vid: int, cycles: int) -> None:
        self.pending[vid] += cycles

    def __call__(self, run: ObservedRun) -> None:
        if run.label != "guest" or run.cycles is None:
            return
        vids = run.vcpu
        cycles = run.cycles.copy()
        for vid in np.unique(vids).tolist():
            sel = np.nonzero(vids == vid)[0]
            if self.pending[vid]:
                cycles[sel[0]] += self.pending.pop(vid)
            self.samples[vid].append(cycles[sel])
        if run.exit is not None or run.fault is not None:
            vid = int(run.accesses.vcpu[run.stop])
            extra = (
                self.costs.exit_cycles if run.exit is not None else self.costs.guest_fault_cycles
            )
            self.pending[vid] += run.failed_cycles + extra
            self.failed_walk_cycles += run.failed_cycles
            self.exits += run.exit is not None

    def per_access(self) -> I64:
        parts = [c for chunks in self.samples.values() for c in chunks]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


# --- scenarios: one configuration, run end to end ---------------------------------------------


@dataclass(frozen=True)
class RemapOp:
    """A remap placed in vCPU ``vcpu``'s program after ``after`` of its accesses, on page
    ``page`` of the region (``other``: the duplicate page of a merge)."""

    vcpu: int
    after: int
    kind: Literal["migrate", "balloon", "merge"]
    page: int
    other: int = 0


@dataclass(frozen=True)
class Scenario:
    """A lazily backed VM, a guest kernel, a buffer of ``pages`` 4 KiB pages that the guest has
    mapped (GVA -> contiguous GPAs), ``vcpus`` vCPUs running a seeded workload over it
    (``shared``: every vCPU over the whole buffer, and vCPU 0 prefetches all of it; else each
    over its own slice, prefetching that), remap operations, and the protocol."""

    protocol: ProtocolName = "correct"
    hint: bool = True
    vcpus: int = 2
    pages: int = 32
    shared: bool = True
    accesses: int = 500  # per vCPU
    workload: str = "random"
    write_fraction: float = 0.3
    prebacked: tuple[int, ...] = ()
    merged: tuple[tuple[int, int], ...] = ()
    remaps: tuple[RemapOp, ...] = ()
    page_size: str = "4k"
    warm: bool = True
    batch: int = 8
    seed: int = 0
    quantum: tuple[int, int] = (16, 64)
    preempt_at: tuple[tuple[int, int], ...] = ()  # (lane, access index)
    lane_order: tuple[int, ...] = ()  # a permutation of the vCPUs (scheduler lanes)
    pool_capacity: int = 16
    per_access_cycles: bool = False
    data_cache: bool = True
    costs: Costs = field(default_factory=Costs)


@dataclass(frozen=True)
class Buffer:
    gva: int
    gpa: int
    length: int


@dataclass
class Outcome:
    scenario: Scenario
    buffer: Buffer
    accesses: int
    ept_violations: int
    translation_cycles: int
    access_cycles: I64
    prefetch_cycles: int
    pending_cycles: int  # charged to vCPUs after their last access
    stale_uses: int
    stale_by_kind: dict[str, int]
    examples: list[StaleUse]
    checked: int
    unresolved: int
    counters: dict[str, int]
    lock_acquisitions: int
    lock_contended: int

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.access_cycles, q)) if len(self.access_cycles) else 0.0


def populate(kernel: GuestKernel, process: Process, length: int) -> Buffer:
    """What a guest does before it can name GPAs in a hint: reserve ``length`` bytes of its
    address space and map them now (MAP_POPULATE) to contiguous, 2 MiB-aligned guest-physical
    memory (from the kernel's boot-time contiguous run when it has one: aged layouts). Host
    backing stays lazy."""
    blocks = -(-length // _2M)
    taken = kernel.cma_take(blocks * _2M)  # the run the guest set aside at boot (aged layouts)
    if taken is not None:
        gpa = taken
    else:
        try:
            gpa = kernel.frames.alloc_run(blocks * _2M)
        except OutOfMemory:
            raise ConfigError("populate", "guest-physical memory is too fragmented") from None
    gva = kernel.mmap(process, blocks * _2M)
    process.tables.map_range(gva, gpa, blocks * _2M, user=True, xd=True)
    return Buffer(gva, gpa, length)


def play(s: Scenario) -> Outcome:
    """Run one scenario with the checker (and the cycle meter) attached."""
    from ..workloads import make_workload

    mmu = MmuConfig() if s.data_cache else MmuConfig(cache=CacheConfig.disabled())
    hv = Hypervisor(mmu=mmu, seed=s.seed)
    engine = ObservedEngine.install(hv, per_access_cycles=s.per_access_cycles)
    image = KernelImage(code=_2M, rodata=_2M, data=_2M)
    blocks = -(-s.pages * PAGE_SIZE // _2M)
    run = _2M << (blocks - 1).bit_length() if hv.layout.aged else blocks * _2M
    memory = hv.layout.guest_memory((8 << 20) + run)
    vm = hv.create_vm("guest", memory)
    meter = CycleMeter(s.costs)
    app = PrefetchApp(
        hv, vm, protocol=s.protocol, batch=s.batch, costs=s.costs, pool_capacity=s.pool_capacity
    )
    app.meter = meter
    checker = StaleUseChecker(hv, holders=[app.pool])
    engine.observers += [checker, meter]
    kernel = GuestKernel(vm, seed=s.seed, image=image, cma=run if hv.layout.aged else 0)
    process = kernel.spawn("app")
    vcpus = [vm.add_vcpu(cr3=process.cr3) for _ in range(s.vcpus)]
    for vcpu in vcpus:
        kernel.switch_to(vcpu, process)
    buffer = populate(kernel, process, s.pages * PAGE_SIZE)
    for page in s.prebacked:
        app.back(buffer.gpa + page * PAGE_SIZE)
    for keep, dup in s.merged:
        app.merge(None, buffer.gpa + keep * PAGE_SIZE, buffer.gpa + dup * PAGE_SIZE)
    flags = (PREFETCH_2M if s.page_size == "2m" else 0) | (0 if s.warm else PREFETCH_NO_WARM)
    for k, vcpu in enumerate(vcpus):
        if s.shared:
            first, count = 0, s.pages
        else:
            per = s.pages // s.vcpus
            first, count = k * per, per if k < s.vcpus - 1 else s.pages - k * per
        program: list[Segment] = []
        if s.hint and (not s.shared or k == 0):
            gpa = buffer.gpa + first * PAGE_SIZE
            program.append(Hypercall(PREFETCH_HYPERCALL, (gpa, count * PAGE_SIZE, flags)))
        workload = make_workload(
            s.workload,
            footprint=count * PAGE_SIZE,
            seed=s.seed * 7919 + k,
            write_fraction=s.write_fraction,
        )
        chunk = workload.chunk_at(buffer.gva + first * PAGE_SIZE, 0, s.accesses)  # type: ignore[attr-defined]
        position = 0
        for op in sorted((o for o in s.remaps if o.vcpu == k), key=lambda o: o.after):
            at = min(max(op.after, position), s.accesses)
            if at > position:
                program.append(Run(_slice(chunk, position, at)))
                position = at
            program.append(_remap_segment(app, buffer, op))
        if position < s.accesses:
            program.append(Run(_slice(chunk, position, s.accesses)))
        vcpu.load(program)
    order = list(s.lane_order) if sorted(s.lane_order) == list(range(s.vcpus)) else []
    lanes = [vcpus[i] for i in order] if order else vcpus
    preempt: dict[int, set[int]] = defaultdict(set)
    for lane, index in s.preempt_at:
        preempt[lane % s.vcpus].add(index)
    hv.run(lanes, seed=s.seed, quantum=s.quantum, preempt_at=dict(preempt))
    stats = [v.stats for v in vcpus]
    warm_translation = sum(app.warm_translation_cycles.values())
    return Outcome(
        scenario=s,
        buffer=buffer,
        accesses=sum(st.accesses for st in stats) - sum(app.warm_accesses.values()),
        ept_violations=sum(st.ept_violations for st in stats),
        translation_cycles=sum(st.translation_cycles for st in stats)
        - warm_translation
        + meter.failed_walk_cycles,
        access_cycles=meter.per_access(),
        prefetch_cycles=sum(app.prefetch_cycles.values()),
        pending_cycles=sum(meter.pending.values()),
        stale_uses=checker.stale_uses,
        stale_by_kind=dict(checker.by_kind),
        examples=list(checker.examples),
        checked=checker.checked,
        unresolved=checker.unresolved,
        counters=dict(app.counters + vm.counters),
        lock_acquisitions=app.lock.acquisitions,
        lock_contended=app.lock.contended,
    )


def _slice(chunk: TraceChunk, start: int, stop: int) -> TraceChunk:
    return TraceChunk(chunk.address[start:stop], chunk.kind[start:stop], chunk.size[start:stop])


def _remap_segment(app: PrefetchApp, buffer: Buffer, op: RemapOp) -> Segment:
    page = buffer.gpa + (op.page * PAGE_SIZE) % buffer.length
    other = buffer.gpa + (op.other * PAGE_SIZE) % buffer.length
    if op.kind == "balloon":
        return Hypercall(BALLOON_HYPERCALL, (page,))

    def migrate(vcpu: VCPU) -> None:
        app.migrate(vcpu, page)

    def merge(vcpu: VCPU) -> None:
        app.merge(vcpu, page, other)

    return GuestAction(migrate if op.kind == "migrate" else merge, label=op.kind)


__all__ = [
    "BALLOON_HYPERCALL",
    "COW",
    "PREFETCHED",
    "PREFETCH_2M",
    "PREFETCH_HYPERCALL",
    "PREFETCH_NO_WARM",
    "PROTOCOLS",
    "Costs",
    "CycleMeter",
    "EptLock",
    "FramePool",
    "ObservedEngine",
    "ObservedRun",
    "Outcome",
    "Prefetch",
    "PrefetchApp",
    "RemapOp",
    "Scenario",
    "StaleUse",
    "StaleUseChecker",
    "ept_pages",
    "labelled",
    "play",
    "populate",
]
