"""memory-encryption: what does memory encryption cost per access under native and nested
paging, and where does the cost land?

The memory controller decrypts every line read from DRAM (Intel TME/TME-MK, AMD SME/SEV); cache
hits are plaintext (:mod:`eptlab.apps.memory_encryption`). Each workload's stream runs through
the fast engine natively and nested (guest paging under EPT), on machines with several LLC
sizes, without encryption and under each confidential-VM preset (``mktme``: a decryption per
DRAM line of every class; ``sev-snp``: guest page tables and data decrypted, nested tables in
the clear, an RMP check on each host-physical access of a nested walk; ``tdx``: every class
decrypted and MAC-checked, EPT included: the secure EPT; the walk format is EPT's in all three,
and the nested VM's EPT leaves carry its TME-MK key ID). Native rows apply the preset's
page-table and data classes without a VM (no EPT, no RMP check). Every run builds a fresh
address space, starts with cold TLBs and caches, runs ``warmup`` accesses of the stream
unmeasured and measures the next ``accesses``. ``slowdown_pct`` compares the encrypted run with
the plain run of the same mode, workload and LLC; the extra cycles split into translation
(page-walk reads served by DRAM) and data (data lines served by DRAM). The experiment checks,
for every pair, that the extra cycles are exactly what the protection pass priced (decryptions,
MACs, RMP lookups) and that it classified every DRAM line once.

Columns:

| column | meaning |
|---|---|
| workload, footprint_mib | the stream (random runs over several footprints) |
| llc_mib | LLC size of the machine |
| mode | `native` (guest paging only) or `nested` (under EPT) |
| encryption | `off`, or the preset: `mktme`, `sev-snp`, `tdx` |
| key_id | TME-MK key ID in the EPT leaves (0: none, or native under the TME key) |
| accesses, walks | accesses run, page walks (TLB misses) |
| tlb_miss_rate | walks / accesses |
| walk_refs | page-walk memory references (guest + EPT) |
| walk_refs_dram, data_refs_dram | references DRAM served (the lines decrypted when on) |
| walk_dram_per_access, data_dram_per_access | the same per access |
| translation_cycles_per_access | TLB lookups and walks, cycles per access |
| data_cycles_per_access | the data accesses, cycles per access |
| cycles_per_access | translation + data |
| extra_translation_cycles_per_access | on minus off, translation cycles per access (0 when off) |
| extra_data_cycles_per_access | on minus off, data cycles per access (0 when off) |
| walk_share_pct | share of the extra cycles due to page-walk reads (empty when off) |
| slowdown_pct | cycles on / cycles off - 1 for the same mode, workload and LLC, in % (0 when off) |
| translation_slowdown_pct | the same for translation cycles alone |
| walk_dram_vs_native | walk_refs_dram / native's for the same workload, LLC and encryption |
| ept_lines_dram_per_access | EPT reads DRAM served, per access (0 native) |
| decrypted_per_access, macs_per_access | lines decrypted, MACs checked, per access |
| rmp_checks_per_access, rmp_lookups_per_access | RMP checks, RMP-cache misses (entries read) |
| extra_rmp_cycles_per_access | cycles of RMP lookups per access (part of the translation extra) |
| extra_cycles_per_access | translation + data extra cycles per access |
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import pandas as pd
from matplotlib.figure import Figure

from ..apps.memory_encryption import (
    MODES,
    Comparison,
    Platform,
    build_space,
    dram_lines,
    run_measured,
)
from ..arch.bits import PageSize
from ..costs import active_profile
from ..errors import ConfigError
from ..memory.layout import check_layout, in_layout
from ..mmu.config import PRESETS, CacheConfig, EncryptionConfig, Protection, RmpConfig
from ..mmu.protection import ProtectionStats
from ..mmu.scenario import NestedSpace
from ..mmu.stats import VcpuStats
from ..traces.model import TraceChunk
from ..workloads import WORKLOADS, make_workload
from .base import Progress, Row
from .intervals import (
    OVERLAP,
    Interval,
    at,
    by_seed,
    interval,
    pick,
    ratio,
    relation,
    seeds_of,
    summarize,
    times,
    yerr,
)

BASE = 0x0000_2000_0000_0000
NOTHING = ProtectionStats((0, 0, 0, 0), 0, 0, 0, 0, 0, 0, 0)  # the counters of an "off" run


@dataclass(frozen=True)
class MemoryEncryptionParams:
    def validate(self) -> None:
        """See :meth:`MemoryEncryption.check` (before anything runs)."""
        MemoryEncryption().check(self)

    workloads: tuple[str, ...] = ("sequential", "zipf", "pointer-chase", "random")
    footprint_mib: int = 256  # every workload but random
    random_footprints_mib: tuple[int, ...] = (64, 1024, 8192)  # random over growing footprints
    accesses: int = 100_000  # measured accesses per run
    warmup: int = 100_000  # accesses run first, unmeasured (0: every run starts cold)
    llc_mib: tuple[int, ...] = (2, 8, 32)
    # cycles per DRAM line (AES rounds + key lookup at core clock); default: the cost profile's
    decrypt_latency: int = field(default_factory=lambda: active_profile().cycles("decrypt_latency"))
    # MAC check per DRAM line of a class that carries one (the tdx preset's private lines)
    integrity_latency: int = field(
        default_factory=lambda: active_profile().cycles("integrity_latency")
    )
    presets: tuple[str, ...] = PRESETS  # confidential-VM presets measured against "off"
    rmp_lookup_cycles: int = field(
        default_factory=lambda: active_profile().cycles("rmp_lookup_cycles")
    )
    rmp_cache_entries: int = field(
        default_factory=lambda: active_profile().cycles("rmp_cache_entries")
    )
    rmp_cache_ways: int = field(default_factory=lambda: active_profile().cycles("rmp_cache_ways"))
    keyid_bits: int = 6  # TME-MK key-ID bits of the encrypted machine
    key_id: int = 1  # the nested VM's key ID
    host_gib: int = 1024  # host memory (must fit below the key-ID bits)
    guest_page: str = "4k"
    ept_page: str = "4k"
    seeds: int = 5
    seed: int = 0
    layout: str = "aged"  # memory layout: aged or contiguous (docs/layouts.md)

    def __post_init__(self) -> None:
        check_layout(self.layout)


@dataclass(frozen=True)
class Source:
    """A named stream that can be replayed."""

    workload: str
    footprint_mib: int
    chunks: list[TraceChunk]

    @property
    def length(self) -> int:
        return self.footprint_mib << 20


class MemoryEncryption:
    name: ClassVar[str] = "memory-encryption"
    question: ClassVar[str] = (
        "What does memory encryption (a decryption per DRAM line) cost per access under native "
        "and nested paging, and how much of it do two-dimensional walks add?"
    )
    Params: ClassVar[type] = MemoryEncryptionParams
    demo: ClassVar[dict[str, str]] = {
        "accesses": "4000",  # four runs per mode (off and three presets): as fast as two were
        "warmup": "4000",
        "llc_mib": "2,32",
        "random_footprints_mib": "64,2048",
        "seeds": "3",
    }
    keys: ClassVar[tuple[str, ...]] = (
        "workload", "footprint_mib", "llc_mib", "mode", "encryption", "key_id"
    )

    # -- configuration ------------------------------------------------------------------------

    def check(self, p: MemoryEncryptionParams) -> None:
        """Refuse impossible parameter combinations before anything runs."""
        if p.decrypt_latency <= 0:
            raise ConfigError("decrypt_latency", "must be > 0: 'on' would equal 'off'")
        self._check_presets(p)
        if p.accesses <= 0:
            raise ConfigError("accesses", "must be > 0")
        if p.warmup < 0:
            raise ConfigError("warmup", "must be >= 0")
        if not p.workloads or not p.llc_mib:
            raise ConfigError("workloads/llc_mib", "need at least one of each")
        for name in p.workloads:
            if name not in WORKLOADS:
                raise ConfigError("workloads", f"unknown workload {name!r}")
        footprints = [p.footprint_mib, *p.random_footprints_mib]
        if "random" in p.workloads and not p.random_footprints_mib:
            raise ConfigError("random_footprints_mib", "random needs at least one footprint")
        if min(footprints) < 2 or any(f % 2 for f in footprints):
            raise ConfigError("footprint_mib", "footprints are whole 2 MiB regions (>= 2 MiB)")
        if max(footprints) > p.host_gib << 10:
            raise ConfigError("footprint_mib", f"a footprint exceeds host memory {p.host_gib} GiB")
        for name in ("guest_page", "ept_page"):
            if getattr(p, name) not in ("4k", "2m"):
                raise ConfigError(name, f"{getattr(p, name)!r} is not 4k or 2m")
        for llc in p.llc_mib:
            if llc < 1 or llc & (llc - 1):  # the LLC model needs 2^k sets of LLC_WAYS ways
                raise ConfigError("llc_mib", f"{llc} is not a power of two >= 1 (MiB)")
            on = self.platform(p, llc, p.presets[0])
            on.features().check_host_memory(p.host_gib << 30)
            on.features().keyids.check_key(p.key_id)
            self.platform(p, llc, None)

    def _check_presets(self, p: MemoryEncryptionParams) -> None:
        if not p.presets or len(set(p.presets)) != len(p.presets):
            raise ConfigError("presets", "name each preset once, at least one")
        for name in p.presets:
            if name not in PRESETS:
                raise ConfigError("presets", f"{name!r} is not one of {', '.join(PRESETS)}")
        if "tdx" in p.presets and p.integrity_latency <= 0:
            raise ConfigError("integrity_latency", "tdx checks a MAC per line: must be > 0")
        if p.integrity_latency < 0 or p.rmp_lookup_cycles < 0:
            raise ConfigError("integrity_latency/rmp_lookup_cycles", "must be >= 0 cycles")
        self.rmp(p)

    def rmp(self, p: MemoryEncryptionParams) -> RmpConfig:
        """The sev-snp preset's RMP check: its cache shape and lookup latency."""
        ways = p.rmp_cache_ways
        entries = p.rmp_cache_entries
        if entries < 0 or ways < 1 or (entries and entries % ways):
            raise ConfigError("rmp_cache_entries", f"{p.rmp_cache_entries} entries are not "
                              f"whole sets of {ways} ways")
        return RmpConfig(p.rmp_cache_entries // ways, ways, p.rmp_lookup_cycles)

    def platform(self, p: MemoryEncryptionParams, llc_mib: int, preset: str | None) -> Platform:
        """The machine without encryption (``preset`` None) or under a confidential preset."""
        if preset is None:
            return Platform(llc_mib)
        protection = Protection.preset(preset, self.rmp(p))
        mac = p.integrity_latency if protection.mac else 0
        return Platform(
            llc_mib,
            EncryptionConfig(p.decrypt_latency, mac, protection),
            keyid_bits=p.keyid_bits,
        )

    def sources(self, p: MemoryEncryptionParams) -> Iterator[Source]:
        for name in p.workloads:
            footprints = p.random_footprints_mib if name == "random" else (p.footprint_mib,)
            for mib in footprints:
                workload = make_workload(name, footprint=mib << 20, seed=p.seed)
                chunks = list(workload.stream(BASE, p.warmup + p.accesses))
                yield Source(name, mib, chunks)

    # -- running ------------------------------------------------------------------------------

    def measure(
        self,
        p: MemoryEncryptionParams,
        source: Source,
        mode: str,
        platform: Platform,
        key: int,
        built: dict[tuple[object, ...], NestedSpace] | None = None,
    ) -> tuple[VcpuStats, ProtectionStats]:
        """Run ``source`` on ``platform``. The address space depends on the mode, the key ID
        and the platform's features (not its caches or encryption), so it is built once per
        those in ``built`` and each run gets a fresh copy of its memory (walks set A/D bits)."""
        shape = (mode, key, platform.features())
        space = (built or {}).get(shape)
        if space is None:
            space = build_space(
                mode,
                platform,
                BASE,
                source.length,
                host_memory=p.host_gib << 30,
                key_id=key,
                guest_page=PageSize.parse(p.guest_page),
                ept_page=PageSize.parse(p.ept_page),
                seed=p.seed,  # the aged layout's placement
            )
            if built is not None:
                built[shape] = space
        run = dataclasses.replace(space, memory=copy.deepcopy(space.memory))
        return run_measured(run, platform, source.chunks, warmup=p.warmup)

    def rows(self, params: MemoryEncryptionParams, progress: Progress) -> Iterator[Row]:
        # every guest built while the rows are computed gets this layout
        yield from in_layout(params.layout, self._layout_rows(params, progress))

    def _layout_rows(self, params: MemoryEncryptionParams, progress: Progress) -> Iterator[Row]:
        p = params
        self.check(p)
        sources = list(self.sources(p))
        total, done = len(sources) * len(p.llc_mib) * (1 + len(p.presets)) * len(MODES), 0
        progress(0, total)
        for source in sources:
            built: dict[tuple[object, ...], NestedSpace] = {}  # this source's address spaces
            for llc in p.llc_mib:
                off = self.platform(p, llc, None)
                native_dram: dict[str, int] = {}
                for mode in MODES:
                    key = p.key_id if mode == "nested" else 0
                    plain, _ = self.measure(p, source, mode, off, 0, built)
                    runs: list[tuple[str, VcpuStats, int, Comparison | None]] = [
                        ("off", plain, 0, None)
                    ]
                    for preset in p.presets:
                        on = self.platform(p, llc, preset)
                        encrypted, passed = self.measure(p, source, mode, on, key, built)
                        pair = Comparison(plain, encrypted, on.encryption, passed)
                        pair.check()
                        runs.append((preset, encrypted, key, pair))
                    for label, stats, k, pair_ in runs:
                        walk_dram = dram_lines(stats)[0]
                        if mode == "native":
                            native_dram[label] = walk_dram
                        base = native_dram.get(label, 0)
                        vs_native = walk_dram / base if base else None
                        yield _row(source, llc, mode, label, k, stats, pair_, vs_native)
                        done += 1
                        progress(done, total)

    # -- figures ------------------------------------------------------------------------------

    def interpret(self, table: pd.DataFrame, params: MemoryEncryptionParams) -> list[str]:
        summary = summarize(table, self.keys)
        first = params.presets[0]
        on = summary[summary.encryption == first]
        dram = CacheConfig().dram_latency
        protection = Protection.preset(first)
        mac = params.integrity_latency if protection.mac else 0
        low, high = on.loc[on.slowdown_pct.idxmin()], on.loc[on.slowdown_pct.idxmax()]
        bound = (
            f"; cache hits pay nothing, so no run can lose more than the ratio of the two "
            f"latencies ({(params.decrypt_latency + mac) / dram:.0%}), by construction"
            if protection.rmp is None
            else ""
        )
        out = [
            f"Under {first}, decrypting each line read from DRAM ({params.decrypt_latency} "
            f"cycles{f' + a {mac}-cycle MAC' if mac else ''} on top of {dram}) slows accesses by "
            f"{at(low, 'slowdown_pct').text('{:.1f}', '%')} "
            f"({_tick(low.workload, low.footprint_mib, ' ')}, {low['mode']}, LLC "
            f"{low.llc_mib} MiB) to {at(high, 'slowdown_pct').text('{:.1f}', '%')} "
            f"({_tick(high.workload, high.footprint_mib, ' ')}, {high['mode']}, LLC "
            f"{high.llc_mib} MiB) over the {len(on)} configurations "
            f"({seeds_of(table)} seed(s)){bound}."
        ]
        nested = on[on["mode"] == "nested"]
        worst = nested.loc[nested.extra_translation_cycles_per_access.idxmax()]
        where = {k: worst[k] for k in ("workload", "footprint_mib", "llc_mib")}
        hot = by_seed(table, mode="nested", encryption=first, **where)
        cold = by_seed(table, mode="native", encryption=first, **where)
        extra = "extra_translation_cycles_per_access"
        amplified = ratio(hot[extra], cold[extra])  # paired by seed: the same stream
        how = relation(amplified, Interval(1.0, 1.0, 1.0, amplified.n))
        lead = {
            "higher": "The cost concentrates in two-dimensional walks",
            "lower": "Here two-dimensional walks do not add to the cost",
            "overlap": f"Two-dimensional walks make {OVERLAP} to the cost",
        }[how]
        place = (
            f"{worst.workload} over {worst.footprint_mib} MiB with a {worst.llc_mib} MiB LLC"
        )
        out.append(
            f"{lead}: under {first} on {place}, nested paging reads "
            f"{interval(hot.walk_dram_per_access).text('{:.2f}')} page-walk lines per access "
            f"from DRAM against {interval(cold.walk_dram_per_access).text('{:.2f}')} native and "
            f"pays {interval(hot[extra]).text()} extra translation cycles per access against "
            f"{interval(cold[extra]).text()} ({times(amplified)}); "
            f"page-walk reads are {interval(hot.walk_share_pct).text('{:.0f}', '%')} of its "
            f"encryption cost ({interval(cold.walk_share_pct).text('{:.0f}', '%')} native)."
        )
        same = nested[
            (nested.workload == worst.workload) & (nested.footprint_mib == worst.footprint_mib)
        ]
        if same.llc_mib.nunique() > 1:
            small = same.loc[same.llc_mib.idxmin()]
            large = same.loc[same.llc_mib.idxmax()]
            lines = relation(at(large, "walk_dram_per_access"), at(small, "walk_dram_per_access"))
            share = relation(at(large, "walk_share_pct"), at(small, "walk_share_pct"))
            lead = (
                "A larger LLC takes the walk part away first"
                if lines == "lower" and share == "lower"
                else "A larger LLC removes walk reads"
                if lines == "lower"
                else f"A larger LLC makes {OVERLAP} to walk reads"
                if lines == "overlap"
                else "A larger LLC does not remove walk reads here"
            )
            out.append(
                f"{lead}: from {small.llc_mib} to "
                f"{large.llc_mib} MiB the nested walk lines from DRAM per access go from "
                f"{at(small, 'walk_dram_per_access').text('{:.2f}')} to "
                f"{at(large, 'walk_dram_per_access').text('{:.2f}')} and the page-walk share of "
                f"the cost from {at(small, 'walk_share_pct').text('{:.0f}', '%')} to "
                f"{at(large, 'walk_share_pct').text('{:.0f}', '%')}."
            )
        out += _preset_readings(table, params, where, place)
        out.append(
            "Every cost is added in series, one access after another: real hardware overlaps "
            "independent misses, decryptions and RMP reads (memory-level parallelism), so these "
            "extra cycles are upper bounds of this model's kind."
        )
        return out

    def figures(self, table: pd.DataFrame, params: MemoryEncryptionParams) -> dict[str, Figure]:
        table = summarize(table, self.keys)  # means and 95% intervals over the seeds
        first = params.presets[0]
        return {
            "memory-encryption-slowdown": _slowdown(table, first),
            "memory-encryption-cycles": _stacked(table, first),
            "memory-encryption-extra": _extra(table, first),
            "memory-encryption-presets": _presets(table, params.presets),
        }


def _preset_readings(
    table: pd.DataFrame, params: MemoryEncryptionParams, where: dict[str, Any], place: str
) -> list[str]:
    """Nested against native extra cycles per preset at ``where``, what the RMP check adds
    (sev-snp) and what the MAC adds (tdx against mktme), from the rows."""
    extra = "extra_cycles_per_access"
    parts = []
    for preset in params.presets:
        hot = by_seed(table, mode="nested", encryption=preset, **where)
        cold = by_seed(table, mode="native", encryption=preset, **where)
        parts.append(
            f"{preset} {interval(hot[extra]).text()} against {interval(cold[extra]).text()} "
            f"({times(ratio(hot[extra], cold[extra]))})"
        )
    out = [f"Extra cycles per access, nested against native, on {place}: " + "; ".join(parts)
           + "."]
    if "sev-snp" in params.presets:
        hot = by_seed(table, mode="nested", encryption="sev-snp", **where)
        checks, lookups = interval(hot.rmp_checks_per_access), interval(hot.rmp_lookups_per_access)
        rmp = interval(hot.extra_rmp_cycles_per_access)
        share = ratio(hot.extra_rmp_cycles_per_access * 100.0, hot[extra])
        out.append(
            f"SEV-SNP's RMP check: the nested walk makes {checks.text('{:.2f}')} checks per "
            f"access (one per entry read plus one for the data page, by construction), "
            f"{lookups.text('{:.2f}')} of which miss the {params.rmp_cache_entries}-entry RMP "
            f"cache and read an RMP entry ({params.rmp_lookup_cycles} cycles each): "
            f"{rmp.text()} cycles per access, {share.text('{:.0f}', '%')} of its extra cycles "
            f"(the lookup latency and the RMP cache are assumed values: docs/costs.md); the "
            f"rest, {interval(hot[extra] - hot.extra_rmp_cycles_per_access).text()}, decrypts "
            f"guest page tables and data only. Native rows make no RMP check (host reads are "
            f"exempt), and the nested page tables are read in the clear (SME off), so they add "
            f"no decryption."
        )
    if "tdx" in params.presets and "mktme" in params.presets:
        tdx = by_seed(table, mode="nested", encryption="tdx", **where)
        mk = by_seed(table, mode="nested", encryption="mktme", **where)
        lines = relation(interval(tdx.decrypted_per_access), interval(mk.decrypted_per_access))
        same = {"overlap": "the same", "higher": "more", "lower": "fewer"}[lines]
        diff = interval(tdx[extra].to_numpy() - mk[extra].to_numpy())
        out.append(
            f"TDX decrypts {same} lines as MKTME here "
            f"({interval(tdx.decrypted_per_access).text('{:.2f}')} per access against "
            f"{interval(mk.decrypted_per_access).text('{:.2f}')}): the secure EPT is read with "
            f"the TD's key where MKTME reads its EPT with the TME key, one decryption either "
            f"way, so by construction TDX's extra is the MAC check on each of those lines "
            f"({params.integrity_latency} cycles): {diff.text()} cycles per access more nested."
        )
    return out



def _per(value: int, accesses: int) -> float:
    return value / accesses if accesses else 0.0


def _row(
    source: Source,
    llc: int,
    mode: str,
    encryption: str,
    key_id: int,
    s: VcpuStats,
    pair: Comparison | None,
    vs_native: float | None,
) -> Row:
    walk_dram, data_dram = dram_lines(s)
    n = s.accesses
    passed = pair.passed if pair is not None and pair.passed is not None else NOTHING
    share = pair.walk_share_pct if pair is not None else None
    extra_translation = pair.extra_translation_cycles if pair is not None else 0
    extra_data = pair.extra_data_cycles if pair is not None else 0
    translation_slowdown = (
        100.0 * pair.extra_translation_cycles / pair.plain.translation_cycles
        if pair is not None and pair.plain.translation_cycles
        else 0.0
    )
    return {
        "workload": source.workload,
        "footprint_mib": source.footprint_mib,
        "llc_mib": llc,
        "mode": mode,
        "encryption": encryption,
        "key_id": key_id,
        "accesses": n,
        "walks": s.walks,
        "tlb_miss_rate": round(_per(s.walks, n), 5),
        "walk_refs": s.walk_references,
        "walk_refs_dram": walk_dram,
        "data_refs_dram": data_dram,
        "walk_dram_per_access": round(_per(walk_dram, n), 5),
        "data_dram_per_access": round(_per(data_dram, n), 5),
        "translation_cycles_per_access": round(_per(s.translation_cycles, n), 3),
        "data_cycles_per_access": round(_per(s.data_cycles, n), 3),
        "cycles_per_access": round(_per(s.cycles, n), 3),
        "extra_translation_cycles_per_access": round(_per(extra_translation, n), 3),
        "extra_data_cycles_per_access": round(_per(extra_data, n), 3),
        "walk_share_pct": round(share, 2) if share is not None else None,
        "slowdown_pct": round(pair.slowdown_pct, 3) if pair else 0.0,
        "translation_slowdown_pct": round(translation_slowdown, 3),
        "walk_dram_vs_native": round(vs_native, 3) if vs_native is not None else None,
        "ept_lines_dram_per_access": round(_per(passed.line_count("ept"), n), 5),
        "decrypted_per_access": round(_per(passed.decrypted, n), 5),
        "macs_per_access": round(_per(passed.macs, n), 5),
        "rmp_checks_per_access": round(_per(passed.rmp_checks, n), 5),
        "rmp_lookups_per_access": round(_per(passed.rmp_lookups, n), 5),
        "extra_rmp_cycles_per_access": round(_per(passed.rmp_cycles, n), 3),
        "extra_cycles_per_access": round(_per(extra_translation + extra_data, n), 3),
    }


# -- figures ----------------------------------------------------------------------------------

COLORS = {"native": "tab:blue", "nested": "tab:orange"}


Key = tuple[str, int]  # (workload, footprint MiB)
Array = npt.NDArray[np.float64]


def _labels(table: pd.DataFrame) -> list[Key]:
    return list(dict.fromkeys(zip(table["workload"], table["footprint_mib"], strict=True)))


def _tick(workload: str, mib: int, sep: str = "\n") -> str:
    size = f"{mib // 1024} GiB" if mib >= 1024 and mib % 1024 == 0 else f"{mib} MiB"
    return f"{workload}{sep}{size}"


def _value(
    table: pd.DataFrame, key: tuple[str, int], llc: int, mode: str, enc: str, column: str
) -> float:
    """The mean of ``column`` in the summary row of one configuration (0 when absent)."""
    return float(np.nan_to_num(_interval(table, key, llc, mode, enc, column).mean))


def _interval(
    table: pd.DataFrame, key: tuple[str, int], llc: int, mode: str, enc: str, column: str
) -> Interval:
    return pick(table, column, workload=key[0], footprint_mib=key[1], llc_mib=llc, mode=mode,
                encryption=enc)


def _slowdown(table: pd.DataFrame, on: str) -> Figure:
    """Slowdown by workload, native vs nested, one panel per LLC size; the hatched part of each
    bar is the share that page-walk reads cause."""

    def parts(keys: list[Key], llc: int, mode: str) -> tuple[Array, Array, list[Interval]]:
        slow = np.array([_value(table, k, llc, mode, on, "slowdown_pct") for k in keys])
        share = np.array([_value(table, k, llc, mode, on, "walk_share_pct") for k in keys])
        walk = slow * np.nan_to_num(share) / 100.0
        total = [_interval(table, k, llc, mode, on, "slowdown_pct") for k in keys]
        return slow - walk, walk, total

    return _walk_on_data(
        table,
        parts,
        "slowdown from encryption (%)",
        f"Memory encryption ({on}): slowdown by mode and workload",
    )


def _walk_on_data(
    table: pd.DataFrame,
    parts: Callable[[list[Key], int, str], tuple[Array, Array, list[Interval]]],
    ylabel: str,
    title: str,
) -> Figure:
    """One panel per LLC size, per workload a bar for each mode: the data-line part, and the
    page-walk part hatched on top of it, the 95% interval of the sum as an error bar.
    ``parts(keys, llc, mode)`` gives the two arrays (means) and the sum's intervals."""
    keys = _labels(table)
    llcs = sorted(set(table["llc_mib"]))
    figure = Figure(figsize=(max(8, 0.75 * len(keys) * len(llcs) + 2), 4.8))
    axes = figure.subplots(1, len(llcs), sharey=True, squeeze=False)[0]
    x = np.arange(len(keys))
    width = 0.38
    for ax, llc in zip(axes, llcs, strict=True):
        for i, mode in enumerate(MODES):
            data, walk, total = parts(keys, llc, mode)
            pos = x + (i - 0.5) * width
            ax.bar(pos, data, width, color=COLORS[mode], label=f"{mode}: data lines")
            ax.bar(
                pos,
                walk,
                width,
                bottom=data,
                color=COLORS[mode],
                hatch="//",
                edgecolor="white",
                label=f"{mode}: page-walk lines",
            )
            ax.errorbar(pos, data + walk, yerr=yerr(total), fmt="none", ecolor="black",
                        elinewidth=0.8, capsize=2)
        ax.set_xticks(x)
        ax.set_xticklabels([_tick(*k, " ") for k in keys], fontsize=7, rotation=40, ha="right")
        ax.set_title(f"LLC {llc} MiB")
    axes[0].set_ylabel(ylabel)
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.suptitle(f"{title} (error bars: 95% interval of the total)")
    figure.tight_layout()
    return figure


def _stacked(table: pd.DataFrame, on: str) -> Figure:
    """Cycles per access, translation stacked on data, for each mode without/with encryption,
    at the smallest and largest LLC."""
    keys = _labels(table)
    llcs = sorted(set(table["llc_mib"]))
    shown = [llcs[0]] if len(llcs) == 1 else [llcs[0], llcs[-1]]
    figure = Figure(figsize=(max(9, 1.6 * len(keys)), 4.2 * len(shown)))
    axes = figure.subplots(len(shown), 1, squeeze=False)[:, 0]
    configs = [(m, e) for m in MODES for e in ("off", on)]
    width = 0.8 / len(configs)
    x = np.arange(len(keys))
    for ax, llc in zip(axes, shown, strict=True):
        for i, (mode, enc) in enumerate(configs):
            data = [_value(table, k, llc, mode, enc, "data_cycles_per_access") for k in keys]
            trans = [
                _value(table, k, llc, mode, enc, "translation_cycles_per_access") for k in keys
            ]
            pos = x + (i - (len(configs) - 1) / 2) * width
            alpha = 1.0 if enc == on else 0.5
            ax.bar(
                pos,
                data,
                width,
                color="tab:gray",
                alpha=alpha,
                label=f"data, encryption {enc}" if mode == MODES[0] else None,
            )
            ax.bar(
                pos,
                trans,
                width,
                bottom=data,
                color=COLORS[mode],
                alpha=alpha,
                label=f"translation, {mode}, encryption {enc}",
            )
            total = [_interval(table, k, llc, mode, enc, "cycles_per_access") for k in keys]
            ax.errorbar(pos, np.add(data, trans), yerr=yerr(total), fmt="none", ecolor="black",
                        elinewidth=0.8, capsize=2)
        ax.set_xticks(x)
        ax.set_xticklabels([_tick(*k) for k in keys], fontsize=7)
        ax.set_ylabel("cycles per access")
        ax.set_title(
            f"LLC {llc} MiB: bars per workload = native off, native {on}, nested off, "
            f"nested {on}",
            fontsize=9,
        )
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    return figure


def _extra(table: pd.DataFrame, on: str) -> Figure:
    """Extra cycles per access from encryption, page-walk lines stacked on data lines, native
    vs nested, one panel per LLC size: where the cost lands and what 2D walks add."""

    def parts(keys: list[Key], llc: int, mode: str) -> tuple[Array, Array, list[Interval]]:
        data = [_value(table, k, llc, mode, on, "extra_data_cycles_per_access") for k in keys]
        walk = [
            _value(table, k, llc, mode, on, "extra_translation_cycles_per_access") for k in keys
        ]
        total = [_interval(table, k, llc, mode, on, "extra_cycles_per_access") for k in keys]
        return np.array(data), np.array(walk), total

    return _walk_on_data(
        table,
        parts,
        "extra cycles per access from encryption",
        f"Where the decryption cycles land ({on}): data lines vs page-walk lines",
    )


def _presets(table: pd.DataFrame, presets: tuple[str, ...]) -> Figure:
    """Extra cycles per access under each preset at the smallest LLC, one panel per preset, per
    workload a bar for native and nested: data lines, page-walk lines, and RMP lookups on top."""
    keys = _labels(table)
    llc = min(table["llc_mib"])
    figure = Figure(figsize=(max(8, 0.75 * len(keys) * len(presets) + 2), 4.8))
    axes = figure.subplots(1, len(presets), sharey=True, squeeze=False)[0]
    x = np.arange(len(keys))
    width = 0.38
    for ax, preset in zip(axes, presets, strict=True):
        for i, mode in enumerate(MODES):

            def mean(column: str, m: str = mode, p: str = preset) -> Array:
                return np.array([_value(table, k, llc, m, p, column) for k in keys])

            data = mean("extra_data_cycles_per_access")
            rmp = mean("extra_rmp_cycles_per_access")
            walk = mean("extra_translation_cycles_per_access") - rmp
            pos = x + (i - 0.5) * width
            ax.bar(pos, data, width, color=COLORS[mode], label=f"{mode}: data lines")
            ax.bar(pos, walk, width, bottom=data, color=COLORS[mode], hatch="//",
                   edgecolor="white", label=f"{mode}: page-walk lines")
            ax.bar(pos, rmp, width, bottom=data + walk, color="tab:red",
                   label="RMP lookups" if i else None)
            total = [_interval(table, k, llc, mode, preset, "extra_cycles_per_access")
                     for k in keys]
            ax.errorbar(pos, data + walk + rmp, yerr=yerr(total), fmt="none", ecolor="black",
                        elinewidth=0.8, capsize=2)
        ax.set_xticks(x)
        ax.set_xticklabels([_tick(*k, " ") for k in keys], fontsize=7, rotation=40, ha="right")
        ax.set_title(preset)
    axes[0].set_ylabel(f"extra cycles per access (LLC {llc} MiB)")
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.suptitle("Confidential-VM presets: extra cycles per access, native vs nested "
                    "(error bars: 95% interval of the total)")
    figure.tight_layout()
    return figure
