"""Fixed cases for the hypervisor layer that the mutation lists showed the suite could not see
(docs/mutation.md): the exact preemption point, a host block returned only with its last frame,
and dirty-logging rounds that must log a page written again after ``collect``."""

from __future__ import annotations

import numpy as np

from eptlab.arch import Access, PageSize
from eptlab.arch.bits import PAGE_SIZE
from eptlab.arch.ept import Ept
from eptlab.hv import Hypervisor, Run
from eptlab.hv.dirty_log import PmlLog, WriteProtectLog
from eptlab.hv.host import HostMemory

from .test_hypervisor import GVA, MiB, chunk, guest_with_mapping


def test_a_preemption_point_switches_right_before_that_access() -> None:
    """``preempt_at={lane: {10}}``: the lane that runs first issues exactly 10 accesses, then
    the other lane runs (also stopped at its 10th), whatever the seed draws."""
    for seed in (0, 1, 2, 3):
        hv = Hypervisor()
        vm, tables, v0 = guest_with_mapping(hv)
        v1 = vm.add_vcpu(cr3=tables.root)
        v0.load([Run(chunk(GVA + np.arange(500) * 8))])
        v1.load([Run(chunk(GVA + 4096 + np.arange(500) * 8))])
        order = hv.run(seed=seed, quantum=(50, 300), preempt_at={0: {10}, 1: {10}}).order
        first = order[0]
        assert order[:10] == [first] * 10
        assert order[10:20] == [1 - first] * 10


def test_a_host_block_returns_to_the_allocator_with_its_last_frame() -> None:
    host = HostMemory(1 << 30)
    before = host.used_bytes
    hpa = host.alloc(PageSize.SIZE_2M)
    assert host.used_bytes - before == 2 * MiB
    for i in range(511):  # frame by frame, as after a split
        assert host.release(hpa + i * PAGE_SIZE) == 1
        assert host.used_bytes - before == 2 * MiB  # one frame is still live
    assert host.refs(hpa + 511 * PAGE_SIZE) == 1
    assert host.release(hpa + 511 * PAGE_SIZE) == 1
    assert host.used_bytes == before
    assert host.live_bytes == 0


def _write_pages(hv: Hypervisor, vcpu, pages: list[int]) -> None:  # type: ignore[no-untyped-def]
    vcpu.load([Run(chunk([GVA + p * PAGE_SIZE for p in pages], kind=Access.WRITE))])
    hv.run([vcpu])


def test_pml_rounds_log_a_page_written_again_after_collect() -> None:
    """collect clears the dirty flags and must INVEPT: a TLB entry cached as dirty would let
    the next write through without setting the flag, and the page would never be logged
    again."""
    hv = Hypervisor()
    vm, _, vcpu = guest_with_mapping(hv, pages=8, pml=True, ept_ad=True)
    log = PmlLog(vm)
    _write_pages(hv, vcpu, [0])  # back the pages and fill the TLBs
    log.start(2 * MiB, 8 * PAGE_SIZE)
    _write_pages(hv, vcpu, [0, 1])
    assert log.collect() >= {2 * MiB, 2 * MiB + PAGE_SIZE}
    _write_pages(hv, vcpu, [1])
    assert 2 * MiB + PAGE_SIZE in log.collect()
    assert log.counters["invept"] >= 2


def test_pml_start_forgets_what_was_logged_before_the_round() -> None:
    hv = Hypervisor()
    vm, _, vcpu = guest_with_mapping(hv, pages=8, pml=True, ept_ad=True)
    _write_pages(hv, vcpu, [0, 1, 2])
    vm.drain_pml(vcpu)
    assert 2 * MiB in vm.dirty_log
    log = PmlLog(vm)
    log.start(2 * MiB, 8 * PAGE_SIZE)
    _write_pages(hv, vcpu, [3])
    data = {p for p in log.collect() if 2 * MiB <= p < 2 * MiB + 8 * PAGE_SIZE}
    assert data == {2 * MiB + 3 * PAGE_SIZE}


def test_write_protect_rounds_trap_the_first_write_of_each_round() -> None:
    """start and collect take write permission away and must INVEPT: with a writable
    translation still cached, the write would not exit and the page would be missed."""
    hv = Hypervisor()
    vm, _, vcpu = guest_with_mapping(hv, pages=8)
    _write_pages(hv, vcpu, list(range(8)))  # back the pages; writable translations now cached
    log = WriteProtectLog(vm)
    log.start(2 * MiB, 8 * PAGE_SIZE)
    _write_pages(hv, vcpu, [0, 2])
    assert log.collect() == {2 * MiB, 2 * MiB + 2 * PAGE_SIZE}
    _write_pages(hv, vcpu, [2, 2, 2])
    assert log.collect() == {2 * MiB + 2 * PAGE_SIZE}
    assert log.counters["write_faults"] == 3
    assert log.collect() == set()


def test_a_fresh_pml_log_starts_at_index_511_and_fills_without_exits() -> None:
    """SDM Vol. 3C §29.3.6: the index starts at 511 and counts down; a log-full exit comes only
    when a write finds it outside 0..511."""
    hv = Hypervisor()
    vm, _, vcpu = guest_with_mapping(hv, pages=8, pml=True)
    assert vcpu.vmcs.pml_index == 511
    _write_pages(hv, vcpu, list(range(8)))
    assert vm.counters["pml_full_exits"] == 0
    logged = vm.drain_pml(vcpu)
    assert {2 * MiB + p * PAGE_SIZE for p in range(8)} <= set(logged)
    assert 0 not in logged  # only entries the processor wrote


def test_split_keeps_the_large_page_dirty_and_accessed_flags_in_every_small_leaf() -> None:
    hv = Hypervisor()
    vm = hv.create_vm("vm", 64 * MiB, lazy=False, ept_ad=True)
    vm.ept.map(4 * MiB, PageSize.SIZE_2M)
    leaf = vm.ept.lookup(4 * MiB)
    assert leaf is not None
    hv.host.memory.write_u64(leaf.entry_address, leaf.value | Ept.A | Ept.D)
    vm.ept.split(4 * MiB)
    for i in (0, 1, 511):
        small = vm.ept.lookup(4 * MiB + i * PAGE_SIZE)
        assert small is not None and small.level == 1
        assert small.value & Ept.D and small.value & Ept.A


def test_merge_keeps_dirty_if_any_small_leaf_was_dirty() -> None:
    hv = Hypervisor()
    vm = hv.create_vm("vm", 64 * MiB, lazy=False, ept_ad=True)
    vm.ept.map(4 * MiB, PageSize.SIZE_2M)
    vm.ept.split(4 * MiB)
    small = vm.ept.lookup(4 * MiB + 7 * PAGE_SIZE)
    assert small is not None and not small.value & Ept.D
    hv.host.memory.write_u64(small.entry_address, small.value | Ept.D)  # one page written
    assert vm.ept.merge(4 * MiB, PageSize.SIZE_2M)
    large = vm.ept.lookup(4 * MiB)
    assert large is not None and large.level == 2 and large.value & Ept.D
    vm.ept.split(4 * MiB)
    for i in range(512):  # now clean everywhere: the merged page is clean
        s = vm.ept.lookup(4 * MiB + i * PAGE_SIZE)
        assert s is not None
        hv.host.memory.write_u64(s.entry_address, s.value & ~int(Ept.D))
    assert vm.ept.merge(4 * MiB, PageSize.SIZE_2M)
    large = vm.ept.lookup(4 * MiB)
    assert large is not None and not large.value & Ept.D
