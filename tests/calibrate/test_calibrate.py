"""eptlab calibrate: plateaus from a latency curve, the plan, and the profile it writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from eptlab.calibrate.host import cache_sizes
from eptlab.calibrate.plan import GIB, KIB, MIB, Plan, at_least_four_llc, curve_footprints
from eptlab.calibrate.plateaus import plateaus, plateaus_by_size, segments
from eptlab.cli import main
from eptlab.costs import CostProfile
from eptlab.errors import ConfigError
from eptlab.native import Samples

needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")

STAIRS = [(16 * KIB, 5.0), (24 * KIB, 5.1), (64 * KIB, 9.0), (128 * KIB, 15.8),
          (256 * KIB, 16.0), (1 * MIB, 17.0), (4 * MIB, 60.0), (16 * MIB, 70.0),
          (64 * MIB, 75.0), (256 * MIB, 80.0), (1 * GIB, 300.0), (2 * GIB, 330.0)]


def test_a_staircase_is_cut_at_its_steps_and_each_level_is_its_median() -> None:
    found = plateaus(STAIRS)
    assert [(p.level, p.first, p.last) for p in found] == [
        ("l1", 0, 2), ("l2", 3, 5), ("llc", 6, 9), ("dram", 10, 11)]
    assert [p.latency for p in found] == [5.1, 16.0, 72.5, 330.0]  # DRAM: the largest footprint


def test_with_cache_sizes_each_level_is_the_median_of_the_points_well_inside_it() -> None:
    found = plateaus_by_size(STAIRS, l1=48 * KIB, l2=2 * MIB, llc=512 * MIB)
    assert found is not None
    assert [(p.level, p.indices) for p in found] == [
        ("l1", (0, 1)), ("l2", (3, 4, 5)), ("llc", (6, 7, 8, 9)), ("dram", (11,))]
    assert [p.latency for p in found] == [5.05, 16.0, 72.5, 330.0]
    assert plateaus_by_size(STAIRS, l1=48 * KIB, l2=2 * MIB, llc=4 * GIB) is None  # no DRAM point
    assert plateaus_by_size(STAIRS[:3], l1=48 * KIB, l2=2 * MIB, llc=1 * MIB) is None


def test_segments_is_the_least_squares_cut() -> None:
    y = [1.0, 1.0, 5.0, 5.0, 5.0, 9.0]
    assert segments(y, 3) == [(0, 1), (2, 4), (5, 5)]
    assert segments(y, 1) == [(0, 5)]
    with pytest.raises(ConfigError, match="curve"):
        segments(y, 7)


def test_a_curve_that_does_not_grow_in_footprint_is_refused() -> None:
    with pytest.raises(ConfigError, match="increase"):
        plateaus([(2, 1.0), (1, 2.0), (3, 3.0), (4, 4.0)])


def test_the_full_curve_reaches_four_times_the_llc_in_half_octaves_then_octaves() -> None:
    sizes = curve_footprints(16 * KIB, at_least_four_llc(480 * MIB), 64 * MIB)
    assert sizes[0] == 16 * KIB and sizes[-1] == 2 * GIB >= 4 * 480 * MIB
    assert all(b > a for a, b in zip(sizes, sizes[1:], strict=False))
    assert 22 * KIB < sizes[1] < 23 * KIB and sizes[-2] == GIB  # sqrt(2) steps, then doubling
    plan = Plan.full(480 * MIB, walk_max=4 * GIB)
    assert plan.walk_sizes == (GIB, 2 * GIB, 4 * GIB) and plan.buffer_bytes == 4 * GIB


def test_cache_sizes_are_read_from_sysfs_without_instruction_caches(tmp_path: Path) -> None:
    for i, (kind, level, size) in enumerate([("Data", "1", "48K"), ("Instruction", "1", "64K"),
                                             ("Unified", "2", "2048K"), ("Unified", "3", "480M")]):
        d = tmp_path / f"index{i}"
        d.mkdir()
        (d / "type").write_text(kind)
        (d / "level").write_text(level)
        (d / "size").write_text(size)
    assert cache_sizes(tmp_path) == {"l1d": 48 * KIB, "l2": 2 * MIB, "l3": 480 * MIB}


def test_the_spread_is_the_interquartile_range() -> None:
    s = Samples((1.0, 2.0, 3.0, 4.0, 100.0))
    assert s.median == 3.0 and s.spread == 2.0 and s.relative_spread == pytest.approx(2 / 3)
    assert Samples((7.0,)).spread == 0.0
    assert Samples((-3.0, -2.0, -1.0)).relative_spread == pytest.approx(0.5)  # of |median|


def _measured(path: Path) -> dict[str, dict[str, object]]:
    rows = CostProfile.load(path).as_rows()
    # the values this (--quick) run measured say so in their reference
    return {r["key"]: r for r in rows if r["source"] == "measured" and "--quick" in r["ref"]}


@needs_cc
@pytest.mark.kvm
def test_calibrate_quick_writes_a_profile_that_loads_with_measured_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "profiles" / "here.toml"
    assert main(["calibrate", "--quick", "--out", str(out), "--name", "here"]) == 0
    measured = _measured(out)
    expected = {"clock_ghz", "stlb_hit_cycles", "l1_latency", "l2_latency", "llc_latency",
                "dram_latency",
                "copy_bytes_per_cycle", "walk_penalty_4k_cycles", "cpuid_exit_us",
                "kvm_exit_us", "kvm_wp_trap_us", "kvm_dirty_harvest_ns_per_page",
                "kvm_fork_ms_per_gib"}
    assert set(measured) == expected
    for row in measured.values():
        assert row["date"] and row["host"] and row["samples"] >= 2  # type: ignore[operator]
        assert row["spread"] is not None and row["spread"] >= 0  # type: ignore[operator]
    assert measured["l1_latency"]["value"] < measured["dram_latency"]["value"]  # type: ignore[operator]
    profile = CostProfile.load(out)
    assert profile.name == "here"
    default = CostProfile.default()
    assert profile.values["vmexit_cycles"] == default.values["vmexit_cycles"]  # not measured
    raw = json.loads(out.with_suffix(".json").read_text())
    assert raw["quick"] and raw["curve"] and raw["kvm"]["exit_us"]
    capsys.readouterr()
    assert main(["costs", "--profile", str(out), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["name"] == "here" and len(listed["values"]) == len(default.values)


@needs_cc
def test_without_kvm_the_kvm_values_are_the_base_profiles(tmp_path: Path) -> None:
    out = tmp_path / "p.toml"
    assert main(["calibrate", "--quick", "--no-kvm", "--out", str(out)]) == 0
    measured = _measured(out)
    assert "l2_latency" in measured and not any(k.startswith("kvm_") for k in measured)
    assert CostProfile.load(out).values["kvm_exit_us"] == \
        CostProfile.default().values["kvm_exit_us"]


def test_a_missing_compiler_stops_calibrate_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CC", "/nonexistent/bin/no-such-cc")
    out = tmp_path / "p.toml"
    assert main(["calibrate", "--quick", "--no-kvm", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("eptlab: error: /nonexistent/bin/no-such-cc: C compiler not found")
    assert not out.exists()


def test_a_difference_below_zero_is_recorded_as_zero_and_says_so() -> None:
    from eptlab.calibrate.host import HostInfo
    from eptlab.calibrate.profile import _Builder

    host = HostInfo("h", "cpu", {}, False, "2026-12-07")
    b = _Builder(host, Plan.quick())
    b.add("walk_penalty_4k_cycles", Samples((-3.0, -1.0, 2.0)), "cycles", "4k minus 2m", "doc")
    v = b.values["walk_penalty_4k_cycles"]
    assert v.value == 0.0 and "-1" in v.source.ref and "recorded as 0" in v.source.ref
    assert v.source.kind == "measured" and v.source.samples == 3 and v.source.host == "h (cpu)"


@needs_cc
def test_sizes_beyond_the_memory_cap_are_skipped_with_the_reason(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    from eptlab import native
    from eptlab.calibrate.memory import MemoryCalibration

    monkeypatch.setattr(native, "mem_available", lambda: 40 * MIB)  # cap: 60 % = 24 MiB
    run = MemoryCalibration(Plan.quick(kvm=False))
    labels = list(run.run())
    assert len(labels) == run.steps()
    r = run.results
    assert r.buffer_bytes == {"2m": 16 * MIB, "4k": 16 * MIB}
    assert max(p.footprint_bytes for p in r.curve["4k"]) == 16 * MIB
    assert not r.walk and r.copy is None  # the 64 MiB walk and 2 x 16 MiB copy do not fit
    assert any("64 MiB on 4k pages: more than 60% of MemAvailable (24 MiB allowed)" in s
               for s in r.skipped)


def test_every_shipped_profile_loads_by_name_with_measured_values(
    capsys: pytest.CaptureFixture[str]
) -> None:
    from eptlab.costs.active import shipped_profiles

    shipped = shipped_profiles()
    assert shipped, "a calibrated profile of this machine kind is shipped"
    for name in shipped:
        assert main(["costs", "--profile", name, "--json"]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert listed["name"] == name
        measured = [v for v in listed["values"] if v["source"] == "measured"]
        assert {"l1_latency", "dram_latency", "clock_ghz"} <= {v["key"] for v in measured}
        assert all(v["date"] and v["host"] and v["samples"] for v in measured)
