"""``eptlab calibrate``: measure this host and write a cost profile whose values say
``measured`` (date, host, spread, samples).

* memory (:mod:`.memory`, with the native helper :mod:`eptlab.native`): load-to-use latency of
  L1, L2, LLC and DRAM from a pointer-chase curve (:mod:`.plateaus`), the extra cost per random
  access of 4 KiB against 2 MiB pages over 1 GiB and more, memcpy bandwidth, and the CPUID round
  trip to the hypervisor below this machine;
* KVM (:mod:`.kvm`, where /dev/kvm opens): exit round trip, write-protect trap, dirty-log
  harvest per page and fork per GiB, through eptlab's KVM backend.

Values it does not measure are kept from the base profile (:mod:`.profile`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import native
from ..costs import CostProfile
from ..errors import KvmUnavailable
from .host import HostInfo, host_info
from .kvm import KvmCalibration, KvmResults
from .memory import MemoryCalibration, MemoryResults
from .plan import Plan
from .profile import Curve, build_profile, chosen_curve

__all__ = ["Calibration", "HostInfo", "Plan", "calibrate", "host_info", "kvm_available"]

Progress = Callable[[str, int], None]
"""Called after every step with its label and the total number of steps."""


@dataclass
class Calibration:
    host: HostInfo
    plan: Plan
    clock: native.Clock
    memory: MemoryResults
    kvm: KvmResults | None
    kvm_skipped: str | None
    profile: CostProfile
    measured: tuple[str, ...]  # the profile's keys this run measured
    seconds: float
    steps: tuple[tuple[str, float], ...] = ()  # each step's label and its seconds
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average at the start and the end

    @property
    def curve(self) -> Curve | None:
        return chosen_curve(self.memory, self.host.caches)

    def raw(self) -> dict[str, Any]:
        """Every sample, for the JSON file beside the profile."""
        def samples(s: native.Samples | None) -> list[float] | None:
            return None if s is None else [round(v, 4) for v in s.values]

        m, k = self.memory, self.kvm
        return {
            "host": self.host.as_dict(),
            "seconds": round(self.seconds, 1),
            "load_average": list(self.load),
            "quick": self.plan.quick_mode,
            "clock": {"tsc_ghz": self.clock.tsc_ghz, "core_ghz": self.clock.core_ghz},
            "huge_pages": m.huge_pages,
            "curve": {page: [r.as_row() | {"cycles": samples(r.cycles)} for r in points]
                      for page, points in m.curve.items()},
            "walk": [r.as_row() | {"cycles": samples(r.cycles)} for r in m.walk],
            "walk_penalty_cycles": {str(size): samples(s) for size, s in m.walk_penalty()},
            "copy_bytes_per_cycle": samples(m.copy.bytes_per_cycle) if m.copy else None,
            "cpuid_cycles": samples(m.cpuid),
            "stlb": None if m.stlb is None else {
                "lines": m.stlb.lines, "packed_cycles": samples(m.stlb.packed),
                "one_line_per_page_cycles": samples(m.stlb.spread_out)},
            "kvm": None if k is None else {
                "flavour": k.flavour, "exit_us": samples(k.exit_us),
                "wp_trap_us": samples(k.wp_trap_us),
                "harvest_ns_per_page": samples(k.harvest_ns_per_page),
                "fork_ms": {str(mib): samples(s) for mib, s in k.fork_ms.items()},
            },
            "kvm_skipped": self.kvm_skipped,
            "skipped": m.skipped,
            "steps": [[label, round(sec, 3)] for label, sec in self.steps],
        }


def kvm_available() -> str | None:
    """None if /dev/kvm opens, else why not."""
    from ..kvm.fds import Kvm

    try:
        Kvm.open().close()
    except KvmUnavailable as exc:
        return str(exc)
    return None


def calibrate(plan: Plan, base: CostProfile, name: str,
              progress: Progress | None = None) -> Calibration:
    """Run ``plan`` and build the profile (``base``'s values where nothing was measured)."""
    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    native.load()  # a missing compiler fails here, before anything is measured
    host = host_info()
    clock = native.clock()
    mem = MemoryCalibration(plan)
    why_not = kvm_available() if plan.kvm else "not asked (--no-kvm)"
    kvm = KvmCalibration(plan) if why_not is None else None
    total = mem.steps() + (kvm.steps() if kvm is not None else 0)
    steps: list[tuple[str, float]] = []
    last = time.perf_counter()

    def done(label: str) -> None:
        nonlocal last
        now = time.perf_counter()
        steps.append((label, now - last))
        last = now
        if progress is not None:
            progress(label, total)

    for label in mem.run():
        done(label)
    if kvm is not None:
        with native.pinned():
            for label in kvm.run():
                done(label)
    kvm_results = kvm.results if kvm is not None else None
    profile, measured = build_profile(base, host, plan, clock, mem.results, kvm_results, name)
    return Calibration(host, plan, clock, mem.results, kvm_results, why_not, profile, measured,
                       time.perf_counter() - start, tuple(steps), (load_before, os.getloadavg()[0]))
