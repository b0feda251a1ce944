"""The data prefetcher of the cache model (:mod:`eptlab.mmu.kernels.cache`): the kernel against
an independent Python model of the same rules (LRU stamps, an OrderedDict of streams), hit/miss
sequence and counters identical; and a sequential stream through the engine, whose DRAM misses
fall by the factor the rules predict."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eptlab.errors import ConfigError
from eptlab.mmu.config import PREFETCHER_KINDS, CacheConfig, MmuConfig, PrefetcherConfig
from eptlab.mmu.engine import Accesses, Engine
from eptlab.mmu.kernels import cache as data_cache
from eptlab.mmu.kernels import layout as L
from eptlab.mmu.scenario import NestedSpace

access_data = cast(Callable[..., Any], data_cache.access_data)

# (sets, ways, per-vCPU) of L1, L2, LLC: small, ways not powers of two
LEVELS = ((2, 3, 1), (4, 4, 1), (8, 5, 0))
VCPUS = 2
PAGE_LINES = 64


class Model:
    """Inclusive L1/L2/LLC with LRU stamps and a prefetched flag per line, and the prefetchers
    as :class:`PrefetcherConfig` describes them."""

    def __init__(self, config: PrefetcherConfig) -> None:
        self.config = config
        self.sets: dict[tuple[int, int, int], dict[int, list[int]]] = {}  # line -> [stamp, flag]
        self.streams = [OrderedDict[int, tuple[int, int]]() for _ in range(VCPUS)]
        self.clock = 0
        self.issued = 0
        self.useful = 0

    def _lines(self, level: int, vcpu: int, line: int) -> dict[int, list[int]]:
        sets, _, per_vcpu = LEVELS[level]
        return self.sets.setdefault((level, vcpu if per_vcpu else 0, line % sets), {})

    def _fetch(self, vcpu: int, line: int, top: int, flag: bool) -> tuple[int, bool]:
        self.clock += 1
        missed = []
        found, flagged = 3, False
        for level in range(top, 3):
            lines = self._lines(level, vcpu, line)
            if line in lines:
                found, flagged = level, bool(lines[line][1])
                lines[line] = [self.clock, 0]
                break
            missed.append(level)
        for level in missed:
            lines = self._lines(level, vcpu, line)
            if len(lines) == LEVELS[level][1]:
                del lines[min(lines, key=lambda k: lines[k][0])]
            lines[line] = [self.clock, int(flag and level == top)]
        return found, flagged

    def _prefetch(self, vcpu: int, line: int, top: int) -> None:
        if line not in self._lines(top, vcpu, line):
            self._fetch(vcpu, line, top, True)
            self.issued += 1

    def access(self, vcpu: int, line: int) -> int:
        found, flagged = self._fetch(vcpu, line, 0, False)
        self.useful += flagged
        if found == 0:
            return found
        c = self.config
        page, offset = divmod(line, PAGE_LINES)
        if c.l1_next_line and offset + 1 < PAGE_LINES:
            self._prefetch(vcpu, line + 1, 0)
        stride = 0
        if c.kind == "next-line":
            stride = 1
        elif c.kind == "stride":
            table = self.streams[vcpu]
            if page in table:
                last, previous = table.pop(page)
            else:
                last, previous = offset, 0
                if len(table) == c.streams:
                    table.popitem(last=False)
            if offset != last:
                stride = offset - last if offset - last == previous else 0
                last, previous = offset, offset - last
            table[page] = (last, previous)
        if stride:
            for j in range(c.degree):
                target = offset + stride * (c.distance + j)
                if not 0 <= target < PAGE_LINES:
                    break
                self._prefetch(vcpu, page * PAGE_LINES + target, 1)
        return found


def _kernel_state(
    config: PrefetcherConfig,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    cdesc = np.zeros((3, 4), np.int64)
    row = 0
    for i, (sets, ways, per_vcpu) in enumerate(LEVELS):
        cdesc[i] = (row, sets, ways, per_vcpu)
        row += sets * (VCPUS if per_vcpu else 1)
    cache = np.full((row, max(w for _, w, _ in LEVELS)), -1, np.int64)
    heads = np.zeros(row, np.int32)
    pcfg = np.array(
        [
            PREFETCHER_KINDS.index(config.kind),
            config.degree,
            config.distance,
            config.streams,
            int(config.l1_next_line),
        ],
        np.int64,
    )
    pf = L.stream_table(VCPUS, config.streams)
    stats = np.zeros((VCPUS, L.NSTATS), np.int64)
    return cache, cdesc, heads, pf, pcfg, stats


segments = st.tuples(
    st.integers(0, VCPUS - 1),
    st.integers(0, 4 * PAGE_LINES - 1),  # first line: four pages
    st.integers(-3, 3),  # stride in lines
    st.integers(1, 12),  # length
)
configs = st.builds(
    PrefetcherConfig,
    kind=st.sampled_from(PREFETCHER_KINDS),
    degree=st.integers(1, 4),
    distance=st.integers(1, 3),
    streams=st.integers(1, 3),
    l1_next_line=st.booleans(),
)


@settings(max_examples=120, deadline=None)
@given(configs, st.lists(segments, max_size=40))
def test_kernel_matches_the_model(config: PrefetcherConfig, runs: list[tuple[int, ...]]) -> None:
    cache, cdesc, heads, pf, pcfg, stats = _kernel_state(config)
    model = Model(config)
    for vcpu, first, stride, length in runs:
        for k in range(length):
            line = (first + stride * k) % (4 * PAGE_LINES)
            got = access_data(cache, cdesc, vcpu, line << 6, heads, pf, pcfg, stats)
            assert got == model.access(vcpu, line)
    assert int(stats[:, L.ST_PF_ISSUED].sum()) == model.issued
    assert int(stats[:, L.ST_PF_USEFUL].sum()) == model.useful
    assert model.useful <= model.issued
    if config.kind == "off" and not config.l1_next_line:
        assert model.issued == 0


GVA = 0x7F00_0000_0000
PAGES = 8


def _sequential(prefetcher: PrefetcherConfig) -> tuple[int, int, int]:
    """DRAM-served data lines, prefetches issued and useful for a 64-byte-stride read of PAGES
    4 KiB pages (all translations warm: only the data stream is measured)."""
    space = NestedSpace.create()
    space.map_range(GVA, 2 << 20)
    config = MmuConfig(cache=CacheConfig(prefetcher=prefetcher))
    engine = Engine(space.memory, config, space.features)
    engine.add_vcpu(space.guest, space.vmcs)
    stream = Accesses.build(GVA + np.arange(0, PAGES * 4096, 64, dtype=np.int64))
    assert engine.run(Accesses.build(GVA + np.arange(0, PAGES * 4096, 4096))).done  # warm TLBs
    engine.flush_caches()
    engine.reset_stats()
    assert engine.run(stream).done
    s = engine.stats()
    assert s.accesses == PAGES * PAGE_LINES
    return s.data_served[3], s.prefetches, s.useful_prefetches


def test_sequential_stream_misses_fall_by_the_expected_factor() -> None:
    """Per page, the stride prefetcher needs three misses (a new stream, a first delta, an
    equal delta) before it runs ahead; it does not cross into the next page, so each page
    starts over: DRAM lines fall from 64 to 3 per page, and every other line is prefetched
    once and used once. The next-line prefetcher (degree 1) misses only each page's first
    line."""
    off, off_issued, _ = _sequential(PrefetcherConfig.off())
    assert off == PAGES * PAGE_LINES and off_issued == 0
    confirm = 3
    stride, issued, useful = _sequential(PrefetcherConfig())
    assert stride == PAGES * confirm
    assert issued == useful == PAGES * (PAGE_LINES - confirm)
    assert off / stride == pytest.approx(PAGE_LINES / confirm)
    nextline, issued, useful = _sequential(PrefetcherConfig(kind="next-line", degree=1))
    assert nextline == PAGES and issued == useful == PAGES * (PAGE_LINES - 1)


@pytest.mark.parametrize(
    ("field", "value"), [("kind", "streamer"), ("degree", 0), ("distance", 99), ("streams", 0)]
)
def test_bad_prefetcher_settings_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        PrefetcherConfig(**{field: value})  # type: ignore[arg-type]
