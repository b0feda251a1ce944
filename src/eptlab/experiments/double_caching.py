"""double-caching: are EPT violations a probe for the guest's page-cache growth, whatever the
host's page cache does -- and where does the EPT see the host cache (a DAX window)? How much
file data does host RAM hold twice?

A guest (lazily backed VM, guest kernel with a page cache) reads ``files`` files of
``file_mib`` MiB in total from a disk image (:mod:`eptlab.apps.double_caching`), along one of
two paths: ``virtio-blk`` (a block device fills the guest's page cache) or ``dax`` (the image is
mapped into guest-physical memory, each window page one of the host cache's frames; no guest
page cache). Before the measured read the caches are set up: the host cache ``cold`` (empty:
the host dropped it), ``warm`` (holding the files), or ``direct`` (O_DIRECT, virtio-blk only);
the guest cache ``cold`` (a fresh guest), ``warm`` (the guest read the files already),
``dropped`` (read, then dropped) or ``dropped-reported`` (the same, with free page reporting);
DAX takes ``cold`` and ``warm``. ``init_on_alloc`` 1 or 0 (virtio-blk): whether the guest zeroes
its new page-cache pages (with 0 the device's write is their first touch). The host cache reads
``host_readahead_kib`` ahead on a miss. Every row is a fresh machine; the disk is a latency
model (``nvme``, ``ssd``, ``hdd``).

A value of an axis that cannot change a row is run once (the first value of the axis): host
readahead only varies with a cold host cache (a warm one does not miss, O_DIRECT bypasses it);
``init_on_alloc`` only on the virtio-blk path (DAX allocates no page-cache pages).

Columns:

| column | meaning |
|---|---|
| path, disk, host_cache, guest_cache, init_on_alloc, host_readahead_kib | the configuration |
| file_mib | MiB of file data read (all files) |
| guest_pages_allocated | page-cache pages the guest allocated during the read |
| ept_violations | EPT violations during the read (engine count) |
| ept_violations_per_mib | ept_violations / file_mib |
| window_violations | of which on the DAX window |
| window_pages | distinct window pages first touched during the read |
| device_first_touches | guest pages the device wrote before the guest did (host faults, no exit) |
| mapped_existing | EPT violations that mapped a frame the host already held (init_on_alloc=0) |
| exits | ept_violations + virtio_exits |
| virtio_requests | block requests the guest queued (one per run of missing pages) |
| virtio_exits | notify exits (one per read() call that missed) |
| host_cache_hits, host_cache_misses | blocks the host cache served / did not hold |
| disk_reads | read requests the disk served |
| disk_mib | MiB read from the disk |
| readahead_mib | of which read ahead by the host cache |
| host_copies | 4 KiB blocks the host CPU copied into guest pages |
| cpu_copies | host_copies + file pages the guest copied to the user buffer |
| io_ms | modelled I/O time: disk + notify exits, lookups, host copies, cache frames, host faults |
| ept_ms | hypervisor time of the EPT violations (exit, host fault, frame, zeroing, lookup, edit) |
| guest_ms | the guest's accesses (zeroing new pages, copy to user): engine cycles at clock_ghz |
| total_ms | io_ms + ept_ms + guest_ms |
| cpu_mcycles | CPU work of the read, guest and host, in millions of cycles (no disk wait) |
| duplicated_mib_before | file data in both page caches (byte for byte) when the read starts |
| duplicated_mib | the same when the read ends |
| stale_mib_before, stale_mib | host frames behind guest-free pages still holding disk blocks |
| guest_cache_mib | guest page-cache pages at the end (guest memory holding file data) |
| window_mib | DAX window pages mapped to the host cache's own frames at the end |
| guest_used_mib | guest-physical memory the guest kernel has allocated at the end |
| host_cached_mib | host page cache at the end |
| host_mib | host memory in use at the end (guest frames, EPT tables, host cache) |
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import product
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..apps.disk import DISK_NAMES
from ..apps.double_caching import (
    DAX_GUEST_CACHES,
    DAX_HOST_CACHES,
    GUEST_CACHES,
    HOST_CACHES,
    PATHS,
    Outcome,
    Scenario,
    play,
)
from ..arch.bits import PAGE_SIZE
from ..errors import ConfigError
from ..hv.costs import hv_costs
from ..memory.layout import check_layout, in_layout
from .base import Progress, Row, check_choices, check_range
from .intervals import (
    OVERLAP,
    Interval,
    bars,
    by_seed,
    change,
    interval,
    pick,
    summarize,
    text_of,
)

MiB = 1 << 20


@dataclass(frozen=True)
class DoubleCachingParams:
    def validate(self) -> None:
        """Choices and ranges (before anything runs)."""
        check_choices("paths", self.paths, PATHS)
        check_choices("host_caches", self.host_caches, HOST_CACHES)
        check_choices("guest_caches", self.guest_caches, GUEST_CACHES)
        check_choices("disks", self.disks, DISK_NAMES)
        check_choices("ept_page", self.ept_page, ("4k", "2m"))
        check_range("init_on_alloc", self.init_on_alloc, 0, 1)
        for kib in self.host_readahead_kib:
            if kib % 4:
                raise ConfigError("host_readahead_kib", f"{kib} is not a multiple of 4")
        DoubleCaching().scenarios(self)

    paths: tuple[str, ...] = PATHS
    host_caches: tuple[str, ...] = HOST_CACHES
    guest_caches: tuple[str, ...] = GUEST_CACHES
    disks: tuple[str, ...] = ("nvme", "hdd")
    init_on_alloc: tuple[int, ...] = (1, 0)  # the guest zeroes new pages (1) or not (0)
    host_readahead_kib: tuple[int, ...] = (0, 128)  # host cache readahead on a miss
    files: int = 4
    file_mib: int = 8  # all files together
    host_cache_mib: int = 64  # the host page cache's capacity (LRU beyond it)
    guest_mib: int = 256
    readahead_kib: int = 128  # the guest's read() size and largest request
    ept_page: str = "4k"  # how the hypervisor backs guest memory: 4k or 2m
    seeds: int = 5
    seed: int = 0
    layout: str = "aged"  # memory layout: aged or contiguous (docs/layouts.md)

    def __post_init__(self) -> None:
        check_layout(self.layout)


class DoubleCaching:
    name: ClassVar[str] = "double-caching"
    question: ClassVar[str] = (
        "Do EPT violations follow the guest's new page-cache pages whether the host serves reads "
        "from its cache or from disk, where does the EPT see the host cache instead (a DAX "
        "window), and how much file data does host RAM hold twice?"
    )
    Params: ClassVar[type] = DoubleCachingParams
    demo: ClassVar[dict[str, str]] = {
        "files": "2", "file_mib": "2", "guest_mib": "96", "disks": "hdd", "seeds": "3"
    }
    keys: ClassVar[tuple[str, ...]] = (
        "path", "disk", "host_cache", "guest_cache", "init_on_alloc", "host_readahead_kib",
        "file_mib",
    )

    def scenarios(self, p: DoubleCachingParams) -> list[Scenario]:
        """Every configuration (checked before anything runs); an axis value that cannot change
        a row is run once, with the axis's first value (module docstring)."""
        for field in ("paths", "host_caches", "guest_caches", "disks", "init_on_alloc",
                      "host_readahead_kib"):
            if not getattr(p, field):
                raise ConfigError(field, "needs at least one value")
        out = []
        for disk, path, host, guest, init, ahead in product(
            p.disks, p.paths, p.host_caches, p.guest_caches, p.init_on_alloc,
            p.host_readahead_kib,
        ):
            if path == "dax" and (
                host not in DAX_HOST_CACHES
                or guest not in DAX_GUEST_CACHES
                or init != p.init_on_alloc[0]
            ):
                continue
            if host != "cold" and ahead != p.host_readahead_kib[0]:
                continue
            out.append(
                Scenario(
                    path=path,
                    host_cache=host,
                    guest_cache=guest,
                    disk=disk,
                    init_on_alloc=bool(init),
                    host_readahead_kib=ahead,
                    files=p.files,
                    file_mib=p.file_mib,
                    host_cache_mib=p.host_cache_mib,
                    guest_mib=p.guest_mib,
                    readahead_kib=p.readahead_kib,
                    ept_page=p.ept_page,
                    seed=p.seed,
                )
            )
        if not out:
            raise ConfigError("paths", "no configuration left: DAX takes host_caches cold or "
                              "warm and guest_caches cold or warm")
        return out

    def rows(self, params: DoubleCachingParams, progress: Progress) -> Iterator[Row]:
        # every guest built while the rows are computed gets this layout
        yield from in_layout(params.layout, self._layout_rows(params, progress))

    def _layout_rows(self, params: DoubleCachingParams, progress: Progress) -> Iterator[Row]:
        scenarios = self.scenarios(params)
        progress(0, len(scenarios))
        for done, scenario in enumerate(scenarios, 1):
            yield self.row(play(scenario))
            progress(done, len(scenarios))

    @staticmethod
    def row(o: Outcome) -> Row:
        s, io = o.scenario, o.io
        clock = hv_costs().cycles_per_us

        def mib(pages: int) -> float:
            return round(pages * PAGE_SIZE / MiB, 3)

        io_ms = io.io_us / 1e3
        ept_ms = o.ept_us / 1e3
        guest_ms = o.guest_cycles / clock / 1e3
        return {
            "path": s.path,
            "disk": s.disk,
            "host_cache": s.host_cache,
            "guest_cache": s.guest_cache,
            "init_on_alloc": int(s.init_on_alloc),
            "host_readahead_kib": s.host_readahead_kib,
            "file_mib": s.file_mib,
            "guest_pages_allocated": o.pages_allocated,
            "ept_violations": o.ept_violations,
            "ept_violations_per_mib": round(o.ept_violations / s.file_mib, 2),
            "window_violations": o.window_violations,
            "window_pages": o.window_pages,
            "device_first_touches": io.host_faults,
            "mapped_existing": o.host_touch_mappings,
            "exits": o.ept_violations + io.notifies,
            "virtio_requests": io.requests if s.path == "virtio-blk" else 0,
            "virtio_exits": io.notifies,
            "host_cache_hits": io.cache_hits,
            "host_cache_misses": io.cache_misses,
            "disk_reads": io.disk_reads,
            "disk_mib": mib(io.disk_blocks),
            "readahead_mib": mib(io.readahead_blocks),
            "host_copies": io.copies,
            "cpu_copies": io.copies + o.pages_read,
            "io_ms": round(io_ms, 3),
            "ept_ms": round(ept_ms, 3),
            "guest_ms": round(guest_ms, 3),
            "total_ms": round(io_ms + ept_ms + guest_ms, 3),
            "cpu_mcycles": round((o.guest_cycles + o.ept_cycles + io.cpu_cycles) / 1e6, 3),
            "duplicated_mib_before": mib(o.before.duplicated),
            "duplicated_mib": mib(o.after.duplicated),
            "stale_mib_before": mib(o.before.stale),
            "stale_mib": mib(o.after.stale),
            "guest_cache_mib": mib(o.after.guest_cached),
            "window_mib": mib(o.after.shared),
            "guest_used_mib": round(o.guest_bytes / MiB, 2),
            "host_cached_mib": mib(o.after.host_cached),
            "host_mib": round(o.host_bytes / MiB, 2),
        }

    # -- readings ----------------------------------------------------------------------------

    def interpret(self, table: pd.DataFrame, params: DoubleCachingParams) -> list[str]:
        disk = str(table["disk"].iloc[0])
        part = table[table["disk"] == disk]
        init0, ahead0 = params.init_on_alloc[0], params.host_readahead_kib[0]
        base = part[(part["init_on_alloc"] == init0) & (part["host_readahead_kib"] == ahead0)]
        out = self._virtio_readings(base[base["path"] == "virtio-blk"], disk, params)
        out += _dax_reading(base, disk, params)
        out += _init_reading(part, params)
        out += _readahead_reading(part, disk, params)
        return out

    def _virtio_readings(
        self, part: pd.DataFrame, disk: str, params: DoubleCachingParams
    ) -> list[str]:
        def runs(host: str, guest: str) -> pd.DataFrame | None:
            rows = by_seed(part, host_cache=host, guest_cache=guest)
            return rows if len(rows) else None

        out = []
        cold = [(h, r) for h in HOST_CACHES if (r := runs(h, "cold")) is not None]
        if cold:
            rates = [interval(r.ept_violations_per_mib) for _, r in cold]
            texts = [rt.text("{:,.4g}") for rt in rates]
            rate = texts[0] if len(set(texts)) == 1 else ", ".join(
                f"{text} (host {h})" for (h, _), text in zip(cold, texts, strict=True)
            )
            sources = "; ".join(
                f"host {h}: {text_of(r.disk_reads)} disk reads, "
                f"{text_of(r.io_ms, '{:,.2f}')} ms of I/O"
                for h, r in cold
            )
            same = all(a.overlaps(b) for a in rates for b in rates)
            verdict = (
                "the same whatever served the data" if len(set(texts)) == 1
                else f"{OVERLAP} whatever served the data" if same
                else "not the same whatever served the data"
            )
            out.append(
                f"On the virtio-blk path, reading {params.file_mib} MiB into a cold guest cache "
                f"took {rate} EPT violations per MiB ({disk}) for "
                f"{text_of(cold[0][1].guest_pages_allocated)} new page-cache pages, {verdict} "
                f"({sources})."
            )
        dropped, reported = runs("warm", "dropped"), runs("warm", "dropped-reported")
        if dropped is not None:
            text = (
                f"After the guest dropped its cache, rereading allocated "
                f"{text_of(dropped.guest_pages_allocated)} pages again and took "
                f"{text_of(dropped.ept_violations)} EPT violations (the host still backed the "
                f"{text_of(dropped.stale_mib_before, '{:,.1f}')} MiB of pages the guest had "
                f"freed) and {text_of(dropped.disk_reads)} disk reads with a warm host cache"
            )
            if reported is not None:
                given_back = reported.guest_pages_allocated - (
                    reported.stale_mib_before * MiB / PAGE_SIZE
                ).round()
                text += (
                    f"; with free page reporting it took {text_of(reported.ept_violations)} for "
                    f"the {interval(given_back).text('{:,.0f}')} pages the host had taken back"
                )
            out.append(text + ".")
        warm, direct = runs("warm", "cold"), runs("direct", "cold")
        if warm is not None and direct is not None:
            text = (
                f"With host caching {text_of(warm.duplicated_mib, '{:,.1f}')} of the "
                f"{params.file_mib} MiB read ended up in host RAM twice (host memory "
                f"{text_of(warm.host_mib, '{:,.1f}')} MiB against "
                f"{text_of(direct.host_mib, '{:,.1f}')} MiB with O_DIRECT, which holds "
                f"{text_of(direct.duplicated_mib, '{:,.1f}')} MiB twice)"
            )
            if dropped is not None:
                text += (
                    f"; dropping the guest cache left "
                    f"{text_of(dropped.stale_mib_before, '{:,.1f}')} MiB of file data in host "
                    "frames behind free guest pages"
                )
            out.append(text + ".")
        return out

    # -- figures -----------------------------------------------------------------------------

    def figures(self, table: pd.DataFrame, params: DoubleCachingParams) -> dict[str, Figure]:
        summary = summarize(table, self.keys)  # means and 95% intervals over the seeds
        init0, ahead0 = params.init_on_alloc[0], params.host_readahead_kib[0]
        out: dict[str, Figure] = {}
        virtio = summary[
            (summary["path"] == "virtio-blk")
            & (summary["init_on_alloc"] == init0)
            & (summary["host_readahead_kib"] == ahead0)
        ]
        if len(virtio):
            out["double-caching"] = _virtio_figure(virtio, params)
        out["double-caching-paths"] = _paths_figure(summary, params)
        return out


