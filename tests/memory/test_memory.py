"""Sparse host memory and the frame allocator."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eptlab.arch import Access, PageSize
from eptlab.errors import AddressError, ConfigError, OutOfMemory
from eptlab.memory import FrameAllocator, PhysicalMemory
from eptlab.mmu.scenario import NestedSpace

TiB = 1 << 40


def test_unwritten_memory_reads_zero_and_costs_nothing() -> None:
    mem = PhysicalMemory(TiB)
    assert mem.read_u64(TiB - 8) == 0
    assert mem.read(123 << 30, 64) == bytes(64)
    assert mem.backed_frames == 0


def test_words_and_bytes_round_trip_across_frames() -> None:
    mem = PhysicalMemory(1 << 30)
    mem.write(0x1FFC, b"abcdefgh")
    assert mem.read(0x1FFC, 8) == b"abcdefgh"
    assert mem.read_u64(0x2000) == int.from_bytes(b"efgh\0\0\0\0", "little")
    mem.write_u64(0x3008, 0xFFFF_FFFF_FFFF_FFFF)
    assert mem.read(0x3008, 8) == b"\xff" * 8
    assert mem.backed_frames == 3


def test_out_of_range_and_misaligned_are_errors() -> None:
    mem = PhysicalMemory(1 << 20)
    with pytest.raises(AddressError):
        mem.read_u64(1 << 20)
    with pytest.raises(AddressError):
        mem.write_u64(4, 1)
    with pytest.raises(ConfigError):
        PhysicalMemory(1000)


def test_discard_and_copy() -> None:
    mem = PhysicalMemory(1 << 30)
    mem.write_u64(0x5000, 42)
    mem.copy_frame(5, 9)
    assert mem.read_u64(0x9000) == 42
    mem.discard(5)
    assert mem.read_u64(0x5000) == 0 and mem.read_u64(0x9000) == 42


def test_growth_keeps_contents() -> None:
    mem = PhysicalMemory(1 << 30, initial_frames=1)
    for i in range(100):
        mem.write_u64(i << 12, i + 1)
    assert [mem.read_u64(i << 12) for i in range(100)] == list(range(1, 101))


def test_1tib_guest_touching_1000_pages_costs_in_proportion() -> None:
    """Issue #2: cost proportional to the pages touched, not to the 1 TiB address space."""
    space = NestedSpace.create(guest_memory=TiB, host_memory=TiB, host_policy="random", seed=1)
    base = 0x10_0000_0000
    gvas = [base + i * (1 << 30) + 0x5000 for i in range(1000)]  # 1000 pages spread over 1 TiB
    for gva in gvas:
        space.map(gva)
    walker = space.walker()
    for gva in gvas:
        t = walker.translate(gva, Access.WRITE)
        assert t.ok and t.hpa is not None
        space.memory.write_u64(t.hpa & ~7, gva)
    # data frames + guest page tables + EPT tables: a few thousand frames, some tens of MiB
    assert space.memory.backed_frames < 6000
    assert space.memory.nbytes < 64 << 20
    assert space.guest_frames.used_bytes == 1000 * 4096


@given(st.lists(st.sampled_from(list(PageSize)), min_size=1, max_size=40), st.integers(0, 5))
def test_allocator_blocks_never_overlap(sizes: list[PageSize], seed: int) -> None:
    for policy in ("sequential", "random"):
        alloc = FrameAllocator(64 << 30, policy=policy, seed=seed)
        got = [(alloc.alloc(s), s) for s in sizes]
        spans = sorted((a, a + s) for a, s in got)
        assert all(a % s == 0 for a, s in got)
        assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:], strict=False))
        assert alloc.used_bytes == sum(sizes)


def test_allocator_reuses_freed_blocks_and_reports_exhaustion() -> None:
    alloc = FrameAllocator(4 << 20)
    a = [alloc.alloc() for _ in range(1024)]
    with pytest.raises(OutOfMemory):
        alloc.alloc()
    with pytest.raises(OutOfMemory):
        alloc.alloc(PageSize.SIZE_2M)
    alloc.free(a[7])
    assert alloc.alloc() == a[7]
    for x in a[:512]:
        if x != a[7]:
            alloc.free(x)
    alloc.free(a[7])
    assert alloc.alloc(PageSize.SIZE_2M) == 0


def test_large_block_excludes_small_ones_inside_it() -> None:
    alloc = FrameAllocator(1 << 30)
    big = alloc.alloc_at(0, PageSize.SIZE_2M)
    assert 0x1000 in alloc
    with pytest.raises(OutOfMemory):
        alloc.alloc_at(0x1000)
    small = alloc.alloc()
    assert small >= big + PageSize.SIZE_2M
