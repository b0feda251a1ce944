"""Issue 13, items 2 (sweeps), 3, 4, 5, 7 and 9: a sweep never mixes specs, checks every point
and its output before running, takes a lock, bounds its input, names a bad scheduler, and
survives a torn log line (each of these failed on main before the fix)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from eptlab.errors import ConfigError
from eptlab.experiments import registry
from eptlab.sweep import SweepStore, load, load_spec, parse_spec, run_sweep

from ..experiments.robust_tiny import Tiny


@pytest.fixture(autouse=True)
def tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_EXPERIMENTS", {"tiny": "tests.experiments.robust_tiny:Tiny"})
    Tiny.computed = 0


def spec(out: Path, rows: list[int], seed: int = 0) -> Any:
    return parse_spec(
        {"out": str(out), "run": [{"experiment": "tiny", "set": {"seed": seed},
                                   "grid": {"rows": rows}}]}
    )


def test_a_changed_spec_is_refused_naming_the_changed_keys(tmp_path: Path) -> None:
    run_sweep(spec(tmp_path, [1, 2]), jobs=1)
    with pytest.raises(ConfigError, match=r"changed: tiny\.rows, tiny\.seed") as info:
        run_sweep(spec(tmp_path, [1, 3], seed=5), jobs=1)
    assert info.value.field == "out"
    frame = load(tmp_path)
    assert sorted(set(frame.param_rows)) == ["1", "2"] and frame.attrs["complete"]
    assert run_sweep(spec(tmp_path, [1, 2]), jobs=1).skipped == 2  # the same spec resumes


def test_load_refuses_parts_that_are_not_points_of_the_recorded_spec(tmp_path: Path) -> None:
    run_sweep(spec(tmp_path, [1, 2]), jobs=1)
    part = next((tmp_path / "data").rglob("part-*.parquet"))
    stale = part.with_name("part-0123456789abcdef.parquet")
    stale.write_bytes(part.read_bytes())
    with pytest.raises(ConfigError, match="stale results"):
        load(tmp_path)


def test_load_labels_an_unfinished_sweep(tmp_path: Path) -> None:
    def stop(result: Any, done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec(tmp_path, [1, 2, 3]), jobs=1, on_result=stop)
    frame = load(tmp_path)
    assert frame.attrs == {"complete": False, "missing_points": 2}


def test_every_point_is_checked_before_the_first_runs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"run\[0\]\.grid\.rows"):
        parse_spec({"out": str(tmp_path), "run": [{"experiment": "tiny",
                                                   "grid": {"rows": [1, 2, -1]}}]})
    assert Tiny.computed == 0


@pytest.mark.parametrize("where", ["file", "under-file", "/proc/eptlab-sweep"])
def test_a_bad_sweep_output_is_refused_before_any_point_runs(tmp_path: Path, where: str) -> None:
    (tmp_path / "file").write_text("x")
    out = {"file": tmp_path / "file", "under-file": tmp_path / "file" / "s"}.get(where, Path(where))
    with pytest.raises(ConfigError) as info:
        run_sweep(spec(out, [1]), jobs=1)
    assert info.value.field == "out" and Tiny.computed == 0


def test_a_second_sweep_into_a_locked_output_is_refused(tmp_path: Path) -> None:
    store = SweepStore(tmp_path)
    busy = f"in use by another sweep \\(pid {os.getpid()}\\)"
    with store.locked(), pytest.raises(ConfigError, match=busy):
        run_sweep(spec(tmp_path, [1, 2]), jobs=1)
    assert Tiny.computed == 0
    assert run_sweep(spec(tmp_path, [1, 2]), jobs=1).ok == 2  # released


def test_part_files_are_written_under_unique_temporary_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[str] = []
    real = pd.DataFrame.to_parquet

    def spy(self: pd.DataFrame, path: Any, *args: Any, **kwargs: Any) -> Any:
        written.append(Path(path).name)
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", spy)
    run_sweep(spec(tmp_path, [1]), jobs=1)
    (name,) = written
    assert str(os.getpid()) in name and not name.startswith("part-")


def test_a_torn_last_log_line_does_not_swallow_the_next_record(tmp_path: Path) -> None:
    def stop(result: Any, done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec(tmp_path, [1, 2, 3]), jobs=1, on_result=stop)
    log = tmp_path / "points.jsonl"
    log.write_bytes(log.read_bytes() + b'{"point_id": "abc", "sta')  # killed mid-write
    first = run_sweep(spec(tmp_path, [1, 2, 3]), jobs=1)
    assert (first.skipped, first.ok) == (1, 2)
    assert all(json.loads(line) for line in log.read_text().splitlines())
    assert run_sweep(spec(tmp_path, [1, 2, 3]), jobs=1).skipped == 3  # nothing runs twice


def test_a_sweep_file_without_end_is_refused() -> None:
    with pytest.raises(ConfigError, match="not a sweep file"):
        load_spec(Path("/dev/zero"))


def test_a_grid_too_large_is_refused_before_it_is_expanded(tmp_path: Path) -> None:
    grid = {key: list(range(100)) for key in ("rows", "seed", "interrupt_at")}  # 10**6 points
    with pytest.raises(ConfigError, match="more than 10,000 points"):
        parse_spec({"out": str(tmp_path), "run": [{"experiment": "tiny", "grid": grid}]})
    assert Tiny.computed == 0


def test_a_malformed_scheduler_address_is_one_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'garbage' is not a scheduler address") as info:
        run_sweep(spec(tmp_path, [1]), scheduler="garbage")
    assert info.value.field == "scheduler" and Tiny.computed == 0


def test_an_unreachable_scheduler_is_one_error_after_a_short_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from eptlab.sweep import executors

    monkeypatch.setattr(executors, "CONNECT_TIMEOUT", 1.0)
    with pytest.raises(ConfigError, match="tcp://127.0.0.1:1: no Dask scheduler answered"):
        run_sweep(spec(tmp_path, [1]), scheduler="tcp://127.0.0.1:1")
    assert Tiny.computed == 0