# -- readings of the new rows --------------------------------------------------------------------


def _per(rows: pd.DataFrame, numerator: str, denominator: str) -> Interval:
    """Seed by seed ``numerator / denominator`` (0 denominators left out)."""
    num, den = rows[numerator].astype(float), rows[denominator].astype(float)
    return interval((num / den.where(den != 0)).to_numpy())


def _cost_per_violation(rows: pd.DataFrame) -> Interval:
    """Microseconds per window violation, I/O included, seed by seed."""
    total = (rows["ept_ms"] + rows["io_ms"]) * 1e3
    den = rows["window_violations"].astype(float)
    return interval((total / den.where(den != 0)).to_numpy())


def _dax_reading(base: pd.DataFrame, disk: str, params: DoubleCachingParams) -> list[str]:
    def runs(path: str, host: str) -> pd.DataFrame | None:
        rows = by_seed(base, path=path, host_cache=host, guest_cache="cold")
        return rows if len(rows) else None

    dax = {h: r for h in DAX_HOST_CACHES if (r := runs("dax", h)) is not None}
    if not dax:
        return []
    first = next(iter(dax.values()))
    counts = " and ".join(
        f"{text_of(r.window_violations)} EPT violations on the window with the host cache {h}"
        for h, r in dax.items()
    )
    costs = " and ".join(
        f"{_cost_per_violation(r).text('{:,.2f}')} us with it {h} "
        f"({text_of(r.disk_reads)} disk reads)"
        for h, r in dax.items()
    )
    text = (
        f"On the DAX path the same read took {counts}, one per "
        f"file page read ({text_of(first.window_pages)} pages: the window is mapped page by page "
        f"at first access, by construction); a window violation cost {costs} on {disk}, I/O "
        "included"
    )
    virtio = {h: r for h in DAX_HOST_CACHES if (r := runs("virtio-blk", h)) is not None}
    if virtio:
        text += ", where virtio-blk took " + " and ".join(
            f"{text_of(r.ept_violations)} (host {h})" for h, r in virtio.items()
        ) + " whatever the host cache held"
    out = [text + "."]
    if "warm" in dax and "warm" in virtio:
        d, v = dax["warm"], virtio["warm"]
        out.append(
            f"Memory after the read with a warm host cache: DAX holds the file data once "
            f"(host memory {text_of(d.host_mib, '{:,.1f}')} MiB, "
            f"{text_of(d.window_mib, '{:,.1f}')} MiB of window pages are the host cache's own "
            f"frames, {text_of(d.duplicated_mib, '{:,.1f}')} MiB twice, guest page cache "
            f"{text_of(d.guest_cache_mib, '{:,.1f}')} MiB), virtio-blk twice (host memory "
            f"{text_of(v.host_mib, '{:,.1f}')} MiB, {text_of(v.duplicated_mib, '{:,.1f}')} MiB "
            f"twice, guest page cache {text_of(v.guest_cache_mib, '{:,.1f}')} MiB); CPU copies "
            f"per page read {_per(d, 'cpu_copies', 'window_pages').text('{:,.2g}')} against "
            f"{_per(v, 'cpu_copies', 'guest_pages_allocated').text('{:,.2g}')}; the whole read "
            f"took {text_of(d.total_ms, '{:,.2f}')} ms against {text_of(v.total_ms, '{:,.2f}')} "
            "ms (modelled)."
        )
    return out


