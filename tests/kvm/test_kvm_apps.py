"""The KVM applications on /dev/kvm (small runs), their cross-checks against the simulator, and
the ``eptlab kvm`` command's JSON contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eptlab.cli import main
from eptlab.errors import ConfigError
from eptlab.kvm.apps.common import WritePattern
from eptlab.kvm.apps.crosscheck import Crosscheck, CrosscheckParams
from eptlab.kvm.apps.dirty_log import DirtyLog, DirtyLogParams
from eptlab.kvm.apps.fork import Fork, ForkParams
from eptlab.kvm.apps.prefetch import Prefetch, PrefetchParams
from eptlab.kvm.apps.trap_rotation import TrapRotation, TrapRotationParams
from eptlab.kvm.backend import DATA_BASE, PAGE

# -- no VM needed ----------------------------------------------------------------------------------


@given(pages=st.integers(1, 2000), seed=st.integers(0, 2**32 - 1))
def test_write_patterns_are_distinct_pages_in_the_data_region(pages: int, seed: int) -> None:
    memory = 16 << 20
    pattern = WritePattern.random(memory, pages, seed)
    assert len(pattern.pages) == pages
    assert all(DATA_BASE <= a < memory and a % 8 == 0 for a in map(int, pattern.addresses))
    parts = pattern.split(3)
    assert sum(len(p) for p in parts) == pages
    assert set().union(*(p.pages for p in parts)) == pattern.pages


def test_write_pattern_larger_than_the_data_region_is_refused() -> None:
    with pytest.raises(ConfigError, match="pages"):
        WritePattern.random(4 << 20, 513, 0)


# -- on /dev/kvm -----------------------------------------------------------------------------------


@pytest.mark.kvm
def test_dirty_log_every_mode_reports_exactly_the_written_pages() -> None:
    rows = {r["mode"]: r for r in DirtyLog().rows(DirtyLogParams(memory_mib=16, pages=100,
                                                                 rounds=2))}
    assert set(rows) == {"log", "ring", "trap"}
    for row in rows.values():
        assert row["exact"] and row["dirty_pages_reported"] == row["pages_written"] == 100
        assert row["kvm_module"] and "tdp" in row
    assert rows["trap"]["exits"] == rows["trap"]["writes"] == 200  # every write traps
    assert rows["log"]["exits"] == 0  # writes run free


@pytest.mark.kvm
def test_dirty_ring_full_exits_lose_no_page() -> None:
    # 3000 pages a round into a 1024-entry ring: it fills several times per round
    rows = list(DirtyLog().rows(DirtyLogParams(memory_mib=32, pages=3000, rounds=2,
                                               modes=("ring",), ring_entries=1024)))
    assert rows[0]["exact"] and rows[0]["exits"] >= 2


@pytest.mark.kvm
def test_fork_clones_are_isolated_and_copy_only_written_pages() -> None:
    rows = list(Fork().rows(ForkParams(guest_mibs=(16, 4096), clones=3, pages=10)))
    for row in rows:
        assert row["isolated"]
        assert row["pages_copied"] == row["pages_written"] == 30
        assert row["private_mib_after_writes"] == pytest.approx(30 * PAGE / (1 << 20), abs=1e-3)


@pytest.mark.kvm
def test_crosscheck_simulator_and_kvm_agree() -> None:
    rows = list(Crosscheck().rows(CrosscheckParams(memory_mib=8, pages=20, rounds=2, clones=2)))
    assert len(rows) >= 4
    disagreements = [r for r in rows if not r["equal"]]
    assert not disagreements, disagreements


@pytest.mark.kvm
def test_prefetch_rows_say_which_mechanism_ran() -> None:
    rows = {r["method"]: r for r in Prefetch().rows(PrefetchParams(memory_mib=16, range_mib=8,
                                                                   repeats=1))}
    assert rows["demand"]["mechanism"] == "none" and not rows["demand"]["prefault"]
    assert rows["populate"]["mechanism"] == "MADV_POPULATE_WRITE"
    assert rows["prefault"]["mechanism"] in ("KVM_PRE_FAULT_MEMORY", "MADV_POPULATE_WRITE")
    for row in rows.values():
        assert row["pages"] == 2048 and row["guest_cycles"] > 0
    # populated ahead, the guest's touches take no host page fault for the range
    assert rows["populate"]["host_faults"] < rows["demand"]["host_faults"]


@pytest.mark.kvm
def test_trap_rotation_detects_nothing_untrapped_and_everything_trapped() -> None:
    params = TrapRotationParams(memory_mib=18, trap_fractions=(0.0, 0.5, 1.0), iterations=2000,
                                wild_period=50, rotate_period=200)
    rows = {r["trap_fraction"]: r for r in TrapRotation().rows(params)}
    assert rows[0.0]["bugs_detected"] == 0 and rows[0.0]["exits"] == 0
    assert rows[1.0]["bugs_detected"] == rows[1.0]["bugs_injected"] == 40
    assert rows[1.0]["exits"] == 2000 + 40  # every store traps
    assert 0 <= rows[0.5]["bugs_detected"] <= rows[0.5]["bugs_injected"]


@pytest.mark.kvm
def test_cli_json_contract(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # files go to out/kvm-fork, as eptlab run kvm-fork writes them
    assert main(["kvm", "fork", "--set", "guest_mibs=16", "--set", "pages=4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["command"] == "fork" and out["params"]["pages"] == 4
    row = out["rows"][0]
    assert {"guest_mib", "fork_ms", "isolated", "pages_written",
            "private_mib_after_writes", "kvm_module", "tdp"} <= set(row)
    assert (tmp_path / "out" / "kvm-fork" / "kvm-fork.parquet").exists()


@pytest.mark.kvm
def test_cli_bad_parameter_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kvm", "dirty-log", "--set", "modes=bogus"]) == 2
    assert "modes" in capsys.readouterr().err


@pytest.mark.kvm
def test_applications_release_every_fd_and_mapping() -> None:
    import gc
    import os

    from eptlab.kvm.apps.dirty_log import run_mode
    from eptlab.kvm.apps.fork import fork_once
    from eptlab.kvm.fds import Kvm

    def counts() -> tuple[int, int]:
        gc.collect()  # objects of earlier tests release their fds and mappings now, not later
        with open("/proc/self/maps") as f:
            return len(os.listdir("/proc/self/fd")), sum(1 for _ in f)

    def once(kvm: Kvm, pattern: WritePattern) -> None:
        fork_once(kvm, 64 << 20, clones=3, pages=4, seed=0)
        for mode in ("log", "ring", "trap"):
            run_mode(kvm, mode, pattern, 8 << 20, 2)

    with Kvm.open() as kvm:
        pattern = WritePattern.random(8 << 20, 16, 0)
        once(kvm, pattern)  # warm-up: images, CPUID, the allocator's own arenas
        fds, maps = counts()
        for _ in range(3):
            once(kvm, pattern)
        fds_after, maps_after = counts()
        assert fds_after == fds
        # one leaked guest costs several mappings per iteration (memory, kvm_run, rings); the
        # C allocator may add an arena of its own, which is not a leak
        assert maps_after - maps < 3, (maps, maps_after)


@pytest.mark.kvm
def test_cli_crosscheck_exits_1_when_the_engines_disagree(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import dataclasses

    monkeypatch.chdir(tmp_path)  # the shortcut writes out/kvm-crosscheck like eptlab run
    from eptlab.kvm import sim

    real = sim.dirty_log_pml

    def drops_a_page(memory: int, rounds: list[list[int]]) -> sim.SimDirtyLog:
        out = real(memory, rounds)
        first = set(out.dirty[0])
        first.remove(min(first))  # the simulator "misses" one dirty page in round 0
        return dataclasses.replace(out, dirty=[first, *out.dirty[1:]])

    monkeypatch.setattr(sim, "dirty_log_pml", drops_a_page)
    args = ["--set", "memory_mib=8", "--set", "pages=8", "--set", "rounds=2", "--set", "clones=1",
            "--set", "tsx=false"]
    assert main(["kvm", "crosscheck", *args, "--json"]) == 1
    rows = json.loads(capsys.readouterr().out)["rows"]
    failed = [r for r in rows if not r["equal"]]
    assert failed and all(r["check"].startswith("dirty-log") for r in failed)
    assert any("log" in r["check"] for r in failed)
    # without the fault the same command agrees
    monkeypatch.setattr(sim, "dirty_log_pml", real)
    assert main(["kvm", "crosscheck", *args, "--json"]) == 0


@pytest.mark.kvm
def test_crosscheck_fork_row_fails_when_the_simulator_copies_a_page_more(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import dataclasses

    from eptlab.kvm import sim
    from eptlab.kvm.fds import Kvm

    real = sim.fork

    def copies_one_more(*args: object) -> sim.SimFork:
        out = real(*args)  # type: ignore[arg-type]
        return dataclasses.replace(out, pages_copied=[out.pages_copied[0] + 1,
                                                      *out.pages_copied[1:]])

    monkeypatch.setattr(sim, "fork", copies_one_more)
    p = CrosscheckParams(memory_mib=8, pages=6, clones=2)
    with Kvm.open() as kvm:
        rows = list(Crosscheck().fork(kvm, 8 << 20, p))
    assert [r["equal"] for r in rows] == [False, True]  # the sim side is computed, not assumed
    assert rows[0]["sim"] == rows[0]["kvm"] + 1


@pytest.mark.parametrize("name", ["kvm-fork", "kvm-dirty-log", "kvm-prefetch",
                                  "kvm-trap-rotation", "kvm-tsx", "kvm-integrity",
                                  "kvm-crosscheck"])
def test_every_kvm_experiment_takes_seeds_from_the_shared_driver(name: str) -> None:
    from dataclasses import fields

    from eptlab.experiments.registry import get

    experiment = get(name)
    assert {"seeds", "seed"} <= {f.name for f in fields(experiment.Params)}
    assert not getattr(experiment, "seeds_inside", False)  # rows() runs one seed
    assert experiment.keys


@pytest.mark.kvm
def test_kvm_dirty_log_runs_each_seed_and_summarizes_them(tmp_path: Path) -> None:
    import pandas as pd

    from eptlab.experiments import runner

    result = runner.run("kvm-dirty-log", {"pages": "16", "memory_mib": "8", "rounds": "1",
                                          "seeds": "2", "modes": "log,trap"}, tmp_path,
                        show_progress=False)
    assert list(result.table.seed) == [0, 0, 1, 1]
    summary = pd.read_csv(tmp_path / "kvm-dirty-log-summary.csv")
    assert list(summary["mode"]) == ["log", "trap"] and (summary.n == 2).all()
    from eptlab.experiments.registry import get

    reading = " ".join(get("kvm-dirty-log")().interpret(result.table, None))
    # one figure per mode (the mean over the seeds with its interval), not one per row
    assert reading.count("log ") == 1 and reading.count("trap ") == 1
    assert "95% interval over the seeds" in reading


def test_kvm_readings_quote_the_summary_not_every_row() -> None:
    import pandas as pd

    from eptlab.experiments.kvm_apps import KvmPrefetch, KvmTrapRotation

    table = pd.DataFrame({
        "seed": [0, 0, 1, 1], "method": ["demand", "populate"] * 2,
        "cycles_per_page": [1000.0, 400.0, 1200.0, 420.0],
        "kvm_module": "kvm_intel", "tdp": True,
    })
    text = KvmPrefetch().interpret(table, None)[0]
    assert text.count("demand") == 1 and "1,100 [" in text and "410 [" in text
    rotation = pd.DataFrame({
        "seed": [0, 1], "trap_fraction": [0.5, 0.5], "detection_rate": [0.4, 0.6],
        "kvm_module": "kvm_pvm", "tdp": False,
    })
    text = KvmTrapRotation().interpret(rotation, None)[0]
    assert "0.5 trapped: 50% [" in text and "shadow paging" in text
