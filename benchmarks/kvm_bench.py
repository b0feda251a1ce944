"""KVM benchmarks: VM exits per second a Python host loop sustains, fork time against guest
size, dirty-log harvest rate (pages per second). Needs /dev/kvm.

    PYTHONPATH=src .venv/bin/python benchmarks/kvm_bench.py [--json]

Writes benchmarks/results/kvm-<date>.json; every figure carries the KVM flavour (module, TDP).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from eptlab.kvm.apps.common import WritePattern
from eptlab.kvm.apps.dirty_log import run_mode
from eptlab.kvm.apps.fork import fork_once
from eptlab.kvm.backend import KvmGuest, flavour
from eptlab.kvm.fds import Kvm
from eptlab.kvm.memory import GuestMemory

HERE = Path(__file__).parent


def exits_per_second(kvm: Kvm, exits: int = 50_000) -> dict[str, object]:
    """The ``pingpong`` guest issues back-to-back NOP hypercalls: each is an exit to this
    process (KVM_RUN returns, the registers are read, the record built and dispatched)."""
    rates = []
    for _ in range(3):
        with KvmGuest(kvm, GuestMemory(4 << 20), "pingpong") as guest:
            guest.start(r8=exits)
            result = guest.run(timeout=120)
            rates.append(result.total_exits / result.seconds)
    raw = []
    for _ in range(3):  # KVM_RUN and the kvm_run decode only: no registers, no record
        with KvmGuest(kvm, GuestMemory(4 << 20), "pingpong") as guest:
            guest.start(r8=exits)
            start = time.perf_counter()
            for _ in range(exits):
                guest.vcpu.run()
            raw.append(exits / (time.perf_counter() - start))
    return {"exits": exits, "exits_per_s": round(statistics.median(rates)),
            "us_per_exit": round(1e6 / statistics.median(rates), 2),
            "raw_kvm_run_exits_per_s": round(statistics.median(raw)),
            "raw_us_per_exit": round(1e6 / statistics.median(raw), 2)}


def fork_times(kvm: Kvm, sizes_mib: tuple[int, ...] = (256, 1024, 4096)) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for mib in sizes_mib:
        o = fork_once(kvm, mib << 20, clones=4, pages=16, seed=0)
        out.append({"guest_mib": mib, "fork_ms_median": round(1e3 * statistics.median(
            o.fork_seconds), 3), "fork_ms_max": round(1e3 * max(o.fork_seconds), 3),
            "isolated": o.isolated})
    return out


def harvest_rates(kvm: Kvm, pages: int = 8192) -> list[dict[str, object]]:
    memory = 128 << 20
    pattern = WritePattern.random(memory, pages, 0)
    out: list[dict[str, object]] = []
    for mode in ("log", "ring"):
        o = run_mode(kvm, mode, pattern, memory, rounds=3, ring_entries=32768)
        out.append({"mode": mode, "pages_per_round": pages, "exact": o.exact,
                    "harvest_pages_per_s": round(o.harvested_pages / o.harvest_seconds),
                    "us_per_write": round(1e6 * o.run_seconds / o.writes, 3)})
    return out


def main() -> int:
    with Kvm.open() as kvm:
        start = time.perf_counter()
        report = {
            **flavour().as_dict(),
            "flavour": flavour().label,
            "exit_loop": exits_per_second(kvm),
            "fork": fork_times(kvm),
            "dirty_log_harvest": harvest_rates(kvm),
        }
        report["seconds"] = round(time.perf_counter() - start, 1)
    if "--json" in sys.argv:
        print(json.dumps(report))
        return 0
    path = HERE / "results" / f"kvm-{time.strftime('%Y-%m-%d')}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
