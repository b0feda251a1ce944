"""Synthetic workloads: determinism, ranges, mixes, and the shape of each stream."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from eptlab.errors import ConfigError
from eptlab.traces import TraceChunk
from eptlab.workloads import (
    WORKLOADS,
    Gups,
    Mixed,
    PointerChase,
    Sequential,
    Strided,
    SyntheticWorkload,
    UniformRandom,
    Workload,
    Zipf,
    make_workload,
)

FP = 4 << 20  # 4 MiB: 1024 pages
BASE = 0x7F12_3400_0000
N = 100_000
WF = 0.3

# Mixed with a short period so 100k accesses average over many phase cycles.
MIXED_PHASES = (
    (Zipf(footprint=1 << 20), 0.5),
    (Sequential(footprint=1 << 20), 0.3),
    (UniformRandom(footprint=1 << 20, write_fraction=1.0), 0.2),
)


def build(name: str, seed: int = 0) -> tuple[SyntheticWorkload, float]:
    """A workload of every kind, and the write fraction it should show."""
    if name == "gups":
        return Gups(footprint=FP, seed=seed), 0.5
    if name == "mixed":
        return Mixed(footprint=FP, seed=seed, period=1000), 0.7 * 0.2
    extra: dict[str, Any] = {"stride": 4096 + 64} if name == "strided" else {}
    cls: Any = WORKLOADS[name]
    workload: SyntheticWorkload = cls(footprint=FP, seed=seed, write_fraction=WF, **extra)
    return workload, WF


def collect(chunks: Any) -> TraceChunk:
    parts = list(chunks)
    return TraceChunk(
        address=np.concatenate([c.address for c in parts]),
        kind=np.concatenate([c.kind for c in parts]),
        size=np.concatenate([c.size for c in parts]),
    )


def same(a: TraceChunk, b: TraceChunk) -> bool:
    return bool(
        np.array_equal(a.address, b.address)
        and np.array_equal(a.kind, b.kind)
        and np.array_equal(a.size, b.size)
    )


ALL = sorted(WORKLOADS)


def test_registry_names_and_protocol() -> None:
    assert set(WORKLOADS) == {
        "sequential",
        "strided",
        "random",
        "zipf",
        "pointer-chase",
        "gups",
        "mixed",
    }
    for name, cls in WORKLOADS.items():
        workload = make_workload(name, footprint=FP)
        assert type(workload) is cls and workload.name == name
        assert isinstance(workload, Workload)


@pytest.mark.parametrize("name", ALL)
def test_deterministic_and_chunk_independent(name: str) -> None:
    workload, _ = build(name, seed=7)
    small = list(workload.stream(BASE, N, chunk=1000))
    assert [len(c) for c in small] == [1000] * (N // 1000)
    big = collect(workload.stream(BASE, N, chunk=100_000))
    assert len(big) == N
    assert same(collect(small), big)
    again, _ = build(name, seed=7)
    assert same(collect(again.stream(BASE, N, chunk=33_333)), big)
    # any window, started anywhere, is the same slice of the stream
    window = workload.chunk_at(BASE, 54_321, 777)
    assert same(window, TraceChunk(big.address[54_321:55_098], big.kind[54_321:55_098],
                                   big.size[54_321:55_098]))  # fmt: skip


@pytest.mark.parametrize("name", ALL)
def test_different_seeds_give_different_streams(name: str) -> None:
    a, _ = build(name, seed=1)
    b, _ = build(name, seed=2)
    sa, sb = a.chunk_at(BASE, 0, 10_000), b.chunk_at(BASE, 0, 10_000)
    differ = np.mean((sa.address != sb.address) | (sa.kind != sb.kind))
    assert differ > 0.3


@pytest.mark.parametrize("name", ALL)
def test_addresses_inside_footprint_and_kinds(name: str) -> None:
    workload, _ = build(name, seed=3)
    chunk = workload.chunk_at(BASE, 0, N)
    assert chunk.address.dtype == np.int64 and chunk.kind.dtype == np.int8
    assert chunk.size.dtype == np.int32
    assert chunk.address.min() >= BASE
    assert (chunk.address + chunk.size).max() <= BASE + FP
    assert (chunk.address % chunk.size == 0).all()  # aligned to their size
    assert set(np.unique(chunk.kind).tolist()) <= {0, 1, 2}
    if name != "mixed":
        assert not (chunk.kind == 2).any()


def test_high_half_base_is_signed_like_lackey() -> None:
    base = 0xFFFF_8000_0000_0000
    chunk = Sequential(footprint=FP).chunk_at(base, 0, 3)
    assert chunk.address.tolist() == [base - (1 << 64) + i * 8 for i in range(3)]


@pytest.mark.parametrize("name", ALL)
def test_write_mix(name: str) -> None:
    workload, expected = build(name, seed=5)
    kinds = collect(workload.stream(BASE, N, chunk=30_000)).kind
    # 7 binomial standard deviations at N = 100k is below 0.01
    assert abs(np.mean(kinds == 1) - expected) < 0.01


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_write_fraction_extremes(fraction: float) -> None:
    kinds = UniformRandom(footprint=FP, write_fraction=fraction).chunk_at(0, 0, 10_000).kind
    assert (kinds == int(fraction)).all()


def test_sequential_exact_offsets_wrap() -> None:
    chunk = Sequential(footprint=2 * 4096, access_size=16).chunk_at(BASE, 0, 1500)
    expected = [BASE + (i * 16) % 8192 for i in range(1500)]
    assert chunk.address.tolist() == expected
    assert (chunk.size == 16).all()


@pytest.mark.parametrize(
    ("footprint", "stride", "start"),
    [
        (10 * 4096, 3 * 4096, 0),  # wraps through every page
        (10 * 4096, 4096 + 8, 0),
        ((1 << 40) - 3 * 4096, (1 << 40) - 7 * 4096 + 8, 1 << 45),  # no 64-bit overflow
        (1 << 20, 5 << 40, 12345),  # stride larger than the footprint
    ],
)
def test_strided_exact_offsets(footprint: int, stride: int, start: int) -> None:
    workload = Strided(footprint=footprint, stride=stride)
    chunk = workload.chunk_at(BASE, start, 2000)
    expected = [BASE + ((start + i) * stride) % footprint for i in range(2000)]
    assert chunk.address.tolist() == expected


def test_uniform_random_covers_pages_evenly() -> None:
    offsets = UniformRandom(footprint=64 * 4096).chunk_at(0, 0, N).address
    counts = np.bincount(offsets // 4096, minlength=64)
    mean = N / 64
    assert counts.min() > 0.85 * mean and counts.max() < 1.15 * mean
    slots = 64 * 4096 // 8
    covered = slots * (1 - math.exp(-N / slots))  # expected distinct words after N draws
    assert abs(len(np.unique(offsets)) - covered) < 0.01 * slots


def test_pointer_chase_is_one_cycle_over_all_nodes() -> None:
    chase = PointerChase(footprint=16 * 4096, node_size=128, seed=9)
    nodes = chase.nodes
    assert nodes == 512
    visited = chase.chunk_at(0, 0, 3 * nodes).address // 128
    first = visited[:nodes]
    assert sorted(first.tolist()) == list(range(nodes))  # every node exactly once per cycle
    assert np.array_equal(visited[nodes : 2 * nodes], first)  # the cycle repeats
    assert np.array_equal(visited[2 * nodes :], first)
    successors = chase.successors()
    assert np.array_equal(successors[visited[:-1]], visited[1:])  # a dependent chain
    node, steps = 0, 0
    while True:  # following the pointers from any node returns after exactly `nodes` steps
        node, steps = int(successors[node]), steps + 1
        if node == 0:
            break
    assert steps == nodes
    assert np.mean(np.diff(first) == 1) < 0.05  # scattered, not a sequential walk


def test_pointer_chase_accesses_are_node_heads() -> None:
    chunk = PointerChase(footprint=FP, node_size=256, write_fraction=0.5).chunk_at(0, 0, 5000)
    assert (chunk.address % 256 == 0).all()
    assert (chunk.size == 8).all()


def test_gups_read_then_write_same_word() -> None:
    chunk = Gups(footprint=FP, seed=4).chunk_at(BASE, 0, N)
    assert (chunk.kind[0::2] == 0).all() and (chunk.kind[1::2] == 1).all()
    assert np.array_equal(chunk.address[0::2], chunk.address[1::2])
    reads = chunk.address[0::2]
    assert np.mean(reads[1:] != reads[:-1]) > 0.99  # each update picks a new word
    # a window starting mid-pair starts with that pair's write
    odd = Gups(footprint=FP, seed=4).chunk_at(BASE, 101, 4)
    assert odd.kind.tolist() == [1, 0, 1, 0]
    assert odd.address[0] == chunk.address[100]


def test_zipf_is_skewed_and_hot_pages_are_scattered() -> None:
    footprint = 64 << 20  # 16384 pages
    zipf = Zipf(footprint=footprint, alpha=1.2, seed=11)
    pages = zipf.chunk_at(0, 0, N).address // 4096
    counts = np.sort(np.bincount(pages, minlength=footprint // 4096))[::-1]
    top = counts[: len(counts) // 100].sum() / N
    assert top > 0.6  # exact share for 1.2 over 16384 pages: about 0.78
    hottest = np.argsort(np.bincount(pages, minlength=footprint // 4096))[::-1][:50]
    assert np.ptp(hottest) > footprint // 4096 // 2  # spread over the footprint
    assert not np.array_equal(np.sort(hottest), np.arange(50))
    inside = zipf.chunk_at(0, 0, N).address % 4096
    assert len(np.unique(inside)) == 4096 // 8  # offsets inside pages cover every word


def test_zipf_rank_distribution_matches_law_beyond_exact_head() -> None:
    zipf = Zipf(footprint=1 << 30, alpha=1.0)  # 262144 pages: head exact, tail continuous
    pages = zipf.footprint // 4096
    ranks = zipf.ranks(np.arange(200_000, dtype=np.uint64))
    weights = 1.0 / np.arange(1, pages + 1)
    law = weights / weights.sum()
    for lo, hi in [(0, 1), (1, 10), (10, 1000), (Zipf.HEAD, 100_000), (100_000, pages)]:
        observed = np.mean((ranks >= lo) & (ranks < hi))
        p = law[lo:hi].sum()
        assert abs(observed - p) < 5 * math.sqrt(p * (1 - p) / ranks.size) + 1e-3
    assert ranks.max() < pages


def test_mixed_fetch_fraction_and_code_region() -> None:
    mixed = Mixed(footprint=FP, fetch_fraction=0.3, code_bytes=64 << 10, jump_every=8)
    chunk = mixed.chunk_at(BASE, 0, N)
    fetch = chunk.kind == 2
    assert abs(fetch.mean() - 0.3) < 0.002  # exact per block of 64
    code_start = BASE + FP - (64 << 10)  # code is the last code_bytes of the footprint
    assert (chunk.address[fetch] >= code_start).all()
    assert (chunk.address[~fetch] + chunk.size[~fetch] <= code_start).all()
    assert (chunk.size[fetch] == 16).all()
    steps = np.diff(chunk.address[fetch])
    assert abs(np.mean(steps == 16) - 7 / 8) < 0.02  # sequential, with a jump every 8
    gaps = np.diff(np.flatnonzero(fetch))
    assert len(np.unique(gaps)) > 3  # interleaving is irregular, not a fixed pattern


def test_mixed_runs_its_phases_in_order() -> None:
    data = FP - (256 << 10)
    phases = (
        (Sequential(footprint=data, access_size=1), 300),
        (UniformRandom(footprint=data, access_size=2, write_fraction=1.0), 0.5),
        (Zipf(footprint=data, access_size=4), 100),
    )
    mixed = Mixed(footprint=FP, phases=phases, period=400)
    assert mixed.phase_lengths == (300, 200, 100)
    chunk = mixed.chunk_at(0, 0, N)
    data_sizes = chunk.size[chunk.kind != 2]
    cycle = [1] * 300 + [2] * 200 + [4] * 100
    repeats = len(data_sizes) // 600 + 1
    assert np.array_equal(data_sizes, np.tile(cycle, repeats)[: len(data_sizes)])
    # the sequential phase resumes where it stopped in the previous cycle
    scan = chunk.address[(chunk.kind != 2) & (chunk.size == 1)]
    assert np.array_equal(scan, np.arange(len(scan)))
    writes = (chunk.kind == 1) == (chunk.size == 2)
    assert writes.all()  # only the random phase writes


def test_mixed_default_phases() -> None:
    mixed = Mixed(footprint=FP, seed=2, period=1000)
    kinds = [type(w).__name__ for w, _ in mixed.phases]
    assert kinds == ["Zipf", "Sequential", "UniformRandom"]
    assert mixed.phase_lengths == (500, 300, 200)
    chunk = mixed.chunk_at(0, 0, 10_000)
    data = chunk.kind != 2
    kind, address = chunk.kind[data], chunk.address[data]
    assert (kind[:500] == 0).all() and (kind[800:1000] == 1).all() and (kind[500:800] == 0).all()
    assert np.array_equal(address[500:800], np.arange(300) * 8)  # the scan
    assert len(np.unique(address[:500] // 4096)) < 400  # zipf reads repeat hot pages


def test_stream_arguments_are_checked() -> None:
    workload = Sequential(footprint=FP)
    with pytest.raises(ConfigError) as info:
        workload.stream(-1, 10)
    assert info.value.field == "base"
    with pytest.raises(ConfigError) as info:
        workload.stream((1 << 64) - 4096, 10)
    assert info.value.field == "base"
    with pytest.raises(ConfigError) as info:
        workload.stream(0, -5)
    assert info.value.field == "accesses"
    with pytest.raises(ConfigError) as info:
        workload.stream(0, 5, chunk=0)
    assert info.value.field == "chunk"
    assert list(workload.stream(0, 0)) == []


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("nope", {"footprint": FP}, "name"),
        ("sequential", {"footprint": FP, "strid": 8}, "strid"),
        ("gups", {"footprint": FP, "write_fraction": 0.5}, "write_fraction"),
        ("sequential", {}, "footprint"),
        ("sequential", {"footprint": 0}, "footprint"),
        ("sequential", {"footprint": -4096}, "footprint"),
        ("sequential", {"footprint": 4097}, "footprint"),
        ("sequential", {"footprint": 1000}, "footprint"),
        ("sequential", {"footprint": 1 << 41}, "footprint"),
        ("sequential", {"footprint": True}, "footprint"),
        ("sequential", {"footprint": 4096.0}, "footprint"),
        ("random", {"footprint": FP, "seed": 1.5}, "seed"),
        ("random", {"footprint": FP, "write_fraction": -0.1}, "write_fraction"),
        ("random", {"footprint": FP, "write_fraction": 1.5}, "write_fraction"),
        ("random", {"footprint": FP, "write_fraction": float("nan")}, "write_fraction"),
        ("random", {"footprint": FP, "access_size": 0}, "access_size"),
        ("random", {"footprint": FP, "access_size": 12}, "access_size"),
        ("random", {"footprint": FP, "access_size": 8192}, "access_size"),
        ("strided", {"footprint": FP, "stride": 0}, "stride"),
        ("strided", {"footprint": FP, "stride": -4096}, "stride"),
        ("strided", {"footprint": FP, "stride": 12}, "stride"),
        ("zipf", {"footprint": FP, "alpha": 0}, "alpha"),
        ("zipf", {"footprint": FP, "alpha": float("inf")}, "alpha"),
        ("pointer-chase", {"footprint": FP, "node_size": 0}, "node_size"),
        ("pointer-chase", {"footprint": FP, "node_size": 60}, "node_size"),
        ("pointer-chase", {"footprint": 4096, "node_size": 8192}, "node_size"),
        ("mixed", {"footprint": 256 << 10}, "code_bytes"),
        ("mixed", {"footprint": FP, "code_bytes": 1000}, "code_bytes"),
        ("mixed", {"footprint": FP, "fetch_fraction": 1.5}, "fetch_fraction"),
        ("mixed", {"footprint": FP, "period": 0}, "period"),
        ("mixed", {"footprint": FP, "jump_every": 0}, "jump_every"),
        ("mixed", {"footprint": FP, "phases": [(Sequential(footprint=FP), 0.5)]}, "phases"),
        ("mixed", {"footprint": FP, "phases": [("sequential", 0.5)]}, "phases"),
        ("mixed", {"footprint": FP, "phases": [(Sequential(footprint=4096),)]}, "phases"),
        ("mixed", {"footprint": FP, "phases": [(Sequential(footprint=4096), 0)]}, "phases[0]"),
        ("mixed", {"footprint": FP, "phases": [(Sequential(footprint=4096), 2.0)]}, "phases[0]"),
    ],
)
def test_bad_parameters_name_the_field(name: str, params: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_workload(name, **params)
    assert info.value.field == field


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(ConfigError) as info:
        Strided(footprint=FP, stride=0)
    assert info.value.field == "stride"


def test_mixed_accepts_lists_and_stays_hashable() -> None:
    mixed = make_workload("mixed", footprint=FP, phases=[[Sequential(footprint=4096), 10]])
    assert isinstance(mixed, Mixed)
    assert mixed.phases == ((Sequential(footprint=4096), 10),)
    assert hash(mixed) == hash(Mixed(footprint=FP, phases=((Sequential(footprint=4096), 10),)))
