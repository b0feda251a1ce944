"""The stale-use checker: follows every access (an :class:`~eptlab.apps.observed.ObservedEngine`
observer) and flags each use of a host frame that is freed or given to someone else at that moment.

For each access the checker finds its GPA (software walk of the vCPU's guest page tables, cached per
page) and judges the frame against the ground truth at that moment -- the EPTs of all VMs and the
host's reference counts: *freed* (no reference left, or parked in a free-frame cache such as the
:class:`~eptlab.apps.ept_lock.FramePool`), *reassigned* (the access's GPA no longer maps that frame:
it belongs to another page, to nobody, or to the hypervisor), *aliased* (the GPA maps it, but more
mappings point at it than it has references: a dangling entry shares a frame that was given to
someone else). Each is a stale use. The GVA->GPA cache assumes the guest does not remap the
buffers it touches while checked (the scenarios' guests map them once, up front).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np
import numpy.typing as npt

from ..arch.bits import PAGE_SHIFT, bits
from ..arch.ept import Ept
from ..hv import VCPU, VM, Hypervisor
from ..mmu.peek import Peeker
from .observed import ObservedRun

I64 = npt.NDArray[np.int64]


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


__all__ = ["FrameHolder", "StaleUse", "StaleUseChecker", "ept_pages"]
