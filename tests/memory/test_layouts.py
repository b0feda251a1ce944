"""Aged buddy allocator and memory layouts (issue 12, item 5)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eptlab.arch import Access, PageSize
from eptlab.errors import ConfigError, OutOfMemory
from eptlab.experiments import get
from eptlab.experiments.base import apply_overrides
from eptlab.hv import Hypervisor
from eptlab.memory import AgingConfig, BuddyAllocator, FrameAllocator, LayoutConfig
from eptlab.memory.buddy import FREE, OTHER, OWNED, PINNED, consecutive_fraction
from eptlab.memory.layout import default_layout, in_layout, layout_scope
from eptlab.mmu.scenario import NestedSpace

SMALL = AgingConfig(section_mib=16)
GVA = 0x0000_2000_0000_0000
GUEST_EXPERIMENTS = (
    "aslr-side-channel", "cow-fork", "double-caching", "integrity-monitor", "memory-encryption",
    "nested-overhead", "prefetch-hypercall", "trap-debugger", "tsx-aborts", "model-vs-machine",
)


def check_books(b: BuddyAllocator) -> None:
    """Free lists, the owner's blocks and the others' blocks tile the aged frames exactly, and
    the per-frame states agree with them."""
    cover = np.zeros(len(b._state), np.int8)
    expect = np.full(len(b._state), -1, np.int8)
    first = b._first
    for order, lst in enumerate(b._free.lists):
        for pfn in lst:
            assert pfn % (1 << order) == 0
            cover[pfn - first : pfn - first + (1 << order)] += 1
            expect[pfn - first : pfn - first + (1 << order)] = FREE
    for lo in np.flatnonzero(b._order >= 0).tolist():
        order = int(b._order[lo])
        cover[lo : lo + (1 << order)] += 1
        expect[lo : lo + (1 << order)] = OWNED
    for lo in np.flatnonzero(b._head >= 0).tolist():
        order = int(b._head[lo])
        cover[lo : lo + (1 << order)] += 1
        expect[lo : lo + (1 << order)] = OTHER
    pinned = b._state == PINNED
    cover[pinned] += 1
    expect[pinned] = PINNED
    assert (cover == 1).all(), "a frame is in none or several blocks"
    assert (expect == b._state).all()
    assert b._free.pages == int((b._state == FREE).sum())


def gva_gpa_hpa(space: NestedSpace, pages: int) -> tuple[list[int], list[int]]:
    gpas = [space.tables.guest_physical(GVA + i * 4096) for i in range(pages)]
    assert all(g is not None for g in gpas)
    assert space.ept is not None
    hpas = [space.ept.host_address(g) for g in gpas]  # type: ignore[arg-type]
    return gpas, hpas  # type: ignore[return-value]


@pytest.fixture(scope="module")
def spaces() -> dict[str, NestedSpace]:
    out = {}
    for name, layout, seed in (("aged", "aged", 3), ("again", "aged", 3), ("other", "aged", 4),
                               ("contiguous", "contiguous", 3)):
        space = NestedSpace.create(host_memory=1 << 40, guest_memory=1 << 40, layout=layout,
                                   seed=seed)
        space.map_range(GVA, 8 << 20)
        out[name] = space
    return out


def test_aged_layout_is_scattered_in_both_dimensions(spaces: dict[str, NestedSpace]) -> None:
    gpas, hpas = gva_gpa_hpa(spaces["aged"], 2048)
    # consecutive GVA pages: how often are their GPAs adjacent; consecutive GPAs: their HPAs
    by_gpa = sorted(zip(gpas, hpas, strict=True))
    gpa_runs = consecutive_fraction(gpas)
    hpa_runs = float(np.mean([
        b[1] - a[1] == 4096 for a, b in zip(by_gpa, by_gpa[1:], strict=False) if b[0] - a[0] == 4096
    ] or [False]))
    assert gpa_runs < 0.5 and hpa_runs < 0.5
    gpas_c, hpas_c = gva_gpa_hpa(spaces["contiguous"], 2048)
    assert consecutive_fraction(gpas_c) == 1.0 and consecutive_fraction(hpas_c) == 1.0


def test_layout_is_deterministic_per_seed(spaces: dict[str, NestedSpace]) -> None:
    first, again, other = (gva_gpa_hpa(spaces[k], 512) for k in ("aged", "again", "other"))
    assert first == again
    assert first[0] != other[0] and first[1] != other[1]


def test_aged_space_translates_like_the_tables_say(spaces: dict[str, NestedSpace]) -> None:
    space = spaces["aged"]
    walker = space.walker()
    gpas, hpas = gva_gpa_hpa(space, 64)
    for i in range(0, 64, 7):
        t = walker.translate(GVA + i * 4096 + 8, Access.READ)
        assert t.ok and t.hpa == hpas[i] + 8


def test_aging_leaves_few_free_2m_blocks_and_huge_pages_come_from_compaction() -> None:
    fresh = BuddyAllocator(64 << 20, aging=dataclasses.replace(SMALL, in_use=0.0, resident=0.0,
                                                               rounds=0))
    fresh.alloc()  # ages the first section: nothing happened to it
    assert fresh.fragmentation()["free_in_order_fraction"] > 0.9
    b = BuddyAllocator(64 << 20, aging=SMALL, seed=1)
    b.alloc()
    report = b.fragmentation()
    assert report["free_in_order_fraction"] < 0.2
    assert report["unusable_free_index"] == pytest.approx(1 - report["free_in_order_fraction"])
    huge = [b.alloc(2 << 20) for _ in range(4)]
    assert all(a % (2 << 20) == 0 for a in huge)
    assert b.stats["compactions"] >= 1 and b.stats["pages_migrated"] > 0
    check_books(b)


def test_large_pages_stay_large_under_the_aged_layout() -> None:
    space = NestedSpace.create(host_memory=1 << 40, guest_memory=1 << 40, layout="aged", seed=2)
    space.map_range(GVA, 16 << 20, PageSize.SIZE_2M, PageSize.SIZE_2M)
    assert space.ept is not None
    sizes = {leaf.page_size for _, leaf in space.ept.mapped(1 << 30)}
    assert sizes == {PageSize.SIZE_2M}
    assert space.tables.lookup(GVA + 4096).page_size == PageSize.SIZE_2M  # type: ignore[union-attr]


@settings(max_examples=15, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0, 0, 0, 1, 9]), st.booleans()), max_size=60),
       st.integers(0, 3))
def test_buddy_books_balance_through_any_sequence(ops: list[tuple[int, bool]], seed: int) -> None:
    b = BuddyAllocator(48 << 20, seed=seed, aging=SMALL)
    live: list[int] = []
    for order, release in ops:
        if release and live:
            b.free(live.pop(len(live) // 2))
        else:
            live.append(b.alloc(4096 << order))
    spans = sorted((a, a + s) for a, s in b.blocks.items())
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:], strict=False))
    check_books(b)


@pytest.mark.parametrize("mib", [100, 40])
def test_odd_sized_ranges_age_consistently(mib: int) -> None:
    b = BuddyAllocator(mib << 20, seed=2, aging=dataclasses.replace(SMALL, section_mib=32))
    b.alloc_pages(500)
    for _ in range(3):
        b.alloc(2 << 20)
    check_books(b)


def test_alloc_at_migrates_other_processes_and_refuses_the_owners() -> None:
    b = BuddyAllocator(32 << 20, seed=5, aging=SMALL)
    b.alloc()
    held = int(np.flatnonzero(b._head >= 0)[0]) + b._first
    assert b.alloc_at(held << 12) == held << 12
    with pytest.raises(OutOfMemory):
        b.alloc_at(held << 12)
    check_books(b)


def test_frame_allocator_aged_policy_and_exhaustion() -> None:
    frames = FrameAllocator(8 << 20, policy="aged", aging=dataclasses.replace(SMALL, section_mib=8))
    got = frames.alloc_pages(1000)
    assert len(set(got.tolist())) == 1000 and frames.used_bytes == 1000 * 4096
    assert got[0] in frames
    with pytest.raises(OutOfMemory):
        frames.alloc_pages(2048)


def test_layout_defaults_scopes_and_bad_names() -> None:
    assert default_layout().kind == "aged"
    with layout_scope("contiguous"):
        hv = Hypervisor()
        assert hv.layout.kind == "contiguous" and hv.host.frames.policy == "sequential"
    assert Hypervisor().host.frames.policy == "aged"
    with pytest.raises(ConfigError, match="layout"):
        LayoutConfig.of("scattered")
    with pytest.raises(ConfigError, match="resident"):
        AgingConfig(resident=0.9, in_use=0.5)


@pytest.mark.parametrize("name", GUEST_EXPERIMENTS)
def test_every_guest_experiment_takes_a_layout_and_refuses_a_bad_one(name: str) -> None:
    params_type = get(name).Params
    assert [f.name for f in dataclasses.fields(params_type)][-1] == "layout"
    assert apply_overrides(params_type, {"layout": "contiguous"}).layout == "contiguous"
    with pytest.raises(ConfigError) as err:
        apply_overrides(params_type, {"layout": "fragmented"})
    assert err.value.field == "layout"


def test_a_consumer_that_stops_early_sees_no_leaked_layout() -> None:
    def kinds() -> Iterator[str]:
        while True:
            yield default_layout().kind

    steps = in_layout("contiguous", kinds())
    assert next(steps) == "contiguous"
    assert default_layout().kind == "aged"  # between steps, and after it is abandoned
    assert next(steps) == "contiguous"
