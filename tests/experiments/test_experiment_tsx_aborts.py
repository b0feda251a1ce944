"""The tsx-aborts experiment's claims, on a small run: exit-caused aborts are the EPT violations
that happened inside transactions, pre-faulting removes them, and the other causes (timer,
conflicts, capacity) are not EPT's doing and stay."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from eptlab.experiments import runner

EPT_SCENARIOS = ("lazy", "cow", "wp-dirty")


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("tsx")
    result = runner.run(
        "tsx-aborts",
        {
            "sections": "40",
            "region_pages": "128",
            "round_every": "15",
            "timer_period": "600",
            "long_body": "128",
            "seeds": "1",
            "vcpus": "1",  # one vCPU but for conflict: each cause on its own
        },
        out,
        show_progress=False,
    )
    for suffix in (".csv", ".parquet", ".json", ".jsonl"):
        assert (out / f"tsx-aborts{suffix}").exists()
    assert (Path(out) / "tsx-aborts.png").stat().st_size > 1000
    return result.table


def row(t: pd.DataFrame, scenario: str, mitigation: str) -> pd.Series:
    sel = t[(t.scenario == scenario) & (t.mitigation == mitigation)]
    assert len(sel) == 1
    return sel.iloc[0]


def causes(r: pd.Series) -> dict[str, int]:
    pairs = (p.split("=") for p in str(r.aborts_by_cause).split(";") if p)
    return {c: int(n) for c, n in pairs}


def test_every_section_completes_once(table: pd.DataFrame) -> None:
    assert len(table) == 19  # 9 scenarios x (none, pretouch) + lazy/prefetch
    for r in table.itertuples():
        assert r.transactions == 40 * r.vcpus == r.commits + r.fallbacks
        assert r.aborts == r.attempts - r.commits
        assert sum(causes(pd.Series(r._asdict())).values()) == r.aborts


def test_aborts_track_the_ept_violations_inside_transactions(table: pd.DataFrame) -> None:
    for scenario in EPT_SCENARIOS:
        r = row(table, scenario, "none")
        assert r.ept_violations_in_tx > 0
        assert causes(r) == {"ept_violation": r.ept_violations_in_tx}
        assert r.exit_aborts == r.ept_aborts == r.aborts == r.ept_violations_in_tx
        assert r.ept_violations_in_tx <= r.ept_violations
        assert r.abort_rate == pytest.approx(r.ept_violations_in_tx / r.attempts, abs=1e-4)
        assert r.retries_to_commit > 0


def test_prefaulting_removes_the_aborts_ept_violations_caused(table: pd.DataFrame) -> None:
    for scenario in (*EPT_SCENARIOS, "guest-pf"):
        base, touched = row(table, scenario, "none"), row(table, scenario, "pretouch")
        assert base.aborts > 0
        assert touched.aborts == 0 and touched.ept_violations_in_tx == 0
        assert touched.ept_violations > 0  # the exits still happen, outside the transaction
        assert touched.retries_to_commit == 0 and touched.fallbacks == 0
    prefetch = row(table, "lazy", "prefetch")
    assert prefetch.ept_violations == 0 and prefetch.aborts == 0


def test_guest_faults_abort_without_an_exit_and_only_the_fallback_resolves_them(
    table: pd.DataFrame,
) -> None:
    r = row(table, "guest-pf", "none")
    assert set(causes(r)) == {"guest_fault"} and r.ept_violations_in_tx == 0
    assert r.fallbacks > 0


def test_pml_aborts_only_on_log_full_and_far_less_than_write_protection(
    table: pd.DataFrame,
) -> None:
    pml, wp = row(table, "pml-dirty", "none"), row(table, "wp-dirty", "none")
    assert set(causes(pml)) <= {"pml_full"}
    assert pml.ept_violations == 0
    assert pml.aborts * 10 < wp.aborts


def test_other_causes_are_not_ept_violations_and_prefaulting_does_not_remove_them(
    table: pd.DataFrame,
) -> None:
    for scenario, cause in (("timer", "timer"), ("conflict", "conflict"),
                            ("capacity", "capacity")):
        for mitigation in ("none", "pretouch"):
            r = row(table, scenario, mitigation)
            assert r.ept_violations == 0 and r.aborts > 0
            assert set(causes(r)) == {cause}
    assert row(table, "conflict", "none").vcpus == 2
    capacity = row(table, "capacity", "none")
    assert capacity.fallbacks == capacity.transactions  # never fits: the policy falls back


def test_reading_quotes_the_table_and_follows_it(table: pd.DataFrame) -> None:
    from eptlab.experiments.tsx_aborts import TsxAborts, TsxAbortsParams

    ept = table[table.scenario.isin(["lazy", "cow", "wp-dirty"]) & (table.mitigation == "none")]
    reading = TsxAborts().interpret(table, TsxAbortsParams())
    assert f"({int(ept.ept_aborts.sum()):,}) equal" in reading[0]
    broken = table.copy()
    broken.loc[ept.index[0], "ept_aborts"] += 1
    assert "do not equal" in TsxAborts().interpret(broken, TsxAbortsParams())[0]


def test_wasted_cycles_are_the_aborted_attempts_priced_from_the_rows_counts(
    table: pd.DataFrame,
) -> None:
    from eptlab.costs import active_profile

    abort = active_profile().cycles("rtm_abort_cycles")
    assert (table.wasted_cycles == table.wasted_access_cycles + table.aborts * abort).all()
    assert ((table.wasted_access_cycles > 0) == (table.wasted_accesses > 0)).all()
    assert (table.wasted_cycles <= table.cycles).all()
    assert row(table, "capacity", "none").wasted_share > 0  # every attempt thrown away
    assert row(table, "backed", "none").wasted_cycles == 0  # nothing aborts


def test_elision_gain_is_the_ratio_of_the_throughputs_and_locking_does_not_depend_on_it(
    table: pd.DataFrame,
) -> None:
    gain = table.sections_per_us / table.lock_sections_per_us
    assert (abs(gain - table.elision_gain) < 1e-3).all()
    none, pretouch = row(table, "lazy", "none"), row(table, "lazy", "pretouch")
    assert none.lock_sections_per_us == pretouch.lock_sections_per_us  # the lock never pretouches
    # the prefetch hypercall changes the memory plain locking runs on too: no exits, faster
    assert row(table, "lazy", "prefetch").lock_sections_per_us > none.lock_sections_per_us
    # two vCPUs: elision runs the sections that do not collide in parallel, the lock cannot
    assert row(table, "conflict", "none").elision_gain > 1
    # one vCPU, nothing aborts: a commit (rtm_commit_cycles) costs more than the lock
    assert row(table, "backed", "none").elision_gain < 1
