"""Every experiment runs over seeds: rows carry ``seed``, different seeds give different rows
where randomness enters, the same seed gives the same rows, and the summary has intervals."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import pytest

from eptlab.cli import main
from eptlab.errors import ConfigError
from eptlab.experiments import get, runner
from eptlab.experiments.base import Progress, Row, apply_overrides
from eptlab.experiments.intervals import HIGH, LOW, measured_columns
from eptlab.experiments.registry import names
from eptlab.experiments.seeds import seed_list, seeded_rows
from eptlab.sweep import load, parse_spec, run_sweep

SMALL: dict[str, dict[str, str]] = {
    "nested-overhead": {"workloads": "random,sequential", "footprint_mib": "16",
                        "accesses": "4000", "trace": "", "ept_pages": "4k"},
    # few writes over many 2 MiB regions: which regions they hit (the seed) shows in 2m-copy
    "cow-fork": {"guest_mibs": "32", "clones": "2", "write_fraction": "0.001",
                 "parent_fraction": "0.01", "lazy_guest_mib": "16", "working_sets": "8,300",
                 "reset_guest_mib": "16", "dirty_sets": "2,40", "resets": "1"},
    "prefetch-hypercall": {"footprint_mib": "1", "accesses": "2000", "vcpus": "1,2",
                           "remaps": "2", "policies": "none,back+warm"},
    # the files' places on the disk (the seed) show in the hard disk's seeks
    "double-caching": {"files": "2", "file_mib": "2", "guest_mib": "96", "host_cache_mib": "8",
                       "disks": "hdd", "guest_caches": "cold"},
    "aslr-side-channel": {"trials": "3", "secret_bits": "8", "observations": "0,4",
                          "footprint_mib": "8", "accesses": "4000", "warmup": "1000",
                          "llc_sets": "2048", "targets": "4k", "policies": "linear,random-4k",
                          "slice_hashes": "off", "pp_trials": "1"},
    "integrity-monitor": {"accesses": "20000", "warmup": "2000", "period": "5000",
                          "malicious_writes": "4", "code_mib": "4", "slab_mib": "2",
                          "reference_accesses": "1000"},
    "trap-debugger": {"accesses": "6000", "warmup": "1000", "heap_pages": "64",
                      "live_objects": "150", "bugs": "10", "fractions": "0.2",
                      "periods": "1000,4000", "compare": "write/mtf"},
    "tsx-aborts": {"sections": "30", "region_pages": "128", "round_every": "15",
                   "timer_period": "600", "long_body": "128"},
    "tsx-drk": {"pages": "32"},
    "memory-encryption": {"workloads": "sequential,random", "footprint_mib": "16",
                          "random_footprints_mib": "16", "accesses": "3000", "warmup": "1000",
                          "llc_mib": "2"},
    # measures this machine: the native side is timed, the simulated side seeded
    "model-vs-machine": {"patterns": "random,pointer-chase", "footprints_mib": "8",
                         "pages": "4k", "outer_ept_pages": "4k,2m", "native_accesses": "2000",
                         "repeats": "1", "sim_warmup": "2000", "sim_accesses": "3000",
                         "memory_margin_mib": "64"},
}
# measured with a clock: not a function of the seed
WALL_CLOCK = {
    "model-vs-machine": {"measured_cycles_per_access", "error_pct", "measured_spread"},
}
SEEDED = list(names())


@dataclass(frozen=True)
class ToyParams:
    steps: int = 4
    seeds: int = 3
    seed: int = 10


class Toy:
    name: ClassVar[str] = "toy"
    keys: ClassVar[tuple[str, ...]] = ("step",)

    def rows(self, params: ToyParams, progress: Progress) -> Iterator[Row]:
        for step in range(params.steps):
            progress(step + 1, params.steps)
            yield {"step": step, "value": params.seed * 100 + step}


def test_the_driver_runs_every_seed_with_one_progress_bar() -> None:
    seen: list[tuple[int, int]] = []
    rows = list(seeded_rows(Toy(), ToyParams(), lambda d, t: seen.append((d, t))))  # type: ignore[arg-type]
    assert [r["seed"] for r in rows] == [10] * 4 + [11] * 4 + [12] * 4
    assert list(rows[0]) == ["seed", "step", "value"]
    assert [r["value"] for r in rows[4:8]] == [1100, 1101, 1102, 1103]
    assert seen[-1] == (12, 12) and [d for d, _ in seen] == sorted(d for d, _ in seen)


@dataclass(frozen=True)
class OnceParams:
    steps: int = 2
    seed: int = 4


class Inside(Toy):
    seeds_inside: ClassVar[bool] = True

    def rows(self, params: ToyParams, progress: Progress) -> Iterator[Row]:
        for seed in range(params.seed, params.seed + params.seeds):
            yield {"step": 0, "seed": seed, "value": seed}


def test_experiments_without_seeds_or_looping_seeds_themselves_run_once() -> None:
    rows = list(seeded_rows(Toy(), OnceParams(), lambda d, t: None))  # type: ignore[arg-type]
    assert [r["seed"] for r in rows] == [4, 4] and list(rows[0]) == ["seed", "step", "value"]
    rows = list(seeded_rows(Inside(), ToyParams(seeds=2), lambda d, t: None))  # type: ignore[arg-type]
    assert [(r["seed"], r["value"]) for r in rows] == [(10, 10), (11, 11)]


def test_every_registered_experiment_declares_its_keys() -> None:
    from eptlab.experiments.registry import experiments

    for name, cls in experiments().items():
        assert isinstance(cls.keys, tuple) and cls.keys, name


def test_seed_counts_are_checked() -> None:
    assert seed_list(ToyParams(seeds=2, seed=7)) == [7, 8]
    with pytest.raises(ConfigError, match="seeds"):
        seed_list(ToyParams(seeds=0))
    with pytest.raises(ConfigError, match="seed"):
        seed_list(ToyParams(seed=-1))
    assert main(["run", "cow-fork", "--set", "seeds=0"]) == 2


@pytest.mark.parametrize("name", SEEDED)
def test_every_experiment_declares_seeds_and_keys(name: str) -> None:
    experiment = get(name)
    order = [f.name for f in fields(experiment.Params)]
    assert order[order.index("seed") - 1] == "seeds"
    assert experiment.Params().seeds == 5 and experiment.Params().seed == 0
    assert apply_overrides(experiment.Params, dict(experiment.demo)).seeds == 3
    assert experiment.keys and "seed" not in experiment.keys
    assert set(SMALL) == set(SEEDED), "give the new experiment a small scale here"


@pytest.fixture(scope="module", params=SEEDED)
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    name: str = request.param
    out = tmp_path_factory.mktemp(name)
    return name, out, runner.run(name, SMALL[name] | {"seeds": "2"}, out, show_progress=False)


def _measured(name: str, table: pd.DataFrame) -> list[str]:
    skip = WALL_CLOCK.get(name, set())
    return [c for c in measured_columns(table, get(name).keys) if c not in skip]


def test_rows_carry_their_seed_and_differ_between_seeds(run: Any) -> None:
    name, _, result = run
    table = result.table
    assert table.columns[0] == "seed" and sorted(table.seed.unique()) == [0, 1]
    keys = list(get(name).keys)
    assert set(keys) <= set(table.columns)
    first, second = (table[table.seed == s].drop(columns="seed").reset_index(drop=True)
                     for s in (0, 1))
    assert first[keys].equals(second[keys])  # the same configurations in the same order
    measured = _measured(name, table)
    differ = [c for c in measured if not first[c].equals(second[c])]
    assert differ, f"{name}: seeds 0 and 1 gave the same measurements"


def test_the_same_seed_gives_the_same_rows(run: Any) -> None:
    name, _, result = run
    experiment = get(name)()
    params = replace(apply_overrides(experiment.Params, SMALL[name]), seed=1)
    again = pd.DataFrame(list(experiment.rows(params, lambda d, t: None)))
    before = result.table[result.table.seed == 1].drop(columns="seed").reset_index(drop=True)
    skip = list(WALL_CLOCK.get(name, set()))
    pd.testing.assert_frame_equal(again.drop(columns=skip), before.drop(columns=skip))


def test_the_summary_has_an_interval_for_every_measured_column(run: Any) -> None:
    name, out, result = run
    summary = pd.read_parquet(out / f"{name}-summary.parquet")
    assert (out / f"{name}-summary.csv").exists()
    measured = measured_columns(result.table, get(name).keys)
    for column in measured:
        assert {column, column + LOW, column + HIGH} <= set(summary.columns), column
        finite = summary[column].notna()
        assert (summary.loc[finite, column + LOW] <= summary.loc[finite, column]).all()
        assert (summary.loc[finite, column] <= summary.loc[finite, column + HIGH]).all()
    assert (summary.n == 2).all()
    assert len(summary) * 2 == len(result.table)
    saved = json.loads((out / f"{name}.json").read_text())
    assert len(saved["summary"]) == len(summary) and measured[0] + LOW in saved["summary"][0]


def test_readings_quote_intervals(run: Any) -> None:
    name, out, _ = run
    from eptlab.report.sections import experiment_section

    section = experiment_section(name, out)
    text = " ".join(section.interpretation)
    assert "No interpretation" not in text
    assert " [" in text, f"{name}: the reading quotes no interval"
    caption, shown = section.tables[0]
    assert "95% interval] over 2 seeds" in caption
    assert "seed" not in shown.columns and "n" in shown.columns


def test_json_output_has_rows_and_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["run", "cow-fork", "--out", str(tmp_path), "--json", "--set", "seeds=3"]
    for key, value in SMALL["cow-fork"].items():
        args += ["--set", f"{key}={value}"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert sorted({r["seed"] for r in out["rows"]}) == [0, 1, 2]
    assert {s["n"] for s in out["summary"]} == {3}


def test_sweep_points_carry_seeds(tmp_path: Path) -> None:
    spec = parse_spec({
        "out": str(tmp_path / "sweep"),
        "run": [{"experiment": "cow-fork", "set": SMALL["cow-fork"] | {"seeds": 2},
                 "grid": {"seed": [0, 5]}}],
    })
    assert run_sweep(spec, jobs=1).ok == 2
    rows = load(tmp_path / "sweep", "cow-fork")
    assert sorted(rows.seed.unique()) == [0, 1, 5, 6]
