"""The trap-debugger experiment: the claims its table makes, checked on a small run, and
`eptlab run trap-debugger`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from eptlab.apps.heap_guest import expected_detection
from eptlab.cli import main
from eptlab.experiments.base import Row
from eptlab.experiments.trap_debugger import (
    ConfigRun,
    TrapDebugger,
    TrapDebuggerParams,
    filter_rows,
)

P = TrapDebuggerParams(
    fractions=(0.05, 0.3),
    periods=(500, 20_000),
    compare=("all/emulate", "write/mtf", "raf/emulate"),
    compare_fraction=0.3,
    heap_pages=256,
    accesses=40_000,
    warmup=4_000,
    live_objects=600,
    accesses_per_op=25,
    bugs=80,
    writes_per_bug=4.0,
    bug_span=8_000,
    read_bugs=20,
    seed=1,
)
REQUIRED = {
    "trap_fraction",
    "period",
    "bugs_injected",
    "bugs_detected",
    "mean_time_to_detect",
    "false_positives",
    "false_positives_unfiltered",
    "vm_exits",
    "overhead_cycles_pct",
    "bugs_dismissed",
    "context_matches",
    "read_bugs_detected",
    "filter",
    "value_class",
    "fn_rate",
}


@pytest.fixture(scope="module")
def results() -> list[tuple[ConfigRun, Row]]:
    return list(TrapDebugger().runs(P, lambda d, t: None))


@pytest.fixture(scope="module")
def table(results: list[tuple[ConfigRun, Row]]) -> pd.DataFrame:
    """The rows as ``rows()`` yields them: the filter rows after trap-all's."""
    rows: list[Row] = []
    for run, row in results:
        rows.append(row)
        if run.config.name == "trap-all":
            rows += list(filter_rows(run))
    return pd.DataFrame(rows)


def one(table: pd.DataFrame, **where: Any) -> pd.Series:
    rows = table
    for key, value in where.items():
        rows = rows[rows[key] == value]
    assert len(rows) == 1, where
    return rows.iloc[0]


def test_configurations_and_columns(table: pd.DataFrame) -> None:
    assert set(table.columns) >= REQUIRED
    assert list(table["config"]) == (
        ["none"] + ["sampled"] * 4 + ["trap-all"] + ["filter"] * 24 + ["compare"] * 3
    )
    runs = table[table["config"] != "filter"]
    assert (runs["bugs_injected"] == P.bugs).all()
    assert (runs["read_bugs_injected"] == P.read_bugs).all()
    none = one(table, config="none")
    assert none["vm_exits"] == none["bugs_detected"] == none["overhead_cycles_pct"] == 0
    assert none["accesses"] < one(table, config="trap-all")["accesses"]  # no ownership reports


def test_trap_all_detects_everything_at_the_highest_cost(table: pd.DataFrame) -> None:
    everything = one(table, config="trap-all")
    # every bug write traps: the bugs found are those with a write the filter reports
    assert everything["detection_rate"] == everything["expected_detection_rate"] < 1.0
    assert everything["bugs_detected"] + everything["bugs_dismissed"] == P.bugs
    others = table[table["config"] == "sampled"]
    assert (others["overhead_cycles_pct"] < everything["overhead_cycles_pct"]).all()
    assert (others["vm_exits"] < everything["vm_exits"]).all()
    assert (others["detection_rate"] <= 1.0).all() and (others["bugs_detected"] > 0).all()


def test_sampling_trades_detection_for_overhead(table: pd.DataFrame) -> None:
    for period in P.periods:
        low = one(table, config="sampled", trap_fraction=0.05, period=period)
        high = one(table, config="sampled", trap_fraction=0.3, period=period)
        assert 0 < low["overhead_cycles_pct"] < high["overhead_cycles_pct"]
        assert low["trapped_writes"] < high["trapped_writes"]
        assert low["expected_detection_rate"] < high["expected_detection_rate"]
        assert low["bugs_detected"] < high["bugs_detected"]
    # rotating faster gives a bug's later writes fresh chances: theory and measurement agree
    fast = one(table, config="sampled", trap_fraction=0.3, period=500)
    slow = one(table, config="sampled", trap_fraction=0.3, period=20_000)
    assert fast["expected_detection_rate"] > slow["expected_detection_rate"]
    assert fast["timer_exits"] > slow["timer_exits"] and fast["invept"] > slow["invept"]


