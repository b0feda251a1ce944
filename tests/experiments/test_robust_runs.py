"""Issue 13, items 2, 3 (output paths) and 8: a run never mixes with an older one, its output
location is checked before compute, final files are whole, an interruption says what was kept
(each of these failed on main before the fix)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from eptlab.cli import main
from eptlab.errors import ConfigError
from eptlab.experiments import registry, runner
from eptlab.report import collect

from .robust_tiny import Tiny


@pytest.fixture(autouse=True)
def tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_EXPERIMENTS", {"tiny": "tests.experiments.robust_tiny:Tiny"})
    Tiny.computed = 0


def manifest(directory: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((directory / "manifest.json").read_text())
    return result


def test_a_complete_run_has_a_manifest_naming_its_files_and_parameters(tmp_path: Path) -> None:
    out = tmp_path / "r"
    result = runner.run("tiny", {"rows": "3"}, out, show_progress=False)
    m = manifest(out)
    assert m["status"] == "complete" and m["experiment"] == "tiny" and m["rows"] == 3
    assert m["params"]["rows"] == 3 and "eptlab" in m and "created" in m
    assert sorted(m["files"]) == sorted(Path(f).name for f in result.files)
    assert all((out / name).stat().st_size > 0 for name in m["files"])
    assert not (tmp_path / "r.partial").exists()


def test_an_interrupted_rerun_leaves_the_previous_result_whole_and_its_own_labelled(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r"
    runner.run("tiny", {"rows": "3"}, out, show_progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(KeyboardInterrupt):
        runner.run("tiny", {"rows": "5", "seed": "7", "interrupt_at": "3"}, out,
                   show_progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing new mixed in
    partial = tmp_path / "r.partial"
    m = manifest(partial)
    assert m["status"] == "partial" and m["rows"] == 2 and m["params"]["seed"] == 7
    assert len((partial / "tiny.csv").read_text().splitlines()) == 3  # header + 2 rows
    err = capsys.readouterr().err
    assert "kept 2 finished row(s)" in err and str(partial) in err and "untouched" in err


def test_a_completed_rerun_replaces_every_file_of_the_previous_one(tmp_path: Path) -> None:
    out = tmp_path / "r"
    runner.run("tiny", {"rows": "3"}, out, show_progress=False)
    (out / "tiny-old-figure.png").write_bytes(b"from an older run")
    runner.run("tiny", {"rows": "2"}, out, show_progress=False)
    assert not (out / "tiny-old-figure.png").exists()
    assert manifest(out)["params"]["rows"] == 2
    assert len(pd.read_parquet(out / "tiny.parquet")) == 2


def test_a_kill_while_writing_a_figure_leaves_no_cut_file(tmp_path: Path) -> None:
    out = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):
        runner.run("tiny", {"break_png": "true"}, out, show_progress=False)
    partial = tmp_path / "r.partial"
    assert manifest(partial)["status"] == "partial"
    assert not list(partial.glob("*.png")) and not list(partial.glob(".*tmp"))
    assert not out.exists()


@pytest.mark.parametrize(
    "where",
    ["file", "under-file", "/proc/eptlab-out", "/dev/null", "foreign-dir"],
)
def test_a_bad_output_location_is_refused_before_any_compute(
    tmp_path: Path, where: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "foreign-dir").mkdir()
    (tmp_path / "foreign-dir" / "thesis.tex").write_text("keep me")
    out = {"file": tmp_path / "file", "under-file": tmp_path / "file" / "sub",
           "foreign-dir": tmp_path / "foreign-dir"}.get(where, Path(where))
    with pytest.raises(ConfigError) as info:
        runner.run("tiny", {}, out, show_progress=False)
    assert info.value.field == "out" and Tiny.computed == 0
    assert main(["run", "tiny", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "out" in err
    assert Tiny.computed == 0
    assert (tmp_path / "foreign-dir" / "thesis.tex").read_text() == "keep me"


def test_the_report_leaves_out_partial_results_and_says_so(tmp_path: Path) -> None:
    from eptlab.report import left_out

    runner.run("tiny", {"rows": "3"}, tmp_path / "tiny", show_progress=False)
    assert len(collect(tmp_path)) == 1
    with pytest.raises(KeyboardInterrupt):
        runner.run("tiny", {"rows": "5", "interrupt_at": "2"}, tmp_path / "tiny",
                   show_progress=False)
    assert len(collect(tmp_path)) == 1  # the previous complete result
    assert any("tiny.partial" in note and "partial" in note for note in left_out(tmp_path))
    m = json.loads((tmp_path / "tiny" / "manifest.json").read_text())
    m["status"] = "partial"  # a result whose manifest says partial is never shown
    (tmp_path / "tiny" / "manifest.json").write_text(json.dumps(m))
    assert collect(tmp_path) == []


def test_a_row_that_adds_a_column_widens_the_csv_it_is_written_to(tmp_path: Path) -> None:
    runner.run("tiny", {"rows": "4", "widen_at": "3"}, tmp_path / "w", show_progress=False)
    table = pd.read_csv(tmp_path / "w" / "tiny.csv")
    assert list(table.columns) == ["seed", "i", "value", "extra"]
    assert table["extra"].isna().tolist() == [True, True, False, False]
    assert table["extra"].iloc[2:].tolist() == [2, 3] and len(table) == 4
