"""Issue 13, item 3: every parameter of every experiment is checked before anything runs, with
one message naming the parameter (these failed on main: tracebacks after compute, or accepted)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from eptlab.cli import main
from eptlab.errors import ConfigError
from eptlab.experiments.base import apply_overrides
from eptlab.experiments.registry import experiments

HUGE = str(1 << 64)


def bad_values(default: Any) -> list[str]:
    """Values no parameter of this type may take."""
    if isinstance(default, bool):
        return ["", "maybe"]
    if isinstance(default, int):
        return ["", "-1", HUGE, "8k", "1" * 5000]
    if isinstance(default, float):
        return ["", "nan", "inf", "-1", "x"]
    if isinstance(default, tuple):
        if default and isinstance(default[0], bool):
            return ["", "maybe"]
        if default and isinstance(default[0], int):
            return ["", "-1", HUGE, "8k", "1,,x"]
        if default and isinstance(default[0], float):
            return ["", "nan", "-1", "x"]
        return ["", "bogus-value", ","]
    return ["bogus-value", "/no/such/dir/x"]


CASES = [
    pytest.param(name, f.name, value, id=f"{name}.{f.name}={value[:12]!r}")
    for name, cls in experiments().items()
    for f in fields(cls.Params)
    for value in bad_values(getattr(cls.Params(), f.name))
]


@pytest.mark.parametrize(("experiment", "field", "value"), CASES)
def test_every_bad_value_is_a_config_error_naming_the_parameter(
    experiment: str, field: str, value: str
) -> None:
    params_type = experiments()[experiment].Params
    with pytest.raises(ConfigError) as info:
        apply_overrides(params_type, {field: value})
    assert field in str(info.value).split(":")[0], str(info.value)
    assert len(str(info.value)) < 300


@pytest.mark.parametrize("name", list(experiments()))
def test_defaults_and_demo_scale_pass_the_checks(name: str) -> None:
    cls = experiments()[name]
    apply_overrides(cls.Params, {})
    apply_overrides(cls.Params, dict(cls.demo))


CLI_CASES = [
    pytest.param(name, f.name, bad_values(getattr(cls.Params(), f.name))[0],
                 id=f"{name}.{f.name}")
    for name, cls in experiments().items()
    for f in fields(cls.Params)
]


@pytest.mark.parametrize(("experiment", "field", "value"), CLI_CASES)
def test_a_bad_parameter_on_the_command_line_exits_2_naming_it_and_writes_nothing(
    experiment: str, field: str, value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The contract of every registered experiment, through ``eptlab run``: a usage error (exit
    2), one line naming the parameter, and no output directory (the check runs first)."""
    out = tmp_path / "out"
    assert main(["run", experiment, "--set", f"{field}={value}", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert field in err and len(err.splitlines()) == 1, err
    assert not out.exists()


# checks of meaning, beyond the type of a value, that the contract test above cannot derive
# from the defaults (they were copied per experiment as test_bad_parameters before)
MEANING = [
    ("trap-debugger", "fractions", "1.5", "fractions"),
    ("trap-debugger", "periods", "0", "periods"),
    ("trap-debugger", "mode", "read", "mode"),
    ("trap-debugger", "resume", "pray", "resume"),
    ("trap-debugger", "compare", "write", "compare"),
    ("trap-debugger", "batch", "0", "batch"),
    ("trap-debugger", "vcpus", "9", "vcpus"),
    ("trap-debugger", "bug_values", "nil:1", "bug_values"),
    ("trap-debugger", "bug_values", "null:0", "bug_values"),
    ("trap-debugger", "bug_field0", "1.5", "bug_field0"),
    ("aslr-side-channel", "policies", "linear,random-1g", "policies"),
    ("aslr-side-channel", "llc_sets", "1000", "llc_sets"),
    ("aslr-side-channel", "channels", "tlb", "channels"),
    ("aslr-side-channel", "noise", "1.5", "noise"),
    ("aslr-side-channel", "trials", "0", "trials"),
    ("aslr-side-channel", "secret_bits", "0", "secret_bits"),
    ("aslr-side-channel", "secret_bits", "17", "secret_bits"),
    ("aslr-side-channel", "footprint_mib", "3", "footprint_mib"),
    ("aslr-side-channel", "guest_page", "1g", "guest_page"),
    ("aslr-side-channel", "workload", "nope", "workload"),
    ("tsx-aborts", "scenarios", "lazy,bogus", "scenarios"),
    ("tsx-aborts", "conflict_vcpus", "1", "conflict_vcpus"),
    ("tsx-aborts", "sections", "0", "sections"),  # named with its three siblings
    ("memory-encryption", "decrypt_latency", "0", "decrypt_latency"),  # 'on' would be 'off'
    ("memory-encryption", "keyid_bits", "8", "host_memory"),  # 38 address bits: < host_gib
    ("memory-encryption", "key_id", "64", "key_id"),  # does not fit in 6 key-ID bits
    ("memory-encryption", "footprint_mib", "3", "footprint_mib"),
    ("memory-encryption", "guest_page", "1g", "guest_page"),
    ("memory-encryption", "workloads", "nope", "workloads"),
    ("memory-encryption", "presets", "sgx", "presets"),
    ("memory-encryption", "integrity_latency", "0", "integrity_latency"),  # tdx checks MACs
    ("memory-encryption", "rmp_cache_entries", "6", "rmp_cache_entries"),  # not whole 4-way sets
    ("double-caching", "host_caches", "lukewarm", "host_caches"),
    ("double-caching", "disks", "tape", "disks"),
    ("double-caching", "file_mib", "999", "guest_mib"),  # the guest cannot hold the file
    ("double-caching", "ept_page", "1g", "ept_page"),
    ("integrity-monitor", "modes", "bogus", "modes"),
    ("aslr-side-channel", "targets", "1g", "targets"),
    ("aslr-side-channel", "attackers", "spy", "attackers"),
    ("aslr-side-channel", "slice_hashes", "maurice-3", "slice_hashes"),
    ("aslr-side-channel", "pp_trials", "101", "pp_trials"),  # more than trials
    ("aslr-side-channel", "rerandomize_ms", "5000", "rerandomize_ms"),
    ("memory-encryption", "llc_mib", "3", "llc_mib"),
]


@pytest.mark.parametrize(("experiment", "parameter", "value", "named"), MEANING)
def test_values_of_the_right_type_but_no_meaning_are_refused_by_name(
    experiment: str, parameter: str, value: str, named: str
) -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(experiments()[experiment].Params, {parameter: value})
    assert named in info.value.field.split("/"), info.value


def test_list_parameters_parse_as_tuples() -> None:
    params = apply_overrides(experiments()["trap-debugger"].Params,
                             {"fractions": "0.1,0.2", "periods": "100"})
    assert params.fractions == (0.1, 0.2) and params.periods == (100,)


@pytest.mark.parametrize(
    ("experiment", "overrides", "field"),
    [
        ("nested-overhead", {"footprint_mib": "3"}, "footprint_mib"),  # was a guest fault
        ("nested-overhead", {"guest_pages": "8k"}, "guest_pages"),
        ("nested-overhead", {"trace": "/no/such/trace.lackey"}, "trace"),
        ("prefetch-hypercall", {"vcpus": ""}, "vcpus"),
        ("prefetch-hypercall", {"policies": "maybe"}, "policies"),
        ("prefetch-hypercall", {"backing": "tape"}, "backing"),
        ("prefetch-hypercall", {"remaps": "-1"}, "remaps"),
        ("prefetch-hypercall", {"accesses": str(1 << 64)}, "accesses"),
        ("cow-fork", {"write_fraction": "2"}, "write_fraction"),  # was a numpy ValueError
        ("nested-overhead", {"seed": "-1"}, "seed"),
    ],
)
def test_the_reported_bad_values_are_refused_by_name(
    experiment: str, overrides: dict[str, str], field: str
) -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides(experiments()[experiment].Params, overrides)
    assert info.value.field == field


def test_a_directory_as_trace_is_refused(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="is a directory") as info:
        apply_overrides(experiments()["nested-overhead"].Params, {"trace": str(tmp_path)})
    assert info.value.field == "trace"


def test_a_footprint_whose_page_tables_cannot_fit_is_refused_with_the_estimate() -> None:
    params = experiments()["prefetch-hypercall"].Params
    with pytest.raises(ConfigError, match=r"needs about 2,052\.0 MiB of guest page tables") as info:
        apply_overrides(params, {"footprint_mib": str(1 << 20)})  # 1 TiB
    assert info.value.field == "footprint_mib" and "at most about" in str(info.value)
    apply_overrides(params, {"footprint_mib": "1000"})  # measured to run


def test_a_kvm_watchdog_timeout_must_be_finite_and_positive() -> None:
    from eptlab.kvm.backend import Watchdog

    for bad in (float("inf"), 0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="timeout"):
            Watchdog(None, bad)  # type: ignore[arg-type]
    assert Watchdog(None, 0.5).seconds == 0.5  # type: ignore[arg-type]


def test_nested_overhead_refuses_guest_tables_beyond_its_table_region() -> None:
    params = experiments()["nested-overhead"].Params
    with pytest.raises(ConfigError, match=r"needs about 2,052 MiB of guest page tables") as info:
        apply_overrides(params, {"footprint_mib": str(1 << 20), "trace": ""})  # 1 TiB
    assert info.value.field == "footprint_mib"


def test_cow_fork_refuses_a_guest_beyond_the_model_host() -> None:
    with pytest.raises(ConfigError, match="at most 524,288 MiB") as info:
        apply_overrides(experiments()["cow-fork"].Params, {"guest_mibs": str(1 << 20)})
    assert info.value.field == "guest_mibs"


def test_table_memory_estimate_counts_every_level() -> None:
    from eptlab.experiments.base import table_bytes

    assert table_bytes(1 << 30) == (512 + 1 + 1 + 1) * 4096  # PTs, a PD, a PDPT, the PML4
    assert table_bytes(1 << 30, 2 << 20) == 3 * 4096