def test_measured_detection_matches_sampling_theory(
    results: list[tuple[ConfigRun, Row]],
) -> None:
    """Each bug is caught with the probability sampling theory gives for its writes; the count
    of detected bugs stays within 4 standard deviations of the expected count."""
    for run, row in results:
        if run.config.name != "sampled":
            continue
        assert run.debugger is not None and run.config.period is not None
        stream = run.stream
        chances = [
            expected_detection(
                [positions],
                [[stream.firings[p][1] & ~0xFFF for p in positions]],
                pages=len(run.debugger.pages),
                sampled=run.debugger.sampled,
                period=run.config.period,
            )
            for positions in (
                [q for q in b if q in run.reportable] for b in stream.bug_positions
            )
        ]
        mean = sum(chances)
        sigma = math.sqrt(sum(c * (1 - c) for c in chances))
        assert abs(row["bugs_detected"] - mean) <= 4 * sigma + 1, (row, mean, sigma)
        assert row["expected_detection_rate"] == pytest.approx(mean / len(chances), abs=1e-4)


def test_filtering_removes_every_false_alarm_and_the_bugs_its_rules_admit(
    table: pd.DataFrame,
) -> None:
    trapping = table[~table["config"].isin(["none", "filter"])]
    assert (trapping["false_positives"] == 0).all()
    assert (trapping["false_positives_sync_only"] <= trapping["false_positives_unfiltered"]).all()
    assert (trapping["false_positives_unfiltered"] > 0).all()
    allowed = trapping["metadata_writes_allowed"] + trapping["silent_writes_allowed"]
    assert (allowed >= trapping["false_positives_sync_only"]).all()
    assert one(table, config="trap-all")["bugs_dismissed"] > 0  # the value mix gives it work


def test_filter_rows_per_value_class(table: pd.DataFrame) -> None:
    rows = table[table["config"] == "filter"]
    everything = one(table, config="trap-all")
    assert list(dict.fromkeys(rows["filter"])) == [
        "links+null+silent", "links+null", "links+silent", "links"
    ]
    assert (rows["bugs_judged"] == rows["bugs_injected"]).all()  # trap-all: every bug judged
    assert (rows["bugs_dismissed"] <= rows["bugs_judged"]).all()
    for _, group in rows.groupby("filter"):
        assert group["bugs_injected"].sum() == P.bugs
        assert group["bug_writes_judged"].sum() == everything["bug_writes"]
    assert everything["bug_writes_judged"] == everything["bug_writes"]
    mine = rows[rows["filter"] == everything["filter"]]
    assert mine["bugs_dismissed"].sum() == everything["bugs_dismissed"]
    assert mine["false_positives"].sum() == everything["false_positives"] == 0
    same = rows[rows["value_class"] == "same"].set_index("filter")
    assert same.loc["links+null+silent", "bugs_dismissed"] == same.loc[
        "links+null+silent", "bugs_injected"] > 0  # a silent store is never reported
    null = rows[rows["value_class"] == "null"].set_index("filter")
    assert null.loc["links", "bugs_dismissed"] == 0  # no rule admits NULL
    assert null.loc["links+null", "bugs_dismissed"] > 0  # NULL in a free link word
    fp = rows.groupby("filter")["false_positives"].sum()
    assert fp["links"] > 0 and fp["links+null"] == 0  # the allocator's end-of-list links


def test_resume_and_mode_change_the_cost_not_the_findings(table: pd.DataFrame) -> None:
    base = one(table, config="sampled", trap_fraction=0.3, period=500)
    mtf = one(table, config="compare", mode="write", resume="mtf")
    every = one(table, config="compare", mode="all", resume="emulate")
    for other in (mtf, every):  # the same samples, so the same bugs and the same alarms
        for column in ("bugs_detected", "mean_time_to_detect", "false_positives_unfiltered"):
            assert other[column] == base[column]
    assert mtf["mtf_exits"] == mtf["stepped"] == mtf["trapped_writes"] == base["trapped_writes"]
    assert mtf["invept"] == base["invept"] + mtf["stepped"]  # re-arm after every step
    assert mtf["emulated"] == 0 and base["stepped"] == 0
    assert every["trapped_reads"] > 0 and every["vm_exits"] > base["vm_exits"]
    assert every["overhead_cycles_pct"] > base["overhead_cycles_pct"]
    raf = one(table, config="compare", mode="raf", resume="emulate")
    assert raf["bugs_detected"] == base["bugs_detected"]  # the same write checks
    assert raf["trapped_reads"] == every["trapped_reads"]  # the same read traps, now checked
    assert 0 < raf["read_bugs_detected"] < P.read_bugs and raf["read_false_positives"] == 0
    assert raf["overhead_cycles_pct"] > every["overhead_cycles_pct"]  # the checks cost
    others = table[(table["config"] != "filter") & (table["mode"] != "raf")]
    assert (others["read_bugs_detected"] == 0).all()


