"""The integrity monitor on KVM: the ``ikernel`` guest's logged schedule against what each policy
detects, prevents and flags; the kvm-integrity experiment's columns and files."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from eptlab.errors import ConfigError
from eptlab.experiments import runner
from eptlab.kvm.apps.integrity import (
    HOOK,
    RESTORE,
    SITE_STATES,
    TAIL,
    TRANSIENT,
    Detection,
    IntegrityConfig,
    IntegrityOutcome,
    LogEntry,
    make_schedule,
    run_policy,
    score,
)
from eptlab.kvm.backend import PAGE
from eptlab.kvm.fds import Kvm

CFG = IntegrityConfig(code_pages=16, data_pages=32, iterations=4_000, review_every=500,
                      patch_every=300, patch_pages=2, hooks=6, transient_pairs=2,
                      attack_pages=3, seed=3)

# -- no VM needed ----------------------------------------------------------------------------------


@given(seed=st.integers(0, 2**32 - 1), pairs=st.integers(0, 3), window=st.integers(3, 900))
def test_schedule_hooks_hit_code_tails_and_pairs_stay_inside_one_review_window(
    seed: int, pairs: int, window: int
) -> None:
    cfg = replace(CFG, seed=seed, transient_pairs=pairs, review_every=window)
    schedule = make_schedule(cfg)
    assert [j.iteration for j in schedule] == sorted(j.iteration for j in schedule)
    writes = [j for j in schedule if j.kind != RESTORE]
    assert len({j.gpa for j in writes}) == len(writes) == cfg.hooks + pairs  # distinct words
    for j in writes:
        page, offset = divmod(j.gpa - cfg.code_base, PAGE)
        assert 0 <= page < cfg.code_pages and TAIL <= offset < PAGE and offset % 8 == 0
        assert not cfg.is_site(j.gpa) and j.value not in SITE_STATES
        assert 0 <= j.iteration < cfg.iterations
    transients = [j for j in schedule if j.kind == TRANSIENT]
    restores = [j for j in schedule if j.kind == RESTORE]
    hook_pages = {j.gpa & ~(PAGE - 1) for j in schedule if j.kind == HOOK}
    for t in transients:
        (r,) = [r for r in restores if r.gpa == t.gpa]
        assert t.iteration < r.iteration
        # both before the tick that ends the window (after iteration (w + 1) * window - 1)
        assert t.iteration // window == r.iteration // window
        assert r.iteration % window != window - 1
        assert t.gpa & ~(PAGE - 1) not in hook_pages


def test_configuration_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="transient_pairs"):
        replace(CFG, transient_pairs=20).check()
    with pytest.raises(ConfigError, match="trap_action"):
        replace(CFG, trap_action="ignore").check()
    with pytest.raises(ConfigError, match="patch_pages"):
        replace(CFG, patch_pages=17).check()


def test_score_matches_reviews_only_after_the_write_and_counts_strays() -> None:
    hook = LogEntry(100, CFG.code_base + TAIL, 0xBAD, 1_000, 1_100, 0xBAD, HOOK)
    o = IntegrityOutcome("log-bitmap", CFG, [], log=[hook], tsc_khz=1_000,
                         final_words={hook.gpa: 0xBAD})
    o.detections = [
        Detection(hook.gpa, 0xBAD, "review", 100, 900),  # a tick before the write: no match
        Detection(hook.gpa, 0xBAD, "review", 500, 3_100, host_us=5.0),
        Detection(CFG.data_base, 1, "review", 500, 3_100),  # nothing injected there
    ]
    s = score(o)
    assert s.detected == s.hooks_detected == 1 and s.tampered == 1 and s.prevented == 0
    assert s.false_detections == 2
    assert s.delays_iterations == [400]
    assert s.delays_us == [pytest.approx(2_000 + 5.0)]  # 2,000 cycles at 1 MHz, plus 5 us


def test_monitor_cycles_take_the_median_event_period_and_ignore_preemption() -> None:
    import numpy as np

    cfg = replace(CFG, iterations=8 * 64, stamp_every=64, patch_every=0, review_every=128,
                  hooks=0, transient_pairs=0)
    base = 100.0
    spans = np.full(8, base * 64)
    spans[[1, 3, 5, 7]] += 6_400  # the four tick periods: 6,400 cycles each
    spans[7] += 10_000_000  # one of them also preempted
    spans[2] += 5_000_000  # a preempted quiet period
    o = IntegrityOutcome("log-ring", cfg, [], stamps=np.concatenate(([0], np.cumsum(spans)))
                         .astype(np.uint64), ticks=[127, 255, 383, 511])
    assert o.event_periods() == {"tick": [1, 3, 5, 7]}
    assert o.monitor_cycles(base) == pytest.approx(4 * 6_400)
    assert replace(o, policy="trap-all").event_periods() == {"data": list(range(8))}
    assert replace(o, policy="none", ticks=[]).event_periods() == {}


# -- on /dev/kvm -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kvm() -> Iterator[Kvm]:
    with Kvm.open() as k:
        yield k


def _code_words(o: IntegrityOutcome) -> set[int]:
    return {j.gpa for j in o.schedule}


@pytest.mark.kvm
def test_guest_logs_exactly_its_schedule(kvm: Kvm) -> None:
    o = run_policy(kvm, CFG, "none")
    assert [(e.iteration, e.gpa, e.kind) for e in o.log] == [
        (j.iteration, j.gpa, j.kind) for j in o.schedule]
    for e, j in zip(o.log, o.schedule, strict=True):
        assert e.tsc_after > e.tsc_before
        if j.kind != RESTORE:
            assert e.value == j.value == e.readback  # unmonitored: every write lands
    s = score(o)
    assert s.detected == 0 and s.prevented == 0 and s.tampered == CFG.hooks
    assert o.vmm_exits == 0 and o.loop_cycles > 0


@pytest.mark.kvm
def test_trap_code_detects_and_prevents_every_injected_write(kvm: Kvm) -> None:
    o = run_policy(kvm, CFG, "trap-code")
    s = score(o)
    assert s.injected == CFG.hooks + CFG.transient_pairs
    assert s.detected == s.prevented == s.injected
    assert s.restores_detected == CFG.transient_pairs  # the restores trap too
    assert s.tampered == 0 and s.false_detections == 0
    assert {d.gpa for d in o.detections} <= _code_words(o)
    for e in o.log:  # the guest read back the old word after every denied write
        assert e.readback != e.value or e.kind == RESTORE
    # every legitimate patch trapped and was performed; nothing else exits
    patches = CFG.iterations // CFG.patch_every
    assert o.counters.patches_allowed == patches
    assert o.counters.code_write_exits == patches + s.injected + s.restores
    assert o.vmm_exits == o.counters.code_write_exits and o.counters.data_write_exits == 0
    assert len(s.delays_us) == s.injected and all(d > 0 for d in s.delays_us)


@pytest.mark.kvm
def test_trap_code_perform_and_log_detects_but_lets_hooks_land(kvm: Kvm) -> None:
    s = score(run_policy(kvm, replace(CFG, trap_action="log"), "trap-code"))
    assert s.detected == s.injected and s.prevented == 0 and s.tampered == CFG.hooks


@pytest.mark.kvm
def test_trap_all_emulates_every_data_write_and_detects_only_code_writes(kvm: Kvm) -> None:
    cfg = replace(CFG, iterations=1_500, data_writes=2)
    o = run_policy(kvm, cfg, "trap-all")
    s = score(o)
    assert o.counters.data_write_exits == cfg.iterations * cfg.data_writes
    assert s.detected == s.prevented == s.injected and s.false_detections == 0
    assert {d.gpa for d in o.detections} <= _code_words(o)  # no data page reported


@pytest.mark.kvm
@pytest.mark.parametrize("policy", ["log-bitmap", "log-ring"])
def test_log_review_detects_changed_words_and_flags_restored_ones(kvm: Kvm, policy: str) -> None:
    o = run_policy(kvm, CFG, policy)
    s = score(o)
    assert s.hooks_detected == CFG.hooks  # each hook still differs at the review after it
    assert s.transients_detected == 0  # undone before the review: the diff sees nothing
    assert s.transients_flagged == CFG.transient_pairs  # but the page was dirty
    assert s.prevented == 0 and s.tampered == CFG.hooks
    assert s.false_detections == 0  # legitimate patches and data writes are not reported
    assert {d.gpa for d in o.detections} <= _code_words(o)
    assert all(0 < d <= CFG.review_every for d in s.delays_iterations)
    assert o.counters.ticks == CFG.iterations // CFG.review_every
    assert o.counters.reviews == o.counters.ticks + 1  # and the last one at the end
    assert o.counters.code_write_exits == o.counters.data_write_exits == 0


@pytest.mark.kvm
def test_timed_reviews_tick_by_the_guest_tsc_and_still_find_every_hook(kvm: Kvm) -> None:
    # 20,000 iterations take at least 2.4 M cycles (about 1 ms): a tick every 0.1 ms fires
    # several times whatever the load (the TSC runs on while the vCPU is preempted)
    cfg = replace(CFG, iterations=20_000, review_ms=0.1)
    o = run_policy(kvm, cfg, "log-bitmap")
    s = score(o)
    assert o.counters.ticks >= 2 and o.counters.reviews == o.counters.ticks + 1
    assert o.ticks == sorted(o.ticks) and all(t % 64 == 0 for t in o.ticks)
    assert s.hooks_detected == CFG.hooks and s.false_detections == 0
    # a pair is seen one way or the other: undone before a review, or caught between
    assert s.transients_flagged + s.transients_detected == CFG.transient_pairs


@pytest.mark.kvm
def test_experiment_rows_have_every_column_and_the_simulator_beside(tmp_path: Path) -> None:
    sets = {"iterations": "4000", "review_every": "1000", "patch_every": "500",
            "trap_all_iterations": "1000", "code_pages": "16", "data_pages": "32",
            "hooks": "4", "transient_pairs": "1", "sim_warmup": "2000", "seeds": "2"}
    result = runner.run("kvm-integrity", sets, tmp_path, show_progress=False)
    everything = result.table
    assert list(everything.seed) == [0] * 5 + [1] * 5  # the shared driver ran both seeds
    summary = pd.read_csv(tmp_path / "kvm-integrity-summary.csv")
    assert list(summary.policy) == ["none", "trap-code", "trap-all", "log-bitmap", "log-ring"]
    assert (summary.n == 2).all() and "detected_lo" in summary.columns
    t = everything[everything.seed == 0]
    assert list(t.policy) == ["none", "trap-code", "trap-all", "log-bitmap", "log-ring"]
    for column in ("seed", "injected_writes", "detected", "prevented", "mean_delay_us",
                   "max_delay_us", "cycles_per_iteration", "overhead_pct", "vmm_exits",
                   "median_cycles_per_iteration", "median_overhead_pct", "kvm_exits",
                   "kvm_module", "tdp", "guest_cpl", "sim_detected",
                   "sim_prevented", "sim_vm_exits", "sim_overhead_pct", "sim_mode"):
        assert column in t.columns, column
    by = t.set_index("policy")
    assert by.loc["trap-all", "iterations"] == 1000 and by.loc["none", "iterations"] == 4000
    assert by.loc["none", "overhead_pct"] == 0.0
    assert by.loc["trap-code", "detected"] == by.loc["trap-code", "injected_writes"] == 5
    assert by.loc["trap-code", "sim_detected"] == by.loc["trap-code", "sim_malicious_writes"] == 4
    assert by.loc["log-ring", "sim_mode"] == "pml" and by.loc["log-ring", "sim_prevented"] == 0
    assert (t.false_detections == 0).all()
    from eptlab.experiments.kvm_integrity import KvmIntegrity, KvmIntegrityParams

    reading = " ".join(KvmIntegrity().interpret(t, KvmIntegrityParams()))
    assert "detected 5 and prevented 5 of 5 injected writes" in reading
    assert "1 of 1 write-then-restore pairs were dirty but unchanged" in reading
    assert (tmp_path / "kvm-integrity.parquet").exists()
    assert (tmp_path / "kvm-integrity.png").exists()


@pytest.mark.kvm
def test_cli_shortcut_runs_the_experiment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import json

    from eptlab.cli import main

    monkeypatch.chdir(tmp_path)  # files go to out/kvm-integrity, as eptlab run writes them
    sets = ["iterations=2000", "review_every=500", "code_pages=16", "data_pages=16",
            "hooks=3", "transient_pairs=1", "policies=trap-code", "simulate=false", "seeds=1"]
    assert main(["kvm", "integrity", *[a for s in sets for a in ("--set", s)], "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["policy"] for r in out["rows"]] == ["trap-code"]  # none ran as the baseline only
    assert out["rows"][0]["detected"] == out["rows"][0]["prevented"] == 4
    parquet = tmp_path / "out" / "kvm-integrity" / "kvm-integrity.parquet"
    from eptlab.experiments.kvm_integrity import KvmIntegrity, KvmIntegrityParams

    reading = KvmIntegrity().interpret(pd.read_parquet(parquet), KvmIntegrityParams())
    assert "detected 4 and prevented 4 of 4" in reading[0]  # read without a none row
    assert main(["kvm", "integrity", "--set", "policies=bogus"]) == 2
