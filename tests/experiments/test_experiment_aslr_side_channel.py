"""The aslr-side-channel experiment: its rows make the claims the README states, costs included
(bad parameters: the contract test over every experiment,
tests/experiments/test_robust_params.py)."""

from __future__ import annotations

import pandas as pd
import pytest

from eptlab.experiments import runner
from eptlab.experiments.aslr_cost import measure_cost
from eptlab.experiments.aslr_side_channel import AslrSideChannelParams

SETS = 1 << 15
WIDE = 1 << 18


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("aslr")
    result = runner.run(
        "aslr-side-channel",
        {"trials": "6", "secret_bits": "10", "observations": "0,1,4,16", "noise": "0.5",
         "footprint_mib": "32", "accesses": "20000", "warmup": "5000",
         "llc_sets": f"{SETS},{WIDE}", "seeds": "1", "attackers": "exact"},
        out,
        show_progress=False,
    )
    for suffix in (".csv", ".parquet", ".json", ".jsonl"):
        assert (out / f"aslr-side-channel{suffix}").exists()
    for stem in ("aslr-side-channel-entropy", "aslr-side-channel-cost"):
        assert (out / f"{stem}.png").stat().st_size > 1000
    full = result.table
    assert set(full.attacker) == {"exact"}
    assert set(full.noise) == {0.5, 0.0}  # the noiseless bound rides along
    return full[full.noise == 0.5]


def pick(t: pd.DataFrame, policy: str, target: str, channel: str, sets: int) -> pd.DataFrame:
    rows = t[(t.policy == policy) & (t.target == target) & (t.channel == channel)
             & (t.llc_sets == sets)].sort_values("observations")
    assert len(rows) == 4
    return rows


def test_columns_and_shape(table: pd.DataFrame) -> None:
    assert {"policy", "observations", "entropy_bits_before", "entropy_bits_after",
            "success_rate", "tlb_miss_rate", "cycles_per_access", "walk_refs_per_access",
            "target", "channel", "llc_sets", "index_bits", "ept_page"} <= set(table.columns)
    assert len(table) == 3 * 2 * 2 * 2 * 4
    assert (table.entropy_bits_before == 10).all()
    assert (table.entropy_bits_after <= table.entropy_bits_before + 1e-9).all()
    assert ((table.success_rate >= 0) & (table.success_rate <= 1)).all()
    start = table[table.observations == 0]
    assert (start.entropy_bits_after == 10).all()
    assert list(start.success_rate) == pytest.approx([2**-10] * len(start), abs=1e-6)
    assert set(table[table.llc_sets == SETS].index_bits) == {"6-20"}


def test_more_measurements_leave_less_entropy(table: pd.DataFrame) -> None:
    for (_, _, _, _), rows in table.groupby(["policy", "target", "channel", "llc_sets"]):
        curve = rows.sort_values("observations").entropy_bits_after.to_numpy()
        assert curve[-1] <= curve[0]
        assert curve[-1] <= curve[1] + 0.5  # averaged over trials: no real increase


def test_data_line_linear_leaks_most_random_4k_hides_the_frame(table: pd.DataFrame) -> None:
    # 4k target, GPA bits 12-21; LLC index up to HPA bit 23
    final = {p: pick(table, p, "4k", "data", WIDE).iloc[-1] for p in
             ("linear", "random-2m", "random-4k")}
    assert final["linear"].entropy_bits_after < final["random-2m"].entropy_bits_after
    assert final["random-2m"].entropy_bits_after < final["random-4k"].entropy_bits_after
    assert final["random-4k"].entropy_bits_after == pytest.approx(10.0)
    assert final["linear"].success_rate > final["random-4k"].success_rate


def test_with_the_default_llc_2m_randomization_hides_nothing_more_than_linear(
    table: pd.DataFrame,
) -> None:
    # the default LLC index stops at HPA bit 20, which both layouts take from the GPA
    linear = pick(table, "linear", "4k", "data", SETS)
    random_2m = pick(table, "random-2m", "4k", "data", SETS)
    assert list(linear.entropy_bits_after) == pytest.approx(list(random_2m.entropy_bits_after))


def test_the_walk_leaks_under_every_layout(table: pd.DataFrame) -> None:
    # the EPT PTE's line (GPA bits 15-20) betrays the 4 KiB-randomized layout
    data = pick(table, "random-4k", "4k", "data", SETS).iloc[-1]
    walk = pick(table, "random-4k", "4k", "walk+data", SETS).iloc[-1]
    assert walk.entropy_bits_after < data.entropy_bits_after
    # 2 MiB target: the data line shows nothing under the default LLC, the PDE lines do
    for policy in ("linear", "random-2m", "random-4k"):
        data = pick(table, policy, "2m", "data", SETS).iloc[-1]
        walk = pick(table, policy, "2m", "walk+data", SETS).iloc[-1]
        assert data.entropy_bits_after == pytest.approx(10.0)
        assert walk.entropy_bits_after < data.entropy_bits_after


def test_costs_random_4k_misses_the_tlb_and_walks_more(table: pd.DataFrame) -> None:
    cost = table.drop_duplicates("policy").set_index("policy")
    assert cost.loc["random-4k", "ept_page"] == "4k"
    assert cost.loc["linear", "ept_page"] == cost.loc["random-2m", "ept_page"] == "2m"
    assert cost.loc["random-4k", "tlb_miss_rate"] > cost.loc["linear", "tlb_miss_rate"]
    refs = cost["walk_refs_per_access"]
    assert refs["random-4k"] > refs["linear"]
    assert cost.loc["random-4k", "cycles_per_access"] > cost.loc["linear", "cycles_per_access"]
    # every row of a policy carries the same cost
    assert table.groupby("policy").tlb_miss_rate.nunique().eq(1).all()


def test_cost_layouts_have_the_ept_leaves_they_promise() -> None:
    p = AslrSideChannelParams(footprint_mib=8, accesses=2000, warmup=0, workload="zipf",
                              guest_page="4k")
    assert measure_cost(p, "random-4k").ept_leaf_sizes == ("4k",)
    assert measure_cost(p, "linear").ept_leaf_sizes == ("2m",)