def test_reading_quotes_the_table(table: pd.DataFrame) -> None:
    lines = TrapDebugger().interpret(table, P)
    everything = one(table, config="trap-all")
    assert f"catches {int(everything['bugs_detected'])}/{P.bugs} bugs" in lines[0]
    fast = one(table, config="sampled", trap_fraction=0.3, period=500)
    assert f"catches {int(fast['bugs_detected'])}/{P.bugs}" in lines[1]
    unfiltered = int(table["false_positives_unfiltered"].sum())
    assert f"{unfiltered:,} unfiltered" in lines[2] and "0 with the filter" in lines[2]
    assert f"dismisses {int(everything['bugs_dismissed'])} of {P.bugs} bugs" in lines[3]
    reports, matches = int(table["bug_reports"].sum()), int(table["context_matches"].sum())
    assert f"{matches:,} of {reports:,} reports" in lines[5]
    raf = one(table, config="compare", mode="raf")
    assert f"catches {int(raf['read_bugs_detected'])}/{P.read_bugs} read bugs" in lines[6]


def test_figures(table: pd.DataFrame) -> None:
    figures = TrapDebugger().figures(table, P)
    assert list(figures) == ["trap-debugger"]
    assert len(figures["trap-debugger"].axes) == 4


def test_cli_run_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    sets = {
        "accesses": "8000",
        "warmup": "1000",
        "heap_pages": "64",
        "live_objects": "150",
        "bugs": "10",
        "fractions": "0.2",
        "periods": "1000",
        "compare": "write/mtf",
        "seeds": "1",
        "bug_values": "garbage",
        "vcpus": "1",
    }
    args = ["run", "trap-debugger", "--out", str(tmp_path), "--json"]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    assert main(args) == 0
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert out["experiment"] == "trap-debugger"
    assert sum(r["config"] == "filter" for r in out["rows"]) == 24  # 4 filters x 6 classes
    rows = {(r["config"], r["resume"]): r for r in out["rows"] if r["config"] != "filter"}
    assert list(rows) == [
        ("none", "-"),
        ("sampled", "emulate"),
        ("trap-all", "emulate"),
        ("compare", "mtf"),
    ]
    assert rows[("trap-all", "emulate")]["bugs_detected"] == 10
    assert (tmp_path / "trap-debugger.png").stat().st_size > 1000
    assert main(["run", "trap-debugger", "--set", "fractions=2"]) == 2


@pytest.mark.parametrize(
    ("positions", "pages_hit", "pages", "sampled", "expected"),
    [
        ([[5]], [[0x1000]], 4, 1, 1 / 4),  # one write, one page: the sample holds it 1 in 4
        ([[5, 6]], [[0x1000, 0x2000]], 4, 1, 1 / 2),  # two pages in one period: 2 in 4
        ([[5, 6]], [[0x1000, 0x1000]], 4, 1, 1 / 4),  # the same page twice in one period
        ([[5, 15]], [[0x1000, 0x1000]], 4, 1, 1 - (3 / 4) ** 2),  # one page in two periods
        ([[5, 6]], [[0x1000, 0x2000]], 4, 2, 1 - (2 / 4) * (1 / 3)),  # C(2,2)/C(4,2) escapes
        ([[5]], [[0x1000]], 4, 0, 0.0),
        ([[5]], [[0x1000]], 4, 4, 1.0),
        ([[5], [5, 15]], [[0x1000], [0x1000, 0x1000]], 4, 1, (1 / 4 + 7 / 16) / 2),
    ],
)
def test_sampling_theory_by_hand(
    positions: list[list[int]], pages_hit: list[list[int]], pages: int, sampled: int,
    expected: float,
) -> None:
    """C(N-m, s) / C(N, s) escapes per period, worked out by hand (period 10)."""
    got = expected_detection(positions, pages_hit, pages=pages, sampled=sampled, period=10)
    assert got == pytest.approx(expected)
