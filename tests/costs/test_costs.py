"""The cost profile: every value has a source, files are checked, profiles merge and switch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from eptlab.cli import main
from eptlab.costs import CostProfile, CostValue, Source, active_profile, use_profile
from eptlab.errors import ConfigError

GOOD = """
[profile]
name = "host-a"

[values.dram_latency]
value = 400
unit = "cycles"
source = "measured"
ref = "pointer chase over 1 GiB, 2 MiB pages"
date = "2026-12-07"
host = "box"
spread = 0.03
samples = 9
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.toml"
    path.write_text(text)
    return path


def test_the_default_profile_gives_every_value_a_known_source_and_reference() -> None:
    profile = CostProfile.default()
    assert len(profile.values) >= 16
    for key, v in profile.values.items():
        assert v.source.kind in ("measured", "cited", "assumed"), key
        assert v.source.ref.strip() and v.unit and v.doc, key


def test_a_profile_survives_a_round_trip_through_toml() -> None:
    default = CostProfile.default()
    mixed = default.with_values(
        {"dram_latency": CostValue(321.5, "cycles", Source("measured", "chase", "d", "h", 0.1, 7))}
    )
    again = CostProfile.from_toml(mixed.to_toml(), known=default)
    assert again == mixed
    assert again["dram_latency"] == 321.5
    assert again.values["dram_latency"].source.samples == 7


def test_a_partial_profile_overrides_its_keys_and_keeps_the_rest(tmp_path: Path) -> None:
    default = CostProfile.default()
    loaded = CostProfile.load(write(tmp_path, GOOD))
    assert loaded.name == "host-a"
    assert loaded["dram_latency"] == 400 != default["dram_latency"]
    assert loaded.values["dram_latency"].source.kind == "measured"
    others = [k for k in default if k != "dram_latency"]
    assert all(loaded.values[k] == default.values[k] for k in others)


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda t: t.replace('source = "measured"\n', ""), "values.dram_latency"),
        (lambda t: t.replace('source = "measured"', 'source = "guessed"'), "dram_latency.source"),
        (
            lambda t: t.replace('ref = "pointer chase over 1 GiB, 2 MiB pages"\n', ""),
            "dram_latency",
        ),
        (lambda t: t.replace("value = 400", 'value = "fast"'), "dram_latency.value"),
        (lambda t: t.replace("value = 400", "value = -4"), "dram_latency.value"),
        (lambda t: t.replace("dram_latency", "dram_latncy"), "values.dram_latncy"),
        (lambda t: t.replace('unit = "cycles"', 'unit = "ns"'), "dram_latency.unit"),
        (lambda t: t.replace("spread = 0.03", 'spread = "low"'), "dram_latency.spread"),
    ],
)
def test_a_bad_value_is_refused_naming_the_file_and_the_key(
    tmp_path: Path, edit: object, named: str
) -> None:
    path = write(tmp_path, edit(GOOD))  # type: ignore[operator]
    with pytest.raises(ConfigError) as caught:
        CostProfile.load(path)
    assert str(path) in str(caught.value) and named in str(caught.value)


def test_a_value_without_a_source_is_refused_naming_the_value(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace('source = "measured"\n', ""))
    with pytest.raises(ConfigError, match=r"values\.dram_latency.*source"):
        CostProfile.load(path)


