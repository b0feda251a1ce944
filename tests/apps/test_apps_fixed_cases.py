"""Fixed cases for the applications that the mutation lists showed the suite could not see
(docs/mutation.md)."""

from __future__ import annotations

from eptlab.apps.ept_lock import FramePool
from eptlab.arch.bits import PAGE_SIZE
from eptlab.hv.host import HostMemory


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
