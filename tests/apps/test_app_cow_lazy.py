"""Lazy fork, the parent's own faults, and snapshot reset (PML and write-protection tracking),
checked against host frames and host memory contents."""

from __future__ import annotations

import numpy as np
import pytest

from eptlab.apps.cow import CopyOnWrite
from eptlab.arch import PageSize
from eptlab.arch.ept import Ept, ept_address
from eptlab.hv import VM, Hypervisor
from eptlab.hv.dirty_log import PmlLog
from eptlab.mmu.config import CacheConfig, MmuConfig
from eptlab.tables import GuestPageTables

GVA = 0x7F00_0000_0000
MiB = 1 << 20
DATA = 4 * MiB  # GPA of the first data page
PAGES = 32


def booted(seed: int = 0) -> tuple[Hypervisor, VM]:
    """A fully backed VM whose guest maps PAGES pages at GVA -> GPA 4 MiB.., every data page
    written once (guest A/D flags set, distinct contents)."""
    hv = Hypervisor(mmu=MmuConfig(cache=CacheConfig.disabled()))
    vm = hv.create_vm("parent", 16 * MiB, lazy=False)
    vm.ept.map_range(0, 16 * MiB)
    tables = iter(range(0x1000, 0x200000, 0x1000))
    pt = GuestPageTables(vm, lambda: next(tables))
    pt.map_range(GVA, DATA, PAGES * 4096)
    cpu = vm.add_vcpu(cr3=pt.root)
    rng = np.random.default_rng(seed)
    for page in range(PAGES):
        for word in rng.choice(512, 4, replace=False):
            cpu.write_u64(GVA + page * 4096 + 8 * int(word), int(rng.integers(1, 2**63)))
    return hv, vm


def frame_of(vm: VM, gpa: int) -> tuple[int, bool] | None:
    """(hpa, writable) of the EPT leaf mapping ``gpa`` in ``vm``, or None."""
    leaf = vm.ept.lookup(gpa)
    if leaf is None:
        return None
    return ept_address(leaf.value, leaf.level, vm.ept.maxphyaddr), bool(leaf.value & Ept.W)


def hpa_of(vm: VM, gpa: int) -> int:
    """The HPA of the mapped page ``gpa``."""
    found = frame_of(vm, gpa)
    assert found is not None
    return found[0]


def contents(hv: Hypervisor, hpa: int) -> np.ndarray:
    return hv.host.memory.frame(hpa >> 12).copy()


def ept_violations(hv: Hypervisor) -> int:
    """The hypervisor's count of EPT violations (its counter's keys are names or reasons)."""
    return sum(n for k, n in hv.exits.items() if getattr(k, "name", k) == "EPT_VIOLATION")


@pytest.mark.parametrize("seed", [1, 2])
def test_lazy_fork_copies_exactly_the_pages_written_and_shares_the_pages_only_read(
    seed: int,
) -> None:
    hv, parent = booted(seed)
    before = {p: hpa_of(parent, DATA + p * 4096) for p in range(PAGES)}
    cow = CopyOnWrite(hv)
    (clone,) = cow.fork(parent, 1, lazy=True)
    assert all(frame_of(clone, DATA + p * 4096) is None for p in range(PAGES))  # empty EPT
    rng = np.random.default_rng(seed)
    order = rng.permutation(PAGES)
    written, read = set(order[:8].tolist()), set(order[8:20].tolist())
    for p in sorted(read | written):
        if p in written:
            clone.vcpus[0].write_u64(GVA + p * 4096, 0xC10E + p)
        else:
            clone.vcpus[0].read_u64(GVA + p * 4096)
    assert cow.counters.pages_copied == len(written)
    assert cow.counters.per_vm[clone.name] == len(written)
    for p in range(PAGES):
        gpa = DATA + p * 4096
        parent_hpa = before[p]
        assert hpa_of(parent, gpa) == parent_hpa  # the parent kept its frame
        mine = frame_of(clone, gpa)
        if p in written:
            assert mine is not None and mine[0] != parent_hpa and mine[1]
            assert clone.vcpus[0].read_u64(GVA + p * 4096) == 0xC10E + p
            assert parent.vcpus[0].read_u64(GVA + p * 4096) != 0xC10E + p
        elif p in read:
            assert mine == (parent_hpa, False)  # the parent's frame, read-only
            assert frame_of(parent, gpa) == (parent_hpa, False)  # the parent's entry too
            assert hv.host.refs(parent_hpa) == 2
        else:
            assert mine is None
            assert frame_of(parent, gpa) == (parent_hpa, True)  # untouched, still writable


def test_the_parents_first_write_after_an_eager_fork_faults_and_copies() -> None:
    hv, parent = booted()
    cow = CopyOnWrite(hv)
    (clone,) = cow.fork(parent, 1)
    exits = ept_violations(hv)
    parent.vcpus[0].write_u64(GVA, 5)
    assert ept_violations(hv) == exits + 1
    assert cow.counters.exits_by_vm["parent"] == 1 and cow.counters.per_vm["parent"] == 1
    parent.vcpus[0].write_u64(GVA + 8, 6)  # same page: writable now, no fault
    assert ept_violations(hv) == exits + 1
    assert clone.vcpus[0].read_u64(GVA) != 5