def _init_reading(part: pd.DataFrame, params: DoubleCachingParams) -> list[str]:
    if not {0, 1} <= set(params.init_on_alloc):
        return []
    ahead0 = params.host_readahead_kib[0]

    def runs(init: int) -> pd.DataFrame:
        return by_seed(part, path="virtio-blk", host_cache="cold", guest_cache="cold",
                       init_on_alloc=init, host_readahead_kib=ahead0)

    on, off = runs(1), runs(0)
    if not len(on) or not len(off):
        return []

    def ch(name: str, column: str, fmt: str = "{:,.2f}") -> str:
        return change(name, interval(on[column]), interval(off[column]), fmt)

    return [
        f"With init_on_alloc=0 (cold caches) the device's write was the first touch of "
        f"{text_of(off.device_first_touches)} new pages (host page faults in the VMM's mapping, "
        f"no exit); the guest still took {text_of(off.ept_violations)} EPT violations "
        f"({text_of(on.ept_violations)} with init_on_alloc=1), now at its first read of each "
        f"page, and {text_of(off.mapped_existing)} of them only mapped the frame the host held: "
        f"{ch('ept_ms', 'ept_ms')}, {ch('guest_ms', 'guest_ms')}, {ch('io_ms', 'io_ms')}, "
        f"{ch('total_ms', 'total_ms')}. The count cannot change by construction (the EPT entry "
        "is made at the guest's first access, as on KVM); the allocation and zeroing move from "
        "the exit to the device's host fault."
    ]


