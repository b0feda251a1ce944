"""Issue 13, item 3: every parameter of every experiment is checked before anything runs, with
one message naming the parameter (these failed on main: tracebacks after compute, or accepted)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import pytest

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