def test_malformed_toml_is_one_line_naming_the_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("value = 400", "value = = 400"))
    with pytest.raises(ConfigError) as caught:
        CostProfile.load(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and "line" in message


def test_use_profile_switches_the_active_profile_and_restores_it() -> None:
    default = active_profile()
    other = default.with_values(
        {"vmexit_cycles": CostValue(3000, "cycles", Source("assumed", "test"))}, name="x"
    )
    with use_profile(other):
        assert active_profile()["vmexit_cycles"] == 3000
        from eptlab.hv.costs import hv_costs

        assert hv_costs().vmexit == 3000
    assert active_profile() is default


def test_costs_json_lists_every_key_with_a_source(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["costs", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["values"]
    assert [row["key"] for row in listed] == list(CostProfile.default().values)
    assert all(row["source"] in ("measured", "cited", "assumed") and row["ref"] for row in listed)


def test_costs_with_a_malformed_profile_prints_one_line_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, GOOD.replace('unit = "cycles"', 'unit = "ns"'))
    assert main(["costs", "--profile", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(path) in err and "dram_latency" in err


def test_costs_shows_a_loaded_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["costs", "--json", "--profile", str(write(tmp_path, GOOD))]) == 0
    shown = {r["key"]: r for r in json.loads(capsys.readouterr().out)["values"]}
    assert shown["dram_latency"]["value"] == 400 and shown["dram_latency"]["source"] == "measured"


def doubled(tmp_path: Path, key: str) -> Path:
    default = CostProfile.default()
    unit = default.values[key].unit
    path = tmp_path / f"double-{key}.toml"
    path.write_text(
        f'[profile]\nname = "double-{key}"\n\n[values.{key}]\nvalue = {2 * default[key]}\n'
        f'unit = "{unit}"\nsource = "assumed"\nref = "test: twice the default"\n'
    )
    return path


NESTED = [
    "run", "nested-overhead", "--json", "--set", "workloads=random", "--set", "footprint_mib=64",
    "--set", "accesses=3000", "--set", "trace=", "--set", "guest_pages=4k",
    "--set", "ept_pages=4k", "--set", "seeds=1",
]  # fmt: skip


def run_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def test_profile_raises_a_runs_cycles_and_is_recorded_in_its_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = run_json([*NESTED, "--out", str(tmp_path / "a")], capsys)
    path = doubled(tmp_path, "dram_latency")
    slow = run_json([*NESTED, "--out", str(tmp_path / "b"), "--profile", str(path)], capsys)
    assert base["profile"]["name"] == "default"
    recorded = slow["profile"]["values"]["dram_latency"]
    assert recorded["value"] == 2 * CostProfile.default()["dram_latency"]
    assert recorded["source"] == "assumed" and recorded["ref"] == "test: twice the default"
    pairs = list(zip(base["rows"], slow["rows"], strict=True))
    assert all(b["walks"] == s["walks"] for b, s in pairs)  # same events, other prices
    assert all(s["cycles_per_access"] > b["cycles_per_access"] for b, s in pairs)
    written = json.loads((tmp_path / "b" / "nested-overhead.json").read_text())
    assert written["profile"]["name"] == "double-dram_latency"
    assert written["profile"]["path"] == str(path)


def test_run_with_a_malformed_profile_is_one_line_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, GOOD.replace("[values.dram_latency]", "[values.dram_latency"))
    assert main([*NESTED, "--profile", str(path)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "line" in err


def test_hypervisor_prices_follow_the_active_profile(tmp_path: Path) -> None:
    from eptlab.apps.disk import disk_model
    from eptlab.mmu.config import CacheConfig, CostModel, MmuConfig

    default = CostProfile.default()
    assert MmuConfig() == MmuConfig.from_profile(default)
    other = CostProfile.load(doubled(tmp_path, "hdd_seek_us"))
    with use_profile(other):
        assert disk_model("hdd").seek_us == 2 * default["hdd_seek_us"]
        assert CacheConfig() == CacheConfig.from_profile(other)
        assert CostModel() == CostModel.from_profile(default)  # seek time is no MMU price
    slow = CostProfile.load(doubled(tmp_path, "llc_latency"))
    assert CacheConfig.from_profile(slow).llc.latency == 2 * CacheConfig().llc.latency


def test_a_sweep_carries_its_profile_to_every_point_and_row(tmp_path: Path) -> None:
    from eptlab.sweep import load_spec, run_point

    path = doubled(tmp_path, "vmexit_cycles")
    spec_file = tmp_path / "s.toml"
    spec_file.write_text(
        f'profile = "{path.name}"\n[[run]]\nexperiment = "nested-overhead"\n'
        '[run.set]\nworkloads = ["random"]\nfootprint_mib = 64\naccesses = 2000\ntrace = ""\n'
        'guest_pages = ["4k"]\nept_pages = ["4k"]\n'
    )
    spec = load_spec(spec_file)
    assert all(CostProfile.from_toml(p.profile).name == "double-vmexit_cycles" for p in spec.points)
    plain = tmp_path / "plain.toml"
    plain.write_text(spec_file.read_text().split("\n", 1)[1])
    assert load_spec(plain).points[0].point_id != spec.points[0].point_id  # no resume across
    result = run_point(spec.points[0])
    assert result.ok and {r["profile"] for r in result.rows} == {"double-vmexit_cycles"}
    spec_file.write_text(spec_file.read_text().replace(path.name, "missing.toml"))
    with pytest.raises(ConfigError, match="missing.toml"):
        load_spec(spec_file)


def test_docs_list_every_value_of_the_shipped_profile() -> None:
    text = (Path(__file__).parents[2] / "docs" / "costs.md").read_text()
    for key, value in CostProfile.default().values.items():
        assert f"| `{key}` | {value.value:g} | {value.unit} | {value.source.kind} |" in text


def test_bench_prices_with_the_profile_and_records_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "--accesses", "3000", "--workloads", "seq64", "--walker-sample", "20",
            "--json"]  # fmt: skip
    base = run_json(argv, capsys)
    slow = run_json([*argv, "--profile", str(doubled(tmp_path, "dram_latency"))], capsys)
    assert base["profile"]["name"] == "default" and slow["profile"]["name"] == "double-dram_latency"
    (b,), (s,) = base["results"], slow["results"]
    assert s["walks_per_access"] == b["walks_per_access"]
    assert s["cycles_per_access"] > b["cycles_per_access"]


def test_costs_table_shows_every_key_and_the_source_counts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["costs"]) == 0
    out = capsys.readouterr().out
    counts = CostProfile.default().sources()
    assert f"{counts['cited']} cited" in out and f"{counts['assumed']} assumed" in out
    assert all(key in out for key in CostProfile.default().values)
