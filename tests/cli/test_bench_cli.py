"""`eptlab bench` end to end at a tiny size (speed itself is never asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eptlab.cli import main


def test_bench_json_contract(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    trace = tmp_path / "t.lackey"
    trace.write_text(
        "".join(f" L {0x10000 + i * 64:x},8\n I  {0x400000 + i * 4:x},4\n" for i in range(500))
    )
    assert (
        main(
            [
                "bench",
                "--accesses",
                "2000",
                "--workloads",
                "seq64,seq4k",
                "--walker-sample",
                "50",
                "--trace",
                str(trace),
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    rows = {r["workload"]: r for r in report["results"]}
    assert set(rows) == {"seq64", "seq4k", "trace"}
    for r in rows.values():
        assert {
            "workload",
            "accesses",
            "seconds",
            "accesses_per_s",
            "walker_accesses_per_s",
            "ratio",
        } <= set(r)
        assert r["accesses"] > 0 and r["accesses_per_s"] > 0 and r["walker_accesses_per_s"] > 0
    assert rows["seq64"]["accesses"] == 2000 and rows["trace"]["accesses"] == 1000
    assert rows["seq4k"]["walks_per_access"] > 0.9  # a new page on every access
    assert rows["seq64"]["walks_per_access"] < 0.05  # 64 accesses per page
    assert report["startup_seconds"] > 0
    from eptlab import bench_limit

    if bench_limit.available():  # the C limit ran on the synthetic streams, not on the trace
        assert rows["seq64"]["c_fraction"] > 0 and rows["seq4k"]["c_fraction"] > 0
        assert rows["seq4k"]["c_accesses_per_s"] > 0
    assert rows["trace"]["c_fraction"] is None


def test_bench_rejects_unknown_workload(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--workloads", "seq64,nope"]) == 2
    assert "nope" in capsys.readouterr().err
