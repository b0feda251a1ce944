"""Sweeps: grids from TOML, one Parquet dataset written as points finish, resume, failures
recorded, and the same results from inline, local-process and Dask executors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from eptlab.cli import main
from eptlab.errors import ConfigError
from eptlab.sweep import SweepStore, load, load_spec, parse_spec, run_sweep
from eptlab.sweep.store import PointResult

SMALL = {"accesses": 1500, "trace": "", "footprint_mib": 16, "guest_pages": ["4k"], "seeds": 1}


def spec_data(out: Path, *, bad_point: bool = False) -> dict[str, Any]:
    runs = [
        {
            "experiment": "nested-overhead",
            "set": dict(SMALL),
            "grid": {"workloads": [["random"], ["zipf"]], "ept_pages": [["4k"], ["2m"]]},
        }
    ]
    if bad_point:  # valid parameters, but the trace file is malformed: fails when run
        out.mkdir(parents=True, exist_ok=True)
        (out / "malformed.lackey").write_text(" L 1000,8\nnot lackey\n")
        bad = {**SMALL, "trace": str(out / "malformed.lackey"), "workloads": ["random"]}
        runs.append({"experiment": "nested-overhead", "set": bad})
    return {"out": str(out), "run": runs}


def table(out: Path) -> pd.DataFrame:
    frame = load(out)
    return frame.sort_values(["point_id", "mode", "pwc"]).reset_index(drop=True)


def test_grid_is_the_product_of_its_axes(tmp_path: Path) -> None:
    spec = parse_spec(spec_data(tmp_path))
    assert len(spec.points) == 4
    assert len({p.point_id for p in spec.points}) == 4
    combos = {(p.as_dict()["workloads"], p.as_dict()["ept_pages"]) for p in spec.points}
    assert combos == {("random", "4k"), ("random", "2m"), ("zipf", "4k"), ("zipf", "2m")}
    assert all(p.as_dict()["accesses"] == "1500" for p in spec.points)
    again = parse_spec(spec_data(tmp_path))
    assert [p.point_id for p in again.points] == [p.point_id for p in spec.points]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d["run"][0]["grid"].update(nonsense=[1]), "run[0].grid.nonsense"),
        (lambda d: d["run"][0]["set"].update(accesses="many"), "run[0].set.accesses"),
        (lambda d: d["run"][0].update(experiment="no-such"), "run[0].experiment"),
        (lambda d: d["run"][0]["grid"].update(seed=[]), "run[0].grid.seed"),
        (lambda d: d.update(runs=[]), "runs"),
        (lambda d: d.pop("run"), "run"),
    ],
)
def test_bad_spec_names_the_file_and_key(
    tmp_path: Path, change: Callable[[dict[str, Any]], object], field: str
) -> None:
    data = spec_data(tmp_path)
    change(data)
    with pytest.raises(ConfigError) as err:
        parse_spec(data, "grid.toml")
    assert err.value.field == f"grid.toml: {field}"


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text("[[run]\nexperiment = 1\n")
    with pytest.raises(ConfigError, match="s.toml: not valid TOML"):
        load_spec(path)
    with pytest.raises(ConfigError, match="no such file"):
        load_spec(tmp_path / "none.toml")


def test_failure_is_recorded_and_the_rest_runs(tmp_path: Path) -> None:
    spec = parse_spec(spec_data(tmp_path, bad_point=True))
    summary = run_sweep(spec, jobs=1)
    assert (summary.ok, summary.failed, summary.skipped) == (4, 1, 0)
    points = SweepStore(tmp_path).points()
    failed = points[points.status == "error"]
    assert len(failed) == 1
    assert "malformed.lackey:2" in failed.error.iloc[0]
    rows = load(tmp_path)
    assert set(rows.point_id) == set(points[points.status == "ok"].point_id)
    assert len(rows) == 4 * 4  # 4 points x (native, nested) x (pwc on, off)
    assert set(rows.param_workloads) == {"random", "zipf"}


def test_interrupted_sweep_resumes_and_skips_finished_points(tmp_path: Path) -> None:
    spec = parse_spec(spec_data(tmp_path))

    def stop_after_two(result: PointResult, done: int, total: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, jobs=1, on_result=stop_after_two)
    assert len(SweepStore(tmp_path).done()) == 2
    ran = []
    summary = run_sweep(spec, jobs=1, on_result=lambda r, d, t: ran.append(r.point.point_id))
    assert summary.skipped == 2 and summary.ok == 2 and len(ran) == 2
    assert not set(ran) & {p for p in load(tmp_path).point_id if p not in ran}
    assert len(load(tmp_path)) == 16
    # a third run has nothing left to do
    assert run_sweep(spec, jobs=1).skipped == 4


def test_point_without_its_part_file_is_run_again(tmp_path: Path) -> None:
    spec = parse_spec(spec_data(tmp_path))
    run_sweep(spec, jobs=1)
    store = SweepStore(tmp_path)
    victim = spec.points[0]
    store.part(victim).unlink()
    assert victim.point_id not in store.done()
    assert run_sweep(spec, jobs=1).ok == 1


def test_local_processes_give_the_same_table(tmp_path: Path) -> None:
    inline, local = tmp_path / "inline", tmp_path / "local"
    run_sweep(parse_spec(spec_data(inline)), jobs=1)
    summary = run_sweep(parse_spec(spec_data(local)), jobs=2)
    assert summary.ok == 4
    pd.testing.assert_frame_equal(table(inline), table(local))


def test_dask_cluster_gives_the_same_table(tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    inline, remote = tmp_path / "inline", tmp_path / "dask"
    run_sweep(parse_spec(spec_data(inline, bad_point=True)), jobs=1)
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        summary = run_sweep(parse_spec(spec_data(remote, bad_point=True)), scheduler=client)
    assert (summary.ok, summary.failed) == (4, 1)
    pd.testing.assert_frame_equal(table(inline), table(remote))


def test_cli_sweep_runs_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "grid.toml"
    path.write_text(
        f'out = "{tmp_path / "out"}"\n[[run]]\nexperiment = "nested-overhead"\n'
        '[run.set]\naccesses = 1000\ntrace = ""\nfootprint_mib = 16\nguest_pages = ["4k"]\n'
        'ept_pages = ["4k"]\n[run.grid]\nseed = [1, 2]\n'
    )
    assert main(["sweep", str(path), "--jobs", "1"]) == 0
    assert "0 already done, 2 ran ok, 0 failed" in capsys.readouterr().out.replace("\n", " ")
    assert main(["sweep", str(path), "--jobs", "1"]) == 0
    assert "2 already done, 0 ran ok" in capsys.readouterr().out.replace("\n", " ")
    assert sorted(load(tmp_path / "out").param_seed.unique()) == ["1", "2"]
    bad = tmp_path / "bad.toml"
    bad.write_text('[[run]]\nexperiment = "nested-overhead"\n[run.grid]\nwat = [1]\n')
    assert main(["sweep", str(bad)]) == 2
    assert "bad.toml: run[0].grid.wat" in capsys.readouterr().err


def test_example_spec_is_valid() -> None:
    spec = load_spec(Path(__file__).parents[2] / "examples" / "sweep.toml")
    assert len(spec.points) == 4 * 2 * 2 + 3


def test_unreadable_spec_files_are_named_errors(tmp_path: Path) -> None:
    binary = tmp_path / "latin1.toml"
    binary.write_bytes(b"out = '\xff'\n")
    with pytest.raises(ConfigError, match="latin1.toml: cannot read it"):
        load_spec(binary)
    with pytest.raises(ConfigError, match="cannot read it"):
        load_spec(tmp_path)  # a directory
    data = spec_data(tmp_path)
    data["out"] = 5
    with pytest.raises(ConfigError) as err:
        parse_spec(data, "grid.toml")
    assert err.value.field == "grid.toml: out"


def test_ok_point_without_rows_counts_as_done_and_log_noise_is_ignored(tmp_path: Path) -> None:
    from eptlab.sweep import PointResult

    spec = parse_spec(spec_data(tmp_path))
    store = SweepStore(tmp_path)
    empty = spec.points[0]
    store.save(PointResult(empty, [], None, 0.1))
    with store.log.open("a") as fh:
        fh.write("[1, 2]\n{\"status\": \"ok\"}\n{\"point_id\": \"cut sho")
    assert store.done() == {empty.point_id}
    assert list(store.points().point_id) == [empty.point_id]
    assert run_sweep(spec, jobs=1).skipped == 1
    # a later failure of the same point replaces the earlier ok
    store.save(PointResult(empty, [], "RuntimeError: boom", 0.1))
    assert empty.point_id not in store.done()
