"""double-caching: are EPT violations a probe for the guest's page-cache growth, whatever the
host's page cache does -- and how much file data does host RAM hold twice?

A guest (lazily backed VM, guest kernel with a page cache) reads ``files`` files of
``file_mib`` MiB in total from a virtio-style disk (:mod:`eptlab.apps.double_caching`). Before
the measured read the caches are set up: the host cache ``cold`` (empty: the host dropped it),
``warm`` (holding the files), or ``direct`` (the host opens the image with O_DIRECT and caches
nothing); the guest cache ``cold`` (a fresh guest), ``warm`` (the guest read the files
already), ``dropped`` (it read them, then dropped its page cache) or ``dropped-reported`` (the
same, with free page reporting giving the freed 2 MiB blocks back to the host). Every row is a
fresh machine; the disk is a latency model (``nvme``, ``ssd``, ``hdd``).

Columns:

| column | meaning |
|---|---|
| disk, host_cache, guest_cache | the configuration |
| file_mib | MiB of file data read (all files) |
| guest_pages_allocated | page-cache pages the guest allocated during the read |
| ept_violations | EPT violations during the read (engine count) |
| ept_violations_per_mib | ept_violations / file_mib |
| virtio_requests | block requests the guest queued (one per run of missing pages) |
| virtio_exits | notify exits (one per read() call that missed) |
| host_cache_hits, host_cache_misses | blocks the host cache served / did not hold (buffered) |
| disk_reads | read requests the disk served |
| disk_mib | MiB read from the disk |
| io_ms | modelled I/O time: disk + notify exits + host copies and cache frames |
| ept_ms | modelled hypervisor time of the EPT violations (exit, frame, zeroing, entry) |
| guest_ms | the guest's accesses (zeroing new pages, copy to user): engine cycles at clock_ghz |
| duplicated_mib_before | file data in both page caches (byte for byte) when the read starts |
| duplicated_mib | the same when the read ends |
| stale_mib_before, stale_mib | host frames behind guest-free pages still holding disk blocks |
| host_cached_mib | host page cache at the end |
| host_mib | host memory in use at the end (guest frames, EPT tables, host cache) |
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import product
from typing import ClassVar

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..apps.disk import DISK_NAMES
from ..apps.double_caching import GUEST_CACHES, HOST_CACHES, Outcome, Scenario, play
from ..arch.bits import PAGE_SIZE
from ..errors import ConfigError
from ..hv.costs import hv_costs
from ..memory.layout import check_layout, in_layout
from .base import Progress, Row, check_choices
from .intervals import OVERLAP, Interval, bars, by_seed, interval, pick, summarize

MiB = 1 << 20


@dataclass(frozen=True)
class DoubleCachingParams:
    def validate(self) -> None:
        """Choices and ranges (before anything runs)."""
        check_choices("host_caches", self.host_caches, HOST_CACHES)
        check_choices("guest_caches", self.guest_caches, GUEST_CACHES)
        check_choices("disks", self.disks, DISK_NAMES)
        check_choices("ept_page", self.ept_page, ("4k", "2m"))
        DoubleCaching().scenarios(self)

    host_caches: tuple[str, ...] = HOST_CACHES
    guest_caches: tuple[str, ...] = GUEST_CACHES
    disks: tuple[str, ...] = ("nvme", "hdd")
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
        "from its cache or from disk, and how much file data does host RAM hold twice?"
    )
    Params: ClassVar[type] = DoubleCachingParams
    demo: ClassVar[dict[str, str]] = {
        "files": "2", "file_mib": "2", "guest_mib": "96", "disks": "hdd", "seeds": "3"
    }
    keys: ClassVar[tuple[str, ...]] = ("disk", "host_cache", "guest_cache", "file_mib")

    def scenarios(self, p: DoubleCachingParams) -> list[Scenario]:
        """Every configuration (checked before anything runs)."""
        for field in ("host_caches", "guest_caches", "disks"):
            if not getattr(p, field):
                raise ConfigError(field, "needs at least one value")
        return [
            Scenario(
                host_cache=host,
                guest_cache=guest,
                disk=disk,
                files=p.files,
                file_mib=p.file_mib,
                host_cache_mib=p.host_cache_mib,
                guest_mib=p.guest_mib,
                readahead_kib=p.readahead_kib,
                ept_page=p.ept_page,
                seed=p.seed,
            )
            for disk, host, guest in product(p.disks, p.host_caches, p.guest_caches)
        ]

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

        def mib(pages: int) -> float:
            return round(pages * PAGE_SIZE / MiB, 3)

        return {
            "disk": s.disk,
            "host_cache": s.host_cache,
            "guest_cache": s.guest_cache,
            "file_mib": s.file_mib,
            "guest_pages_allocated": o.pages_allocated,
            "ept_violations": o.ept_violations,
            "ept_violations_per_mib": round(o.ept_violations / s.file_mib, 2),
            "virtio_requests": io.requests,
            "virtio_exits": io.notifies,
            "host_cache_hits": io.cache_hits,
            "host_cache_misses": io.cache_misses,
            "disk_reads": io.disk_reads,
            "disk_mib": mib(io.disk_blocks),
            "io_ms": round(io.io_us / 1e3, 3),
            "ept_ms": round(o.ept_us / 1e3, 3),
            "guest_ms": round(o.guest_cycles / hv_costs().cycles_per_us / 1e3, 3),
            "duplicated_mib_before": mib(o.before.duplicated),
            "duplicated_mib": mib(o.after.duplicated),
            "stale_mib_before": mib(o.before.stale),
            "stale_mib": mib(o.after.stale),
            "host_cached_mib": mib(o.after.host_cached),
            "host_mib": round(o.host_bytes / MiB, 2),
        }

    def interpret(self, table: pd.DataFrame, params: DoubleCachingParams) -> list[str]:
        disk = str(table["disk"].iloc[0])
        part = table[table["disk"] == disk]

        def runs(host: str, guest: str) -> pd.DataFrame | None:
            rows = by_seed(part, host_cache=host, guest_cache=guest)
            return rows if len(rows) else None

        def iv(rows: pd.DataFrame, column: str, fmt: str = "{:,.0f}") -> str:
            return interval(rows[column]).text(fmt)

        out = []
        cold = [(h, r) for h in HOST_CACHES if (r := runs(h, "cold")) is not None]
        if cold:
            rates = [interval(r.ept_violations_per_mib) for _, r in cold]
            texts = [rt.text("{:,.4g}") for rt in rates]
            rate = texts[0] if len(set(texts)) == 1 else ", ".join(
                f"{text} (host {h})" for (h, _), text in zip(cold, texts, strict=True)
            )
            sources = "; ".join(
                f"host {h}: {iv(r, 'disk_reads')} disk reads, {iv(r, 'io_ms', '{:,.2f}')} ms of I/O"
                for h, r in cold
            )
            same = all(a.overlaps(b) for a in rates for b in rates)
            verdict = (
                "the same whatever served the data" if len(set(texts)) == 1
                else f"{OVERLAP} whatever served the data" if same
                else "not the same whatever served the data"
            )
            out.append(
                f"Reading {params.file_mib} MiB into a cold guest cache took {rate} EPT "
                f"violations per MiB ({disk}) for {iv(cold[0][1], 'guest_pages_allocated')} new "
                f"page-cache pages, {verdict} ({sources})."
            )
        dropped, reported = runs("warm", "dropped"), runs("warm", "dropped-reported")
        if dropped is not None:
            text = (
                f"After the guest dropped its cache, rereading allocated "
                f"{iv(dropped, 'guest_pages_allocated')} pages again and took "
                f"{iv(dropped, 'ept_violations')} EPT violations (the host still backed the "
                f"{iv(dropped, 'stale_mib_before', '{:,.1f}')} MiB of pages the guest had freed) "
                f"and {iv(dropped, 'disk_reads')} disk reads with a warm host cache"
            )
            if reported is not None:
                given_back = reported.guest_pages_allocated - (
                    reported.stale_mib_before * MiB / PAGE_SIZE
                ).round()
                text += (
                    f"; with free page reporting it took {iv(reported, 'ept_violations')} for "
                    f"the {interval(given_back).text('{:,.0f}')} pages the host had taken back"
                )
            out.append(text + ".")
        warm, direct = runs("warm", "cold"), runs("direct", "cold")
        if warm is not None and direct is not None:
            text = (
                f"With host caching {iv(warm, 'duplicated_mib', '{:,.1f}')} of the "
                f"{params.file_mib} MiB read ended up in host RAM twice (host memory "
                f"{iv(warm, 'host_mib', '{:,.1f}')} MiB against "
                f"{iv(direct, 'host_mib', '{:,.1f}')} MiB with O_DIRECT, which holds "
                f"{iv(direct, 'duplicated_mib', '{:,.1f}')} MiB twice)"
            )
            if dropped is not None:
                text += (
                    f"; dropping the guest cache left "
                    f"{iv(dropped, 'stale_mib_before', '{:,.1f}')} MiB of file data in host "
                    "frames behind free guest pages"
                )
            out.append(text + ".")
        return out

    def figures(self, table: pd.DataFrame, params: DoubleCachingParams) -> dict[str, Figure]:
        table = summarize(table, self.keys)  # means and 95% intervals over the seeds
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
            _column(table[table["disk"] == d], "ept_violations")
            == _column(first, "ept_violations")
            for d in disks
        )
        where = f"same on {', '.join(disks)}" if same and len(disks) > 1 else disks[0]
        ax.set_title(f"EPT violations per MiB read ({where}; mean, 95% interval)", fontsize=10)

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
        ax.set_title(f"file data held twice in host RAM ({params.file_mib} MiB read)",
                     fontsize=10)

        for ax in axes:
            ax.set_xticks(x, [f"guest\n{g}" for g in guests], fontsize=8)
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
        figure.tight_layout()
        return {"double-caching": figure}


def _interval(summary: pd.DataFrame, host: str, guest: str, column: str) -> Interval:
    return pick(summary, column, host_cache=host, guest_cache=guest)


def _value(table: pd.DataFrame, host: str, guest: str, column: str) -> float:
    rows = table[(table["host_cache"] == host) & (table["guest_cache"] == guest)]
    return float(rows[column].iloc[0]) if len(rows) else 0.0


def _column(table: pd.DataFrame, column: str) -> list[float]:
    return [float(v) for v in table.sort_values(["host_cache", "guest_cache"])[column]]
