"""The VM's EPT editors under one protocol: lazy backing of a first touch, copy-on-write breaks,
page migration, balloon releases and KSM merging, each under the EPT lock
(:mod:`eptlab.apps.ept_lock`).

A remap, in the correct protocol: take the lock, edit the entry, INVEPT on every vCPU of the VM
(:meth:`VM.shootdown`) *before* the old frame is released or reused, release the lock. Broken
variants, to prove the stale-use checker (:mod:`eptlab.apps.stale_use`) can fail:
``protocol="no_invept"`` (remaps release the old frame without a shootdown: other vCPUs, and the
initiator, keep using it from their TLBs) and ``protocol="no_lock"`` (nobody takes the lock: a
remap or a first-touch backing lands between a prefetch's scan and commit, and the commit writes
back the stale entry -- the freed frame -- or overwrites a page another vCPU already backed).

Page migration (:meth:`EptEditor.migrate`) and KSM merging (:meth:`EptEditor.merge`, which makes two
pages share one read-only frame: the copy-on-write breaks come from the guest's writes to them)
are host-side events placed between a vCPU's accesses; the balloon is the guest's balloon driver
releasing a page through :data:`BALLOON_HYPERCALL`. The hypervisor work is charged through
:meth:`EptEditor.charge` (costs from :class:`~eptlab.apps.cycle_meter.Costs`).

Modelling limits: a remap is atomic between accesses (its IPIs are delivered at once), so inside
one remap the order "shoot down, then release" is not observable here: the broken variant
modelled is the missing shootdown, not a late one. The guest kernel's own first writes to
unbacked memory (:meth:`VM.write_u64` backs pages through :meth:`VM.back`) do not take the lock;
the scenarios keep them (guest page-table pages) out of remapped ranges.
"""

from __future__ import annotations

from collections import Counter
from typing import Literal

from ..arch.bits import PAGE_SHIFT, PAGE_SIZE, PageSize, bits
from ..arch.ept import Ept, EptEntry, ept_address
from ..arch.exits import EptQual, EptViolation, ExitReason
from ..errors import ConfigError, MappingError
from ..hv import VCPU, VM, Exit, ExitAction, Hypervisor
from .cycle_meter import Costs, CycleMeter
from .ept_lock import EptLock, FramePool

BALLOON_HYPERCALL = 0x424C  # "BL"
EINVAL = 22

PREFETCHED = 1 << 52  # software-available EPT bit: "covered by a prefetch"
COW = 1 << 53  # software-available EPT bit: read-only because the frame is shared (KSM)

ProtocolName = Literal["correct", "no_lock", "no_invept"]
PROTOCOLS: tuple[ProtocolName, ...] = ("correct", "no_lock", "no_invept")
_4K = PageSize.SIZE_4K


class EptEditor:
    """Every EPT editor of one VM (one per hypervisor: the balloon hypercall number is global).
    Registers the balloon hypercall and the EPT-violation handler (lazy backing, copy-on-write
    breaks)."""

    def __init__(
        self,
        hv: Hypervisor,
        vm: VM,
        *,
        protocol: ProtocolName = "correct",
        costs: Costs | None = None,
        pool_capacity: int = 64,
        meter: CycleMeter | None = None,
        balloon_number: int = BALLOON_HYPERCALL,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ConfigError("protocol", f"{protocol!r} is not one of {', '.join(PROTOCOLS)}")
        self.hv, self.vm, self.protocol = hv, vm, protocol
        self.costs = costs or Costs()
        self.lock = EptLock(enforced=protocol != "no_lock")
        self.pool = FramePool(hv.host, pool_capacity)
        self.meter = meter
        self.counters: Counter[str] = Counter()
        self._maxphy = vm.ept.maxphyaddr
        self._addr_mask = bits(self._maxphy - 1, PAGE_SHIFT)
        hv.hypercall(balloon_number, "balloon")(self._balloon_hypercall)
        hv.on(ExitReason.EPT_VIOLATION, self._on_ept_violation)

    # -- accounting ---------------------------------------------------------------------------

    def charge(self, vcpu: VCPU | None, cycles: int) -> None:
        """Charge hypervisor work to the vCPU's next access (through the meter), or to what
        :meth:`absorb` names; host-side work (``vcpu=None``) goes to ``host_cycles``."""
        if vcpu is None:
            self.counters["host_cycles"] += cycles
        elif not self.absorb(vcpu, cycles) and self.meter is not None:
            self.meter.charge(vcpu.engine_id, cycles)

    def busy(self, vcpu: VCPU) -> bool:
        """Whether ``vcpu`` is inside hypervisor work of a subclass (e.g. a prefetch): its
        exits are that work's, not the guest's."""
        return False

    def absorb(self, vcpu: VCPU, cycles: int) -> bool:
        """Take ``cycles`` of work done on ``vcpu``'s behalf elsewhere (a subclass's own
        accounting, e.g. a prefetch in progress); False: charge the vCPU."""
        return False

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
            self.charge(vcpu, self.costs.back(size))
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



__all__ = [
    "BALLOON_HYPERCALL",
    "COW",
    "EINVAL",
    "PREFETCHED",
    "PROTOCOLS",
    "EptEditor",
    "ProtocolName",
]