def _readahead_reading(
    part: pd.DataFrame, disk: str, params: DoubleCachingParams
) -> list[str]:
    if len(params.host_readahead_kib) < 2:
        return []
    lo, hi = params.host_readahead_kib[0], params.host_readahead_kib[-1]
    init0 = params.init_on_alloc[0]
    clauses = []
    for path in PATHS:
        def runs(ahead: int, path: str = path) -> pd.DataFrame:
            return by_seed(part, path=path, host_cache="cold", guest_cache="cold",
                           init_on_alloc=init0, host_readahead_kib=ahead)

        a, b = runs(lo), runs(hi)
        if not len(a) or not len(b):
            continue
        reads = change("disk reads", interval(a.disk_reads), interval(b.disk_reads), "{:,.0f}")
        io = change("I/O time", interval(a.io_ms), interval(b.io_ms), "{:,.2f}", " ms")
        clause = (
            f"{path}: {reads}, {io}, EPT violations {text_of(a.ept_violations)} and "
            f"{text_of(b.ept_violations)}"
        )
        clauses.append(clause)
    if not clauses:
        return []
    return [
        f"Host readahead of {hi} KiB against {lo} KiB (cold host cache, sequential read, "
        f"{disk}): " + "; ".join(clauses) + ". Readahead fills the host cache, not the EPT: "
        "the window is still mapped one page per violation."
    ]


