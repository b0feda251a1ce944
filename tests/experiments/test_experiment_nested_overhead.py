"""The nested-overhead experiment shows the known shape, and `eptlab run` writes its files."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from eptlab.cli import main
from eptlab.experiments import runner


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("nested")
    result = runner.run(
        "nested-overhead",
        {"workloads": "random,sequential", "footprint_mib": "64", "accesses": "20000", "trace": "",
         "seeds": "1"},
        out,
        show_progress=False,
    )
    for suffix in (".csv", ".parquet", ".json", ".jsonl"):
        assert (out / f"nested-overhead{suffix}").exists()
    assert (out / "nested-overhead-refs.png").stat().st_size > 1000
    return result.table


def row(t: pd.DataFrame, workload: str, mode: str, gp: str, ep: str, pwc: bool) -> pd.Series:
    sel = t[
        (t.workload == workload)
        & (t["mode"] == mode)
        & (t.guest_page == gp)
        & (t.ept_page == ep)
        & (t.pwc == pwc)
    ]
    assert len(sel) == 1
    return sel.iloc[0]


def test_columns(table: pd.DataFrame) -> None:
    assert {
        "workload",
        "mode",
        "guest_page",
        "ept_page",
        "pwc",
        "accesses",
        "tlb_miss_rate",
        "refs_per_walk",
        "cycles_per_access",
    } <= set(table.columns)
    assert len(table) == 2 * (2 * 2 + 2 * 2 * 2)


def test_cold_2d_walk_is_24_references_without_caches(table: pd.DataFrame) -> None:
    r = row(table, "random", "nested", "4k", "4k", False)
    assert r.refs_per_walk == 24.0
    assert row(table, "random", "native", "4k", "-", False).refs_per_walk == 4.0
    # 2 MiB pages in both dimensions: 3 guest levels x (3 + 1) + 3 = 15
    assert row(table, "random", "nested", "2m", "2m", False).refs_per_walk == 15.0


def test_caches_remove_most_references(table: pd.DataFrame) -> None:
    off = row(table, "random", "nested", "4k", "4k", False)
    on = row(table, "random", "nested", "4k", "4k", True)
    assert on.refs_per_walk < 0.6 * off.refs_per_walk
    assert on.cycles_per_access < off.cycles_per_access


def test_large_pages_cut_walk_cost(table: pd.DataFrame) -> None:
    small = row(table, "random", "nested", "4k", "4k", True)
    for gp, ep in (("4k", "2m"), ("2m", "4k"), ("2m", "2m")):
        big = row(table, "random", "nested", gp, ep, True)
        assert big.cycles_per_access < small.cycles_per_access, (gp, ep)
    assert row(table, "random", "nested", "2m", "2m", True).tlb_miss_rate < small.tlb_miss_rate


def test_nested_costs_more_than_native(table: pd.DataFrame) -> None:
    for pwc in (False, True):
        for page in ("4k", "2m"):
            nested = row(table, "random", "nested", page, page, pwc)
            native = row(table, "random", "native", page, "-", pwc)
            # the same TLB reach (entries of the guest page size) ...
            assert nested.tlb_miss_rate == pytest.approx(native.tlb_miss_rate, abs=0.02)
            # ... but each miss walks two dimensions
            assert nested.translation_cycles_per_access > native.translation_cycles_per_access


def test_cli_run_json_and_list(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["list"]) == 0
    assert "nested-overhead" in capsys.readouterr().out
    assert (
        main(
            [
                "run",
                "nested-overhead",
                "--set",
                "workloads=sequential",
                "--set",
                "footprint_mib=8",
                "--set",
                "accesses=2000",
                "--set",
                "trace=",
                "--set",
                "guest_pages=4k",
                "--set",
                "ept_pages=4k",
                "--set",
                "seeds=1",
                "--out",
                str(tmp_path),
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["experiment"] == "nested-overhead" and len(out["rows"]) == 4
    assert out["params"]["footprint_mib"] == 8
    assert main(["run", "nested-overhead", "--set", "nope=1"]) == 2
    assert main(["run", "no-such-experiment"]) == 2


def test_a_shared_space_gives_the_rows_of_a_fresh_build() -> None:
    # rows() builds each space once per seed and runs every stream on a copy of its memory: a
    # run sets A/D bits in the tables, which the next stream must not inherit
    from eptlab.arch.bits import PageSize
    from eptlab.experiments.nested_overhead import NestedOverhead, NestedOverheadParams

    experiment = NestedOverhead()
    params = NestedOverheadParams(workloads=("random", "sequential"), footprint_mib=4,
                                  accesses=3000, trace="", seed=2)
    first, second = list(experiment.sources(params))
    k = PageSize.SIZE_4K
    space = experiment.space(first, "nested", k, k, params.seed)
    tables = space.memory._rows.copy()
    shared = [experiment.measure(s, "nested", k, k, True, space=space) for s in (first, second)]
    fresh = [experiment.measure(s, "nested", k, k, True, params.seed) for s in (first, second)]
    assert shared == fresh
    assert shared[0] != shared[1]
    assert (space.memory._rows == tables).all()  # the shared space is as built
