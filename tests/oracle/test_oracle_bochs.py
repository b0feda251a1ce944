"""The Bochs oracle end to end: the harness builds from source, runs one case, and a seeded run
of 2,000 random cases through the walker, the engine and Bochs has no disagreement outside the
pinned list, while every pinned departure is still observed (pinning Bochs's behaviour: if a
Bochs release fixes one, this fails and the list must shrink). Needs bochs + bochsbios
(.ci/run installs them)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from eptlab.arch.paging import Pte
from eptlab.cli import app
from eptlab.mmu.walker import ReferenceWalker, _GuestStep, _Walk
from eptlab.oracle.bochs import bochs_available, build_harness, missing, run_bochs
from eptlab.oracle.cases import build_case
from eptlab.oracle.compare import bochs_fields, differing, walker_fields
from eptlab.oracle.pinned import DEPARTURES
from eptlab.oracle.run import run_oracle

pytestmark = pytest.mark.skipif(
    not bochs_available(), reason=f"Bochs incomplete: {missing()} missing (.ci/run installs it)"
)

SEED = 2024


def test_harness_builds_from_source() -> None:
    harness = build_harness()
    assert len(harness.boot) == 512 and harness.boot[-2:] == b"\x55\xaa"
    assert 0 < len(harness.kernel) <= 64 * 512


def test_one_case_end_to_end() -> None:
    """A case that translates: Bochs ends it with VMCALL and sets the same A/D flags."""
    ok = next(i for i in range(200) if walker_fields(build_case(i, 1))["outcome"] == "ok")
    case = build_case(ok, 1)
    vmx, lines = run_bochs([case], timeout=120)
    assert int(str(vmx["ept_vpid_cap"]), 16) & (1 << 21)  # EPT A/D flags reported
    assert int(str(lines[ok]["reason"]), 16) == 18  # VMCALL: the access completed
    bochs = bochs_fields(case, lines[ok])
    walker = walker_fields(build_case(ok, 1))
    assert bochs["flags"]  # accessed flags were set (none is preset everywhere)
    assert set(differing(bochs, walker)) <= {"pml_log"}  # pinned: Bochs logs byte addresses


def test_guest_page_fault_taken_by_the_guest_handler() -> None:
    """A #PF is delivered through the nested guest's IDT; its handler reports error code and
    CR2 with VMCALL, and they are the walker's."""
    pf = next(  # a #PF without protection keys (where a pinned Bochs departure lives)
        i for i in range(200)
        if walker_fields(build_case(i, 1)).get("vector") == 14
        and not build_case(i, 1).guest.cr4 & (1 << 22)
    )  # fmt: skip
    case = build_case(pf, 1)
    _, lines = run_bochs([case], timeout=120)
    line = lines[pf]
    assert int(str(line["reason"]), 16) == 18  # VMCALL from the handler, not an exception exit
    assert int(str(line["pf_cr2"]), 16) == case.gva
    walker = walker_fields(build_case(pf, 1))
    assert int(str(line["pf_error"]), 16) == walker["error_code"]


def test_seeded_suite_has_no_disagreement_outside_the_pinned_list() -> None:
    report = run_oracle(2000, SEED)
    d = report.as_dict()
    assert report.engine_cases == 0, d["engine_examples"]
    assert report.unpinned_cases == 0, d["unpinned_examples"]
    assert set(report.pinned) >= {dep.key for dep in DEPARTURES}, report.pinned
    assert sum(report.outcomes.values()) == 2000 and len(report.outcomes) == 5
    order = report.order
    for key in ("final-violation", "guest-fault"):
        assert order[f"{key}: cases"] > 0
        assert order[f"{key}: same guest A/D"] == order[f"{key}: cases"]


class _NoDirtyFlag(ReferenceWalker):
    """A deliberately broken walker: never sets the guest leaf's dirty flag."""

    def _set_guest_flags(self, walk: _Walk, steps: list[_GuestStep]) -> None:
        for step in steps:
            step.value |= int(Pte.D)
        super()._set_guest_flags(walk, steps)


def test_the_oracle_catches_a_walker_defect() -> None:
    report = run_oracle(300, SEED, walker_class=_NoDirtyFlag)
    assert report.unpinned_cases > 0
    assert report.unpinned["flags"] > 0


def test_cli_json() -> None:
    result = CliRunner().invoke(app, ["oracle", "bochs", "--cases", "40", "--seed", "3", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["cases"] == 40 and out["unpinned_cases"] == 0
    assert out["features"]["advanced_ept_exit_info"] is False and out["features"]["mbec"] is False
