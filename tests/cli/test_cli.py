"""The `eptlab` command, in-process through main(argv)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eptlab.cli import main


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    assert main(["walk", *args, "--json"]) == 0
    out: dict[str, object] = json.loads(capsys.readouterr().out)
    return out


def test_walk_json_contract(capsys: pytest.CaptureFixture[str]) -> None:
    out = run_json(capsys)
    assert out["count"] == 24
    refs = out["references"]
    assert isinstance(refs, list) and len(refs) == 24
    assert {r["dim"] for r in refs} == {"guest", "ept"}
    assert all({"dim", "level", "address"} <= set(r) for r in refs)
    assert isinstance(out["hpa"], int)
    assert out["exit"] is None and out["guest_fault"] is None


def test_walk_json_five_levels_and_large_pages(capsys: pytest.CaptureFixture[str]) -> None:
    out = run_json(capsys, "--guest-levels", "5", "--ept-levels", "5")
    assert out["count"] == 35
    out = run_json(capsys, "--guest-page", "1g", "--ept-page", "2m")
    assert out["count"] == 2 * (3 + 1) + 3  # the 2 MiB EPT pages back the page tables too
    out = run_json(capsys, "--guest-page", "1g", "--ept-page", "2m", "--table-ept-page", "4k")
    assert out["count"] == 2 * 5 + 3


def test_walk_json_ept_violation(capsys: pytest.CaptureFixture[str]) -> None:
    out = run_json(capsys, "--access", "write", "--ept-perms", "r-x")
    exit_ = out["exit"]
    assert isinstance(exit_, dict)
    assert exit_["reason"] == 48
    # write (bit 1), readable (3), executable (5), GLA valid (7), final translation (8),
    # linear address writable (10)
    assert exit_["qualification"] == (1 << 1) | (1 << 3) | (1 << 5) | (1 << 7) | (1 << 8) | (
        1 << 10
    )
    assert out["hpa"] is None


def test_walk_json_table_perms_and_ept_ad(capsys: pytest.CaptureFixture[str]) -> None:
    out = run_json(capsys, "--table-perms", "r-x", "--ept-ad")
    exit_ = out["exit"]
    assert isinstance(exit_, dict) and exit_["reason"] == 48
    # treated as a write: bits 0 and 1; readable+executable; GLA valid; bit 8 clear
    assert exit_["qualification"] == 0b1 | 0b10 | (1 << 3) | (1 << 5) | (1 << 7)
    assert out["count"] == 4  # stopped after translating the first guest entry's GPA


def test_walk_json_misconfiguration(capsys: pytest.CaptureFixture[str]) -> None:
    out = run_json(capsys, "--ept-perms", "-w-")
    exit_ = out["exit"]
    assert isinstance(exit_, dict) and exit_["reason"] == 49


def test_walk_human_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["walk", "--access", "fetch", "--ept-perms", "rw-"]) == 0
    text = capsys.readouterr().out
    assert "EPT_VIOLATION" in text and "24 memory references" in text


@pytest.mark.parametrize(
    "args",
    [
        ["walk", "--guest-levels", "3"],
        ["walk", "--ept-perms", "rwz"],
        ["walk", "--guest-page", "4m"],
        ["walk", "--access", "jump"],
        ["walk", "--gva", "zzz"],
        ["walk", "--no-such-option"],
        ["no-such-command"],
    ],
)
def test_bad_arguments_give_one_line_and_status_2(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "error" in err


def test_demo_writes_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path), "--no-experiments", "--no-kvm"]) == 0
    data = json.loads((tmp_path / "walks.json").read_text())
    counts = {
        (r["guest_levels"], r["ept_levels"], r["guest_page"], r["ept_page"]): r["references"]
        for r in data["walk_costs"]
    }
    assert counts[(4, 4, "4k", "4k")] == 24 and counts[(5, 5, "4k", "4k")] == 35
    reasons = [e["outcome"].get("reason") for e in data["events"] if e["outcome"]]
    assert 48 in reasons and 49 in reasons
    assert (tmp_path / "walks.csv").read_text().startswith("guest_levels,")
