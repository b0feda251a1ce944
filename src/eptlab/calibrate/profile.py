"""Turn a calibration's samples into a cost profile: each measured value says ``measured``, the
method, the date, the host, its relative spread (interquartile range / median) and its sample count;
every other value is kept from the base profile."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..costs import CostProfile, CostValue, Source
from ..native import Clock, NativeResult, Samples
from .host import HostInfo
from .kvm import KvmResults
from .memory import MemoryResults
from .plan import GIB, MIB, Plan
from .plateaus import LEVELS, Plateau, plateaus, plateaus_by_size

METHOD = "eptlab calibrate"


@dataclass(frozen=True)
class Curve:
    """The pointer-chase curve the plateaus were read from, and its page size."""

    page: str
    points: tuple[NativeResult, ...]
    plateaus: tuple[Plateau, ...]
    method: str  # how the plateaus were found

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(r.footprint_bytes for r in self.points)

    def samples(self, plateau: Plateau) -> Samples:
        """Every repeat of every point of the plateau, pooled."""
        return Samples(tuple(v for i in plateau.indices for v in self.points[i].cycles.values))


def chosen_curve(memory: MemoryResults, caches: dict[str, int]) -> Curve | None:
    """The 2 MiB-page curve where the OS gave huge pages (fewer TLB misses blur the levels),
    else the 4 KiB one; its plateaus from the cache sizes (sysfs) where they are known and
    every level has points, else from a 4-step fit. None with fewer points than levels."""
    page = "2m" if memory.huge_pages.get("2m") else "4k"
    points = tuple(memory.curve.get(page, ()))
    if len(points) < len(LEVELS):
        return None
    curve = [(r.footprint_bytes, r.cycles_per_access) for r in points]
    if all(k in caches for k in ("l1d", "l2", "l3")):
        found = plateaus_by_size(curve, caches["l1d"], caches["l2"], caches["l3"])
        if found is not None:
            sizes = ", ".join(f"{k} {_size(caches[k])}" for k in ("l1d", "l2", "l3"))
            return Curve(page, points, tuple(found), f"footprints well inside each level "
                         f"(2 x the level below .. half its size; sysfs: {sizes})")
    return Curve(page, points, tuple(plateaus(curve)), "a 4-step least-squares fit of "
                 "log(latency) (cache sizes unknown or the curve too short for them)")


def _size(n: int) -> str:
    return f"{n / GIB:g} GiB" if n >= GIB else f"{n / MIB:g} MiB" if n >= MIB else f"{n >> 10} KiB"


class _Builder:
    def __init__(self, host: HostInfo, plan: Plan) -> None:
        self.host, self.plan = host, plan
        self.values: dict[str, CostValue] = {}

    def add(self, key: str, samples: Samples, unit: str, method: str, doc: str,
            value: float | None = None) -> None:
        quick = " (--quick: small sizes, not this host's figure)" if self.plan.quick_mode else ""
        source = Source("measured", f"{METHOD}: {method}{quick}", date=self.host.date,
                        host=self.host.label, spread=round(samples.relative_spread, 4),
                        samples=samples.count)
        number = samples.median if value is None else value
        if number < 0:  # a difference (walk penalty, fork slope) lost in the noise
            source = replace(source, ref=f"{source.ref}; the median difference was "
                             f"{number:.3g}, below zero within the noise: recorded as 0")
            number = 0.0
        self.values[key] = CostValue(round(number, 4), unit, source, doc)


def build_profile(base: CostProfile, host: HostInfo, plan: Plan, clock: Clock,
                  memory: MemoryResults, kvm: KvmResults | None,
                  name: str) -> tuple[CostProfile, tuple[str, ...]]:
    """``base`` with every value the calibration measured replaced, and those keys."""
    b = _Builder(host, plan)
    b.add("clock_ghz", Samples(clock.core_samples), "GHz",
          "core clock = TSC rate (against CLOCK_MONOTONIC_RAW) x core cycles per TSC tick "
          "(chains of dependent one-cycle register ADDs); samples are deciles of 300 chunks",
          "core clock during the measurement (turbo included) that converts cycles to time",
          value=clock.core_ghz)
    curve = chosen_curve(memory, host.caches)
    if curve is not None:
        docs = {"l1": "load-to-use latency of an L1D hit", "l2": "load-to-use latency of an L2 hit",
                "llc": "load-to-use latency of an LLC hit",
                "dram": "load-to-use latency of a line served by DRAM"}
        for plateau in curve.plateaus:
            lo, hi = plateau.footprints(curve.sizes)
            where = (f"the largest footprint, {_size(hi)}" if plateau.level == LEVELS[-1]
                     else f"median of footprints {_size(lo)}..{_size(hi)}")
            b.add(f"{plateau.level}_latency", curve.samples(plateau), "cycles",
                  f"pointer chase (random cycle, one load per 64-byte line) on {curve.page} "
                  f"pages; level = {curve.method}; {where}",
                  docs[plateau.level], value=plateau.latency)
    if memory.copy is not None:
        b.add("copy_bytes_per_cycle", memory.copy.bytes_per_cycle, "bytes/cycle",
              f"memcpy of {_size(memory.copy.bytes)} between two halves of a 2 MiB-page buffer "
              "in 4 MiB pieces (median piece per pass)",
              "memcpy / memset bandwidth of the hypervisor (page copies, zeroing)")
    penalty = memory.walk_penalty()
    if penalty:
        size, samples = penalty[-1]
        curve_text = ", ".join(f"{_size(s)}: {p.median:.0f}" for s, p in penalty)
        b.add("walk_penalty_4k_cycles", samples, "cycles",
              f"dependent random loads over {_size(size)} on 4 KiB pages minus the same on "
              f"2 MiB pages (by footprint: {curve_text})",
              "extra cycles per random access with 4 KiB instead of 2 MiB pages (TLB misses "
              "and page walks; on a VM the walks are two-dimensional)")
    if memory.stlb is not None:
        st = memory.stlb
        b.add("stlb_hit_cycles", st.stlb_hit, "cycles",
              f"pointer chase over {st.lines} lines on {st.lines} 4 KiB pages (one line per "
              f"page: L1 DTLB misses, STLB hits) minus the same lines on {st.lines // 64} "
              f"pages ({st.packed.median:.1f} and {st.spread_out.median:.1f} cycles; both L1 "
              "hits)", "L1 DTLB miss that hits the STLB")
    if memory.cpuid is not None:
        b.add("cpuid_exit_us", Samples(tuple(c / clock.core_ghz / 1e3
                                             for c in memory.cpuid.values)), "us",
              "CPUID executed by a process of this machine (an unconditional VM exit on a "
              "virtual machine, SDM Vol. 3C §26.1.2), median over chunks of 200",
              "round trip of one exit from this machine to the hypervisor below it")
    if kvm is not None:
        _kvm_values(b, kvm)
    description = (f"measured by {METHOD} on {host.label}, {host.date}; values it does not "
                   f"measure are {base.name!r}'s")
    profile = base.with_values(b.values, name=name).merge(
        CostProfile(name, {}, description=description))
    return profile, tuple(b.values)


def _kvm_values(b: _Builder, kvm: KvmResults) -> None:
    flavour = kvm.flavour
    if kvm.exit_us is not None:
        b.add("kvm_exit_us", kvm.exit_us, "us",
              f"pingpong guest on /dev/kvm ({flavour}): NOP hypercalls (out to port 0xe5), "
              "run time / exits, through eptlab's Python run loop",
              "exit round trip of eptlab's KVM backend (KVM_RUN return, decode, handler, "
              "re-entry); under kvm_pvm a PVM world switch, not a VMX transition")
    if kvm.wp_trap_us is not None:
        b.add("kvm_wp_trap_us", kvm.wp_trap_us, "us",
              f"write_set guest into a read-only memslot ({flavour}): run time / writes, each "
              "an MMIO exit the VMM performs", "one trapped write to a write-protected page, "
              "emulated by eptlab's KVM backend")
    if kvm.harvest_ns_per_page is not None:
        b.add("kvm_dirty_harvest_ns_per_page", kvm.harvest_ns_per_page, "ns",
              f"KVM_GET_DIRTY_LOG after rounds of write_set ({flavour}): harvest time / pages "
              "harvested", "collecting one dirty page from KVM's dirty bitmap (ioctl, "
              "re-protection and decoding)")
    per_gib = kvm.fork_ms_per_gib
    if per_gib is not None:
        sizes = ", ".join(f"{mib} MiB: {s.median:.2f} ms" for mib, s in sorted(kvm.fork_ms.items()))
        b.add("kvm_fork_ms_per_gib", per_gib, "ms",
              f"fork_once ({flavour}): new VM + memslots over a MAP_PRIVATE view of the "
              f"parent's memfd + vCPU, per clone; slope between the guest sizes ({sizes})",
              "copy-on-write fork of a KVM guest: extra time per GiB of guest memory (a fixed "
              "part comes on top: see the sizes in ref)")