def test_a_resumed_lazy_parent_faults_on_every_first_write_and_clones_keep_the_fork() -> None:
    hv, parent = booted()
    cow = CopyOnWrite(hv)
    (clone,) = cow.fork(parent, 1, lazy=True)
    clone.vcpus[0].read_u64(GVA)  # page 0 shared read-only
    old = [clone.vcpus[0].read_u64(GVA + p * 4096) for p in (0, 1)]
    assert cow.paused(parent) and cow.resume(parent) > 0 and not cow.paused(parent)
    for p in (0, 1):
        exits = cow.counters.exits_by_vm["parent"]
        parent.vcpus[0].write_u64(GVA + p * 4096, 77)
        assert cow.counters.exits_by_vm["parent"] == exits + 1
    assert cow.counters.per_vm["parent"] == 2  # both copied: the snapshot holds the frames
    # page 1 was never filled in the clone: it fills from the snapshot, not the parent's write
    assert [clone.vcpus[0].read_u64(GVA + p * 4096) for p in (0, 1)] == old


def test_after_its_lazy_clones_go_the_parent_unshares_read_pages_without_copying() -> None:
    hv, parent = booted()
    cow = CopyOnWrite(hv)
    (clone,) = cow.fork(parent, 1, lazy=True)
    clone.vcpus[0].read_u64(GVA)
    cow.destroy(clone)
    assert not cow.paused(parent)
    exits = ept_violations(hv)
    parent.vcpus[0].write_u64(GVA + 4096, 1)  # never shared: still writable
    assert ept_violations(hv) == exits
    parent.vcpus[0].write_u64(GVA, 1)  # shared read-only, now the only owner: un-share
    assert ept_violations(hv) == exits + 1
    assert cow.counters.reclaimed == 1 and cow.counters.per_vm["parent"] == 0


@pytest.mark.parametrize("lazy", [True, False])
def test_snapshot_reset_restores_every_dirtied_byte_and_nothing_else(lazy: bool) -> None:
    hv, parent = booted(3)
    snapshot = {gpa: contents(hv, hpa_of(parent, gpa))
                for gpa in (DATA + p * 4096 for p in range(PAGES))}
    cow = CopyOnWrite(hv)
    (clone,) = cow.fork(parent, 1, lazy=lazy, pml=True)
    log = PmlLog(clone)
    log.start(0, clone.memory)
    rng = np.random.default_rng(4)
    for run in range(3):
        pages = sorted(rng.choice(PAGES, 6 + run, replace=False).tolist())
        for p in pages:
            word = int(rng.integers(0, 512))
            clone.vcpus[0].write_u64(GVA + p * 4096 + 8 * word, int(rng.integers(1, 2**63)))
        expected = {DATA + p * 4096 for p in pages}
        pml, wp = log.collect(), cow.written(clone)
        assert pml == wp  # both trackers find the same pages: the pages written, and the
        # guest page-table pages the walks read (with EPT A/D on, guest paging-structure
        # accesses count as writes, SDM Vol. 3C §29.3.5: they fault, and PML logs them)
        assert pml & expected == expected and all(g < 0x200000 for g in pml - expected)
        frames_before = {gpa: frame_of(clone, gpa) for gpa in snapshot}
        others = {gpa: contents(hv, hpa_of(clone, gpa))
                  for gpa in snapshot if gpa not in expected and frame_of(clone, gpa)}
        assert any(not np.array_equal(contents(hv, hpa_of(clone, g)), snapshot[g])
                   for g in expected)  # the run changed something to restore
        assert cow.reset(clone, pml, rearm=True) == len(pml)
        for gpa, data in snapshot.items():  # byte for byte, every page the clone maps
            mine = frame_of(clone, gpa)
            if mine is not None:
                assert np.array_equal(contents(hv, mine[0]), data), hex(gpa)
                if gpa in expected:  # restored into the clone's own frame, not the parent's
                    assert mine[0] != hpa_of(parent, gpa)
        for gpa, data in others.items():  # nothing else was written
            assert np.array_equal(contents(hv, hpa_of(clone, gpa)), data)
        assert {g: f[0] for g, f in frames_before.items() if f} == {  # same frames, remapped none
            g: hpa_of(clone, g) for g, f in frames_before.items() if f}
        assert not any(frame_of(clone, g) == (hpa_of(clone, g), True) for g in expected)  # re-armed
    for gpa, data in snapshot.items():  # the parent's memory is the snapshot still
        assert np.array_equal(contents(hv, hpa_of(parent, gpa)), data)


def test_reset_refuses_a_vm_that_is_not_a_clone() -> None:
    from eptlab.errors import ConfigError

    hv, parent = booted()
    with pytest.raises(ConfigError):
        CopyOnWrite(hv).reset(parent, [DATA])


def test_lazy_fork_of_2m_pages_copies_or_splits_on_write() -> None:
    for granularity, copied in (("2m-copy", 512), ("2m-split", 1)):
        hv = Hypervisor(mmu=MmuConfig(cache=CacheConfig.disabled()))
        vm = hv.create_vm("parent", 16 * MiB, lazy=False, backing=PageSize.SIZE_2M)
        vm.ept.map_range(0, 16 * MiB, PageSize.SIZE_2M)
        tables = iter(range(0x1000, 0x200000, 0x1000))
        pt = GuestPageTables(vm, tables.__next__)
        pt.map_range(GVA, DATA, PAGES * 4096)
        vm.add_vcpu(cr3=pt.root).write_u64(GVA + 4096, 3)
        cow = CopyOnWrite(hv, granularity)
        (clone,) = cow.fork(vm, 1, lazy=True)
        clone.vcpus[0].write_u64(GVA + 4096, 9)
        assert cow.counters.per_vm[clone.name] == copied
        assert vm.vcpus[0].read_u64(GVA + 4096) == 3
        assert clone.vcpus[0].read_u64(GVA + 4096) == 9
