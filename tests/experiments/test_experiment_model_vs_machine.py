"""model-vs-machine: its rows (measured natively, predicted by the engine), the error computed
from the two, the machine's cache geometry, skipped footprints and the reading."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pandas as pd
import pytest

from eptlab import native
from eptlab.costs import CostProfile
from eptlab.experiments import model_vs_machine as mvm
from eptlab.experiments.registry import get

COLUMNS = {
    "pattern", "footprint_bytes", "page_size", "outer_ept_page", "measured_cycles_per_access",
    "predicted_cycles_per_access", "error_pct",
}
needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")

TINY = mvm.ModelVsMachineParams(
    patterns=("random", "sequential"),
    footprints_mib=(1, 64),
    pages=("4k",),
    outer_ept_pages=("4k", "1g"),
    native_accesses=2048,
    repeats=1,
    seq_scan_mib=1,
    sim_warmup=4000,
    sim_accesses=8000,
    memory_margin_mib=0,
)


@needs_cc
def test_rows_have_the_columns_and_the_error_is_computed_from_the_two_numbers() -> None:
    assert get("model-vs-machine") is mvm.ModelVsMachine
    rows = list(mvm.ModelVsMachine().rows(TINY, lambda done, total: None))
    assert len(rows) == 2 * 1 * 2 * 2  # footprints x pages x outer EPT pages x patterns
    table = pd.DataFrame(rows)
    assert set(table.columns) >= COLUMNS
    for r in rows:
        measured, predicted = r["measured_cycles_per_access"], r["predicted_cycles_per_access"]
        assert measured > 0 and predicted > 0
        # both numbers are rounded to 0.01 before the row is written: allow that much
        assert r["error_pct"] == pytest.approx(100 * (predicted - measured) / measured, abs=0.051)
    # one native measurement per (pattern, footprint, page) serves every outer EPT page
    assert table.groupby(["pattern", "footprint_bytes"]).measured_cycles_per_access.nunique()\
        .eq(1).all()
    random = table[table.pattern == "random"].set_index(["outer_ept_page", "footprint_bytes"])
    for outer in TINY.outer_ept_pages:  # 1 MiB fits the L2; 64 MiB misses it and the TLBs
        small = random.loc[(outer, 1 << 20), "predicted_cycles_per_access"]
        large = random.loc[(outer, 64 << 20), "predicted_cycles_per_access"]
        assert large > small


def test_a_footprint_that_does_not_fit_is_skipped_with_a_reason(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(native, "mem_available", lambda: 8 << 20)
    params = dataclasses.replace(TINY, footprints_mib=(64,))
    assert list(mvm.ModelVsMachine().rows(params, lambda done, total: None)) == []
    assert "skipping 64 MiB" in capsys.readouterr().err


def test_machine_caches_keep_the_reported_sizes_with_power_of_two_sets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for index, (level, kind, size_k, ways) in enumerate(
        [(1, "Data", 48, 12), (1, "Instruction", 64, 16), (2, "Unified", 2048, 16),
         (3, "Unified", 491520, 16)]
    ):
        d = tmp_path / f"index{index}"
        d.mkdir()
        for name, value in (("level", level), ("type", kind), ("size", f"{size_k}K"),
                            ("ways_of_associativity", ways)):
            (d / name).write_text(f"{value}\n")
    monkeypatch.setattr(mvm, "SYSFS_CACHE", tmp_path)
    profile = CostProfile.default()
    cache, text = mvm.machine_caches(profile)
    assert (cache.l1.size, cache.l1.ways) == (48 << 10, 12)
    assert (cache.l2.size, cache.l2.ways) == (2 << 20, 16)
    assert cache.llc.size == 480 << 20 and cache.llc.sets == 1 << 18 and cache.llc.ways == 30
    assert cache.l2.latency == profile.cycles("l2_latency")
    assert cache.dram_latency == profile.cycles("dram_latency")
    assert "llc 491520 KiB 30-way" in text


def test_the_reading_names_the_outer_page_with_the_smallest_errors() -> None:
    rows = []
    for outer, error in (("4k", 80.0), ("2m", -10.0), ("1g", 30.0)):
        for page, measured in (("4k", 100.0), ("2m", 60.0)):
            predicted = measured * (1 + error / 100)
            rows.append({
                "pattern": "random", "footprint_bytes": 1 << 30, "page_size": page,
                "outer_ept_page": outer, "measured_cycles_per_access": measured,
                "predicted_cycles_per_access": predicted, "error_pct": error,
                "huge_pages_obtained": True,
            })
    text = " ".join(mvm.ModelVsMachine().interpret(pd.DataFrame(rows), TINY))
    assert "all rows: 4k 80%, 2m 10%, 1g 30%; 2m fits best" in text and "equally" not in text
    # page penalty: measured 40; predicted 40 * (1 + error): 2m is off by -4, 1g by +12
    assert "fits best with 2m outer pages" in text
    serial = pd.DataFrame(rows).assign(pattern="pointer-chase")
    serial.loc[serial.outer_ept_page == "1g", "error_pct"] = 1.0  # now 1g fits the serial rows
    text = " ".join(mvm.ModelVsMachine().interpret(pd.concat([pd.DataFrame(rows), serial]), TINY))
    assert "serial pointer-chase rows: 4k 80%, 2m 10%, 1g 1%; 1g fits best" in text


def test_outer_pages_with_the_same_error_are_named_together() -> None:
    rows = [{
        "pattern": "random", "footprint_bytes": 1 << 30, "page_size": "4k",
        "outer_ept_page": outer, "measured_cycles_per_access": 100.0,
        "predicted_cycles_per_access": 100.0 + error, "error_pct": error,
        "huge_pages_obtained": True,
    } for outer, error in (("4k", 50.0), ("2m", 20.0), ("1g", 20.0))]
    text = " ".join(mvm.ModelVsMachine().interpret(pd.DataFrame(rows), TINY))
    assert "2m and 1g fit equally well" in text and "fits best" not in text


def test_2m_rows_without_2m_pages_are_left_out_of_the_fit() -> None:
    """A 2 MiB-page run that did not get 2 MiB pages measured 4 KiB pages: its error would
    count against the model for what the machine did not do."""
    rows = [{
        "pattern": "random", "footprint_bytes": 1 << 30, "page_size": page,
        "outer_ept_page": "4k", "measured_cycles_per_access": 100.0,
        "predicted_cycles_per_access": 100.0 + error, "error_pct": error,
        "huge_pages_obtained": huge,
    } for page, error, huge in (("4k", 10.0, True), ("2m", 90.0, False))]
    text = " ".join(mvm.ModelVsMachine().interpret(pd.DataFrame(rows), TINY))
    assert "all rows: 4k 10%" in text and "1024 MiB did not get 2 MiB pages" in text
    assert "(1 of the rows" in text and "leave them out" in text
    both = [dict(r, huge_pages_obtained=True) for r in rows]
    assert "4k 50%" in " ".join(mvm.ModelVsMachine().interpret(pd.DataFrame(both), TINY))
