"""The memory-encryption experiment: its claims hold on a small run (bad parameters: the
contract test over every experiment, tests/experiments/test_robust_params.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from eptlab.cli import main
from eptlab.experiments import runner
from eptlab.experiments.memory_encryption import MemoryEncryption, MemoryEncryptionParams
from eptlab.mmu.config import CacheConfig

DECRYPT = 40
MAC = 20
KEYS = ["workload", "footprint_mib", "llc_mib"]


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("enc")
    result = runner.run(
        "memory-encryption",
        {
            "workloads": "sequential,random",
            "footprint_mib": "16",
            "random_footprints_mib": "16,512",
            "accesses": "6000",
            "warmup": "0",  # cold runs: the nested >= native claim is exact then
            "llc_mib": "2,32",
            "decrypt_latency": str(DECRYPT),
            "integrity_latency": str(MAC),
            "seeds": "1",
        },
        out,
        show_progress=False,
    )
    for suffix in (".csv", ".parquet", ".json", ".jsonl"):
        assert (out / f"memory-encryption{suffix}").exists()
    for figure in ("slowdown", "cycles", "extra", "presets"):
        assert (out / f"memory-encryption-{figure}.png").stat().st_size > 1000
    return result.table


def pairs(t: pd.DataFrame, left: tuple[str, str], right: tuple[str, str]) -> pd.DataFrame:
    """Rows of (mode, encryption) ``left`` joined with ``right`` on workload, footprint, LLC."""
    a = t[(t["mode"] == left[0]) & (t.encryption == left[1])]
    b = t[(t["mode"] == right[0]) & (t.encryption == right[1])]
    joined = a.merge(b, on=KEYS, suffixes=("_l", "_r"))
    assert len(joined) == len(a) == len(b) > 0
    return joined


def test_columns_and_rows(table: pd.DataFrame) -> None:
    required = {
        "mode", "encryption", "workload", "tlb_miss_rate", "walk_refs_dram",
        "translation_cycles_per_access", "cycles_per_access", "slowdown_pct",
        "data_refs_dram", "walk_share_pct", "walk_dram_vs_native", "key_id", "llc_mib",
    }  # fmt: skip
    assert required <= set(table.columns)
    assert len(table) == 3 * 2 * 2 * 4  # sources x LLC sizes x modes x off and three presets
    assert set(table.encryption) == {"off", "mktme", "sev-snp", "tdx"}
    assert set(table[table.encryption != "off"].query("mode == 'nested'").key_id) == {1}
    assert set(table[table.encryption == "off"].key_id) == {0}


def test_off_rows_are_the_baseline(table: pd.DataFrame) -> None:
    off = table[table.encryption == "off"]
    assert (off.slowdown_pct == 0).all() and (off.extra_data_cycles_per_access == 0).all()
    assert off.walk_share_pct.isna().all()


@pytest.mark.parametrize("mode", ["native", "nested"])
def test_extra_cycles_are_decrypt_times_dram_lines(table: pd.DataFrame, mode: str) -> None:
    p = pairs(table, (mode, "off"), (mode, "mktme"))
    # the same stream: the same references served by DRAM with and without encryption
    assert (p.walk_refs_dram_l == p.walk_refs_dram_r).all()
    assert (p.data_refs_dram_l == p.data_refs_dram_r).all()
    n = p.accesses_r
    extra = (p.cycles_per_access_r - p.cycles_per_access_l) * n
    lines = p.walk_refs_dram_r + p.data_refs_dram_r
    assert extra.to_numpy() == pytest.approx((DECRYPT * lines).to_numpy(), abs=0.01 * n.max())
    assert (p.extra_translation_cycles_per_access_r * n).to_numpy() == pytest.approx(
        (DECRYPT * p.walk_refs_dram_r).to_numpy(), abs=0.002 * n.max()
    )
    assert (p.slowdown_pct_r > 0).all()


def test_slowdown_never_exceeds_decrypt_over_dram_latency(table: pd.DataFrame) -> None:
    """Each DRAM line costs DRAM latency before and decrypt more after: the encrypted run can
    be slower by at most decrypt / DRAM latency, whatever the mode or workload."""
    bound = 100.0 * DECRYPT / CacheConfig().dram_latency
    on = table[table.encryption == "mktme"]
    assert (on.slowdown_pct <= bound + 1e-9).all()
    assert on.slowdown_pct.max() > 0.5 * bound  # random over 512 MiB is DRAM-bound


def test_two_dimensional_walks_amplify_the_translation_cost(table: pd.DataFrame) -> None:
    for enc in ("off", "mktme"):
        p = pairs(table, ("native", enc), ("nested", enc))
        assert (p.walks_l == p.walks_r).all()  # the same TLB misses ...
        assert (p.walk_refs_dram_r >= p.walk_refs_dram_l).all()  # ... more lines from DRAM
    p = pairs(table, ("native", "mktme"), ("nested", "mktme"))
    big = p[(p.workload == "random") & (p.footprint_mib == 512)]
    assert (big.walk_refs_dram_r > big.walk_refs_dram_l).all()
    extra = "extra_translation_cycles_per_access"
    assert (big[f"{extra}_r"] > big[f"{extra}_l"]).all()
    assert (big.walk_share_pct_r > big.walk_share_pct_l).all()
    assert (big.walk_dram_vs_native_r > 1).all()
    # the data part is the same stream's data lines in both modes
    assert (big.extra_data_cycles_per_access_r - big.extra_data_cycles_per_access_l).abs().max() < 1


def test_a_smaller_llc_decrypts_at_least_as_many_lines(table: pd.DataFrame) -> None:
    """L1 and L2 see the same references whatever the LLC size, and an LRU LLC with more sets
    (same ways) holds a superset: the smaller LLC misses every line the larger one misses."""
    for mode in ("native", "nested"):
        rows = table[(table["mode"] == mode) & (table.encryption == "mktme")]
        small = rows[rows.llc_mib == 2].set_index(["workload", "footprint_mib"])
        large = rows[rows.llc_mib == 32].set_index(["workload", "footprint_mib"])
        assert (small.walk_refs_dram >= large.walk_refs_dram).all()
        assert (small.data_refs_dram >= large.data_refs_dram).all()


def test_random_misses_more_as_its_footprint_grows(table: pd.DataFrame) -> None:
    rows = table[(table.workload == "random") & (table.encryption == "mktme")]
    for (_mode, _llc), group in rows.groupby(["mode", "llc_mib"]):
        g = group.sort_values("footprint_mib")
        assert g.tlb_miss_rate.is_monotonic_increasing
        assert g.walk_refs_dram.is_monotonic_increasing


def test_cli_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    args = ["run", "memory-encryption", "--set", "workloads=sequential", "--set",
            "footprint_mib=4", "--set", "accesses=500", "--set", "warmup=700", "--set",
            "llc_mib=2", "--set", "seeds=1"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "ok"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["experiment"] == "memory-encryption" and len(out["rows"]) == 8
    assert {r["accesses"] for r in out["rows"]} == {500}  # the warm-up is not measured


def test_reading_follows_the_numbers(table: pd.DataFrame) -> None:
    """The sentences quote the table and their verdicts flip when the numbers do."""
    experiment = MemoryEncryption()
    params = MemoryEncryptionParams(decrypt_latency=DECRYPT, integrity_latency=MAC)
    on = table[table.encryption == "mktme"]
    first, walks = experiment.interpret(table, params)[:2]
    assert f"{on.slowdown_pct.max():.1f}%" in first
    assert walks.startswith("The cost concentrates in two-dimensional walks")
    flipped = table.copy()
    nested = flipped["mode"] == "nested"
    flipped.loc[nested, "extra_translation_cycles_per_access"] = 0.0
    assert experiment.interpret(flipped, params)[1].startswith(
        "Here two-dimensional walks do not add to the cost"
    )


def test_sev_snp_checks_the_rmp_on_nested_walks_only(table: pd.DataFrame) -> None:
    sev = table[table.encryption == "sev-snp"]
    native, nested = sev[sev["mode"] == "native"], sev[sev["mode"] == "nested"]
    assert (native.rmp_checks_per_access == 0).all()
    assert (native.extra_rmp_cycles_per_access == 0).all()
    # one check per entry a walk read and one for its data page; misses read an RMP entry
    walk_refs = nested.walk_refs / nested.accesses
    per_walk = nested.tlb_miss_rate
    assert nested.rmp_checks_per_access.to_numpy() == pytest.approx(
        (walk_refs + per_walk).to_numpy(), abs=2e-4
    )
    assert (nested.rmp_lookups_per_access <= nested.rmp_checks_per_access).all()
    assert (nested.rmp_lookups_per_access > 0).all()
    # the nested tables are read in the clear: MKTME decrypts exactly the EPT lines more
    p = pairs(table, ("nested", "sev-snp"), ("nested", "mktme"))
    assert (p.decrypted_per_access_r - p.decrypted_per_access_l).to_numpy() == pytest.approx(
        p.ept_lines_dram_per_access_r.to_numpy(), abs=2e-4
    )


@pytest.mark.parametrize("mode", ["native", "nested"])
def test_tdx_costs_mktme_plus_a_mac_per_decrypted_line(table: pd.DataFrame, mode: str) -> None:
    p = pairs(table, (mode, "mktme"), (mode, "tdx"))
    assert (p.decrypted_per_access_l == p.decrypted_per_access_r).all()
    assert (p.macs_per_access_r == p.decrypted_per_access_r).all()
    assert (p.macs_per_access_l == 0).all()
    diff = p.extra_cycles_per_access_r - p.extra_cycles_per_access_l
    assert diff.to_numpy() == pytest.approx((MAC * p.macs_per_access_r).to_numpy(), abs=0.01)


def test_readings_quote_every_preset(table: pd.DataFrame) -> None:
    params = MemoryEncryptionParams(decrypt_latency=DECRYPT, integrity_latency=MAC)
    text = " ".join(MemoryEncryption().interpret(table, params))
    for preset in ("mktme", "sev-snp", "tdx"):
        assert f"{preset} " in text
    assert "RMP" in text and "memory-level parallelism" in text