# -- figures ---------------------------------------------------------------------------------------


def _virtio_figure(table: pd.DataFrame, params: DoubleCachingParams) -> Figure:
    """The virtio-blk rows (first init_on_alloc and readahead values) by guest cache state."""
    figure = Figure(figsize=(15, 5.4))
    axes = figure.subplots(1, 3)
    guests = [g for g in GUEST_CACHES if g in set(table["guest_cache"])]
    hosts = [h for h in HOST_CACHES if h in set(table["host_cache"])]
    disks = list(dict.fromkeys(table["disk"]))
    colors = {h: f"C{i}" for i, h in enumerate(HOST_CACHES)}
    x = np.arange(len(guests))
    first = table[table["disk"] == disks[0]]
    width = 0.8 / max(1, len(hosts))

    def offset(i: int, n: int, w: float) -> float:
        return (i - (n - 1) / 2) * w

    ax = axes[0]
    for i, host in enumerate(hosts):
        values = [_interval(first, host, g, "ept_violations_per_mib") for g in guests]
        bars(ax, x + offset(i, len(hosts), width), values, width, color=colors[host],
             label=f"host {host}")
    allocated = [
        _value(first, hosts[0], g, "guest_pages_allocated") / params.file_mib for g in guests
    ]
    ax.hlines(allocated, x - 0.45, x + 0.45, color="black", linestyles="--", zorder=3,
              label="new page-cache pages per MiB")
    same = all(
        _column(table[table["disk"] == d], "ept_violations") == _column(first, "ept_violations")
        for d in disks
    )
    where = f"same on {', '.join(disks)}" if same and len(disks) > 1 else disks[0]
    ax.set_title(f"virtio-blk: EPT violations per MiB read ({where}; mean, 95% interval)",
                 fontsize=10)

    ax = axes[1]
    width_io = 0.8 / max(1, len(hosts) * len(disks))
    k = 0
    for d, disk in enumerate(disks):
        part = table[table["disk"] == disk]
        for host in hosts:
            values = [_interval(part, host, g, "io_ms") for g in guests]
            bars(ax, x + offset(k, len(hosts) * len(disks), width_io), values, width_io,
                 color=colors[host], hatch=("", "//", "..", "xx")[d % 4],
                 edgecolor="white", label=f"host {host}, {disk}")
            k += 1
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_ylabel("ms (model)")
    ax.set_title("I/O time of the read (disk, exits, host copies)", fontsize=10)

    ax = axes[2]
    for i, host in enumerate(hosts):
        o = offset(i, len(hosts), width)
        after = [_interval(first, host, g, "duplicated_mib") for g in guests]
        before = [_value(first, host, g, "duplicated_mib_before") for g in guests]
        stale = [_value(first, host, g, "stale_mib_before") for g in guests]
        bars(ax, x + o, after, width, color=colors[host], label=f"host {host}: after the read")
        ax.scatter(x + o, before, marker="v", color=colors[host], edgecolor="black",
                   zorder=3, label=f"host {host}: before")
        ax.scatter(x + o, stale, marker="x", color="black", zorder=3,
                   label="stale in guest-free frames, before" if i == 0 else None)
    ax.set_ylabel("MiB")
    ax.set_title(f"file data held twice in host RAM ({params.file_mib} MiB read)", fontsize=10)

    for ax in axes:
        ax.set_xticks(x, [f"guest\n{g}" for g in guests], fontsize=8)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    figure.tight_layout()
    return figure


