"""Run every engine benchmark and store the JSON report under benchmarks/results/."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent


def main() -> int:
    accesses = sys.argv[1] if len(sys.argv) > 1 else "4000000"
    trace = HERE / "results" / "ls.lackey"
    trace.parent.mkdir(exist_ok=True)
    if not trace.exists():
        subprocess.run(
            ["valgrind", "--tool=lackey", "--trace-mem=yes", f"--log-file={trace}", "ls", "/"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "eptlab.cli",
            "bench",
            "--accesses",
            accesses,
            "--trace",
            str(trace),
            "--json",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    report = json.loads(out)
    path = HERE / "results" / f"{time.strftime('%Y-%m-%d')}.json"
    path.write_text(json.dumps(report, indent=2))
    for r in report["results"]:
        print(
            f"{r['workload']:>7}: {r['accesses_per_s']:>12,.0f} acc/s  "
            f"walker {r['walker_accesses_per_s']:>7,.0f} acc/s  ratio {r['ratio']:,.0f}x"
        )
    print(f"startup {report['startup_seconds']} s -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
