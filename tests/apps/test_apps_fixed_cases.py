"""Fixed cases for the applications that the mutation lists showed the suite could not see
(docs/mutation.md)."""

from __future__ import annotations

import numpy as np

from eptlab.apps.ept_editor import COW, EptEditor
from eptlab.apps.ept_lock import FramePool
from eptlab.arch import Access
from eptlab.arch.bits import PAGE_SIZE
from eptlab.arch.ept import Ept
from eptlab.hv import Hypervisor, Run
from eptlab.hv.host import HostMemory
from eptlab.tables import GuestPageTables
from eptlab.traces.model import TraceChunk

GVA = 0x7F00_0000_0000
MiB = 1 << 20


def test_frame_pool_parks_at_most_capacity_frames_and_reuses_them_last_in_first_out() -> None:
    host = HostMemory(1 << 30)
    pool = FramePool(host, capacity=2)
    frames = [pool.alloc() for _ in range(3)]
    assert len(set(frames)) == 3 and all(host.refs(f) == 1 for f in frames)
    for f in frames:
        pool.release(f)
    assert list(pool.held()) == frames[:2]  # parked, still referenced by the pool
    assert host.refs(frames[0]) == host.refs(frames[1]) == 1
    assert host.refs(frames[2]) == 0  # beyond the capacity: back to the host
    host.memory.write_u64(frames[1], 0xDEAD)
    assert pool.alloc() == frames[1]  # LIFO
    assert host.memory.read_u64(frames[1]) == 0  # zeroed for its new owner
    assert pool.reused == 1


def test_frame_pool_does_not_park_a_frame_still_mapped_elsewhere() -> None:
    host = HostMemory(1 << 30)
    pool = FramePool(host, capacity=4)
    frame = pool.alloc()
    host.share(frame)
    pool.release(frame)
    assert list(pool.held()) == []
    assert host.refs(frame) == 1
    assert host.refs(frame + PAGE_SIZE) == 0


def test_ksm_merge_makes_both_pages_read_only_so_a_write_to_either_breaks_the_sharing() -> None:
    hv = Hypervisor()
    vm = hv.create_vm("vm", 16 * MiB, lazy=False)
    vm.ept.map_range(0, 2 * MiB)
    next_table = iter(range(0x1000, 0x200000, 0x1000))
    tables = GuestPageTables(vm, lambda: next(next_table))
    tables.map_range(GVA, 2 * MiB, 2 * PAGE_SIZE, user=True)
    vm.ept.map_range(2 * MiB, 2 * PAGE_SIZE)
    vcpu = vm.add_vcpu(cr3=tables.root)
    editor = EptEditor(hv, vm)
    keep, dup = 2 * MiB, 2 * MiB + PAGE_SIZE
    assert editor.merge(None, keep, dup)
    frame = vm.ept.host_address(keep)
    assert frame is not None and vm.ept.host_address(dup) == frame
    assert hv.host.refs(frame) == 2
    for gpa in (keep, dup):
        leaf = vm.ept.lookup(gpa)
        assert leaf is not None and not leaf.value & Ept.W and leaf.value & COW
    vcpu.load([Run(TraceChunk(np.array([GVA + 8], np.int64), np.array([Access.WRITE], np.int8),
                              np.array([8], np.int32)))])
    hv.run([vcpu])
    assert editor.counters["cow_breaks"] == 1  # the write to the kept page faulted and copied
    assert vm.ept.host_address(keep) != frame and vm.ept.host_address(dup) == frame
    assert hv.host.refs(frame) == 1