def _paths_figure(summary: pd.DataFrame, params: DoubleCachingParams) -> Figure:
    """Cold guest, first disk: every path, host cache state, init_on_alloc and readahead."""
    disk = str(summary["disk"].iloc[0])
    rows = summary[(summary["disk"] == disk) & (summary["guest_cache"] == "cold")]
    init0 = params.init_on_alloc[0]

    def label(r: Any) -> str:
        parts = ["blk" if r.path == "virtio-blk" else "dax", f"host {r.host_cache}"]
        if r.path == "virtio-blk" and r.init_on_alloc != init0:
            parts.append(f"init {r.init_on_alloc}")
        if r.host_readahead_kib:
            parts.append(f"ra {r.host_readahead_kib}K")
        return " ".join(parts)

    labels = [label(r) for r in rows.itertuples()]
    colors = ["C0" if p == "virtio-blk" else "C3" for p in rows["path"]]
    x = np.arange(len(rows))
    figure = Figure(figsize=(16, 6.5))
    axes = figure.subplots(1, 4)
    panels = [
        ("ept_violations", "EPT violations (DAX: on the window)", False),
        ("disk_reads", "disk reads", True),
        ("total_ms", f"modelled time of the read, ms ({disk})", True),
        ("host_mib", "host memory at the end, MiB", False),
    ]
    for ax, (column, title, log) in zip(axes, panels, strict=True):
        values = [pick(rows, column, **_where(r)) for r in rows.itertuples()]
        bars(ax, x, values, 0.7, color=colors)
        if log:
            ax.set_yscale("symlog", linthresh=1)
        if column == "host_mib":
            dup = [pick(rows, "duplicated_mib", **_where(r)).mean for r in rows.itertuples()]
            ax.scatter(x, dup, marker="x", color="black", zorder=3,
                       label="of which file data held twice")
            ax.legend(fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(x, labels, fontsize=7, rotation=90)
    figure.suptitle(
        f"virtio-blk (blk, blue) against a DAX window (red): a cold guest reads "
        f"{params.file_mib} MiB (mean, 95% interval; init: init_on_alloc, ra: host readahead)",
        fontsize=11,
    )
    figure.tight_layout()
    return figure


def _where(r: Any) -> dict[str, Any]:
    return {k: getattr(r, k) for k in ("path", "host_cache", "init_on_alloc",
                                       "host_readahead_kib")}


def _interval(summary: pd.DataFrame, host: str, guest: str, column: str) -> Interval:
    return pick(summary, column, host_cache=host, guest_cache=guest)


def _value(table: pd.DataFrame, host: str, guest: str, column: str) -> float:
    rows = table[(table["host_cache"] == host) & (table["guest_cache"] == guest)]
    return float(rows[column].iloc[0]) if len(rows) else 0.0


def _column(table: pd.DataFrame, column: str) -> list[float]:
    return [float(v) for v in table.sort_values(["host_cache", "guest_cache"])[column]]
