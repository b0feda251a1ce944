"""``eptlab run --resume``: an interrupted run keeps its finished seeds, a rerun with --resume
computes only the others and gives the same files as an uninterrupted run; a partial result
of other parameters is refused by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from eptlab.cli import main
from eptlab.errors import ConfigError
from eptlab.experiments import registry, runner

from .robust_tiny import SeededTiny


@pytest.fixture(autouse=True)
def seeded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        registry, "_EXPERIMENTS", {"seeded-tiny": "tests.experiments.robust_tiny:SeededTiny"}
    )
    SeededTiny.stop_in_seed, SeededTiny.seeds_run = None, []


def manifest(directory: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((directory / "manifest.json").read_text())
    return result


def interrupted_run(out: Path, stop_in_seed: int = 2) -> None:
    SeededTiny.stop_in_seed = stop_in_seed
    with pytest.raises(KeyboardInterrupt):
        runner.run("seeded-tiny", {"seeds": "4"}, out, show_progress=False)
    SeededTiny.stop_in_seed, SeededTiny.seeds_run = None, []


def test_the_manifest_lists_the_finished_seeds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    interrupted_run(tmp_path / "r")
    m = manifest(tmp_path / "r.partial")
    assert m["seeds_done"] == [0, 1] and m["rows"] == 5  # seed 2 stopped after one row
    assert "2 finished seed(s) are kept by a rerun with --resume" in capsys.readouterr().err


def test_resume_runs_only_the_unfinished_seeds_and_matches_a_whole_run(tmp_path: Path) -> None:
    interrupted_run(tmp_path / "r")
    resumed = runner.run("seeded-tiny", {"seeds": "4"}, tmp_path / "r", show_progress=False,
                         resume=True)
    assert SeededTiny.seeds_run == [2, 3]
    whole = runner.run("seeded-tiny", {"seeds": "4"}, tmp_path / "w", show_progress=False)
    pd.testing.assert_frame_equal(resumed.table, whole.table)
    assert manifest(tmp_path / "r")["seeds_done"] == [0, 1, 2, 3]
    for name in ("seeded-tiny.csv", "seeded-tiny-summary.csv", "seeded-tiny.jsonl"):
        assert (tmp_path / "r" / name).read_text() == (tmp_path / "w" / name).read_text()


def test_without_resume_a_rerun_starts_afresh(tmp_path: Path) -> None:
    interrupted_run(tmp_path / "r")
    runner.run("seeded-tiny", {"seeds": "4"}, tmp_path / "r", show_progress=False)
    assert SeededTiny.seeds_run == [0, 1, 2, 3]


def test_resume_refuses_other_parameters_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    interrupted_run(tmp_path / "r")
    with pytest.raises(ConfigError, match="other params"):
        runner.run("seeded-tiny", {"seeds": "4", "rows": "3"}, tmp_path / "r",
                   show_progress=False, resume=True)
    assert SeededTiny.seeds_run == []  # refused before any compute
    code = main(["run", "seeded-tiny", "--set", "seeds=5", "--out", str(tmp_path / "r"),
                 "--resume"])
    assert code == 2 and "other params" in capsys.readouterr().err


def test_resume_with_nothing_to_resume_runs_everything(tmp_path: Path) -> None:
    runner.run("seeded-tiny", {"seeds": "2"}, tmp_path / "r", show_progress=False, resume=True)
    assert SeededTiny.seeds_run == [0, 1]


def test_a_row_cut_short_at_the_end_is_dropped_and_one_cut_in_the_middle_refused(
    tmp_path: Path,
) -> None:
    interrupted_run(tmp_path / "r")
    rows = tmp_path / "r.partial" / "seeded-tiny.jsonl"
    whole = rows.read_text()
    rows.write_text(whole + '{"seed": 2, "i"')  # the write the interruption cut
    runner.run("seeded-tiny", {"seeds": "4"}, tmp_path / "r", show_progress=False, resume=True)
    assert SeededTiny.seeds_run == [2, 3]
    interrupted_run(tmp_path / "s")
    rows = tmp_path / "s.partial" / "seeded-tiny.jsonl"
    lines = rows.read_text().splitlines()
    rows.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    with pytest.raises(ConfigError, match=r"seeded-tiny.jsonl:2: not a JSON row"):
        runner.run("seeded-tiny", {"seeds": "4"}, tmp_path / "s", show_progress=False,
                   resume=True)
