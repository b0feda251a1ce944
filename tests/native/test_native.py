"""The native measurement helper: built at run time, typed results, latencies in order."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from eptlab import native
from eptlab.errors import ConfigError, ToolchainError
from eptlab.native import build

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")


def test_the_helper_builds_into_the_cache_and_reports_its_version() -> None:
    path = native.library_path()
    assert path.exists() and path.parent.parent == build.cache_dir()
    assert native.load().ept_version() == 1


def test_an_edited_source_is_built_again_in_a_new_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EPTLAB_CACHE", str(tmp_path / "cache"))
    first = build.library_path()
    edited = tmp_path / "measure.c"
    edited.write_text(build.source_path().read_text() + "\n/* edited */\n")
    monkeypatch.setattr(build, "source_path", lambda: edited)
    second = build.library_path()
    assert first.exists() and second.exists() and first.parent != second.parent
    assert build.library_path() == second  # unchanged: found in the cache, not rebuilt


def test_a_missing_compiler_is_a_clean_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "/nonexistent/bin/cc-missing")
    with pytest.raises(ToolchainError, match="cc-missing.*C compiler not found"):
        native.library_path()


def test_the_clock_is_measured_not_assumed() -> None:
    clk = native.clock()
    assert 0.1 < clk.tsc_ghz < 10 and 0.1 < clk.core_ghz < 10
    assert clk.cycles(clk.tsc_ghz * 100.0) == pytest.approx(100.0 * clk.core_ghz)


def test_pointer_chase_latency_grows_from_l1_to_beyond_the_l2() -> None:
    """16 KiB fits any L1d; 1 MiB only an L2; 64 MiB is beyond every L2 (and its 4 KiB pages
    beyond the TLB reach): each must cost more per load than the one before, the last many
    times the first."""
    results = [native.run_pattern("pointer-chase", size, "4k", accesses=16_384, seed=3,
                                  repeats=3) for size in (16 << 10, 1 << 20, 64 << 20)]
    l1, l2, far = (r.cycles_per_access for r in results)
    assert l1 < l2 < far
    assert far > 4 * l1
    assert all(r.cycles.count == 3 and r.accesses == 16_384 for r in results)
    assert all(r.ns_per_access == pytest.approx(r.cycles_per_access / r.clock.core_ghz)
               for r in results)


@pytest.mark.parametrize("pattern", ["dependent-random", "random", "gups", "sequential"])
def test_every_pattern_runs_on_both_page_kinds(pattern: str) -> None:
    for page in native.PAGE_KINDS:
        r = native.run_pattern(pattern, 4 << 20, page, accesses=4_096, seed=1, repeats=2)
        assert r.pattern == pattern and r.page == page and r.cycles_per_access > 0
        assert r.huge_pages_obtained == (r.huge_bytes == 4 << 20)
        if page == "4k":  # MADV_NOHUGEPAGE: never a huge page
            assert r.huge_bytes == 0 and not r.huge_pages_obtained


def test_a_buffer_is_reused_for_smaller_footprints_and_refused_for_larger() -> None:
    with native.Buffer(1 << 20, "4k") as buf:
        r = native.run_pattern("pointer-chase", 64 << 10, "4k", accesses=1_024, buffer=buf)
        assert r.footprint_bytes == 64 << 10
        with pytest.raises(ConfigError, match="buffer"):
            native.run_pattern("random", 2 << 20, "4k", accesses=1_024, buffer=buf)
        with pytest.raises(ConfigError, match="buffer"):
            native.run_pattern("random", 1 << 20, "2m", accesses=1_024, buffer=buf)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"pattern": "zigzag"}, "pattern"),
    ({"footprint_bytes": 100}, "footprint_bytes"),
    ({"page": "1g"}, "page"),
    ({"accesses": 3}, "accesses"),
    ({"stride": 12}, "stride"),
])
def test_bad_arguments_name_the_field(kwargs: dict[str, object], field: str) -> None:
    args: dict[str, object] = {"pattern": "random", "footprint_bytes": 1 << 20, "page": "4k",
                               "accesses": 1_024, **kwargs}
    with pytest.raises(ConfigError, match=field):
        native.run_pattern(**args)  # type: ignore[arg-type]


def test_copy_bandwidth_is_positive_per_repeat() -> None:
    c = native.run_copy(8 << 20, repeats=2, page="4k", chunk=1 << 20)
    assert c.bytes_per_cycle.count == 2 and c.bytes_per_cycle.median > 0
    assert c.gb_per_s.median == pytest.approx(c.bytes_per_cycle.median * c.clock.core_ghz)


def test_the_chase_is_one_cycle_through_every_line() -> None:
    import ctypes

    nodes = 1024
    with native.Buffer(nodes * 64, "4k") as buf:
        native.prepare_chase(buf, nodes * 64, seed=7)
        seen, here = set(), buf.base
        for _ in range(nodes):
            assert buf.base <= here < buf.base + nodes * 64 and (here - buf.base) % 64 == 0
            seen.add(here)
            here = ctypes.c_uint64.from_address(here).value
        assert here == buf.base and len(seen) == nodes  # back at the start after every node


def test_one_line_per_page_costs_more_than_the_same_lines_packed() -> None:
    """512 lines on 512 pages miss the L1 DTLB on every load; on 8 pages they do not."""
    r = native.run_stlb(512, accesses=8_192, repeats=3)
    assert r.spread_out.median > r.packed.median
    assert r.stlb_hit.count == 3
