"""The KVM applications (:mod:`eptlab.kvm.apps`) as experiments: ``kvm-fork``,
``kvm-dirty-log``, ``kvm-prefetch``, ``kvm-trap-rotation``. Each takes the application's own
parameters dataclass, yields its rows (which record the KVM flavour: ``kvm_module``, ``tdp``,
``guest_cpl``), and draws one figure from them; ``eptlab sweep`` can therefore run them into a
resumable dataset, and the report reads their tables. All of it is measured on /dev/kvm.

Columns are the application's (see each module of :mod:`eptlab.kvm.apps`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..kvm.apps.dirty_log import MODES, DirtyLogParams
from ..kvm.apps.fork import ForkParams
from ..kvm.apps.prefetch import METHODS, PrefetchParams
from ..kvm.apps.trap_rotation import TrapRotationParams
from .base import Progress, Row, check_choices
from .intervals import at, bars, column, one_seed_note, summarize, yerr


@dataclass(frozen=True)
class KvmForkParams(ForkParams):
    """The application's parameters and the seeds the shared driver repeats it with."""

    seeds: int = 3


@dataclass(frozen=True)
class KvmDirtyLogParams(DirtyLogParams):
    """The application's parameters, with their choices checked before anything runs, and the
    seeds the shared driver repeats it with."""

    seeds: int = 3

    def validate(self) -> None:
        check_choices("modes", self.modes, MODES)


@dataclass(frozen=True)
class KvmPrefetchParams(PrefetchParams):
    """The application's parameters, with their choices checked before anything runs, and the
    seeds the shared driver repeats it with (the application draws nothing at random: each
    seed is a repeat)."""

    seeds: int = 3
    seed: int = 0

    def validate(self) -> None:
        check_choices("methods", self.methods, METHODS)


@dataclass(frozen=True)
class KvmTrapRotationParams(TrapRotationParams):
    """The application's parameters and the seeds the shared driver repeats it with."""

    seeds: int = 3


class _KvmApp(ABC):
    """A KVM application as an experiment; each subclass says how to read and draw its rows."""

    app: ClassVar[str]
    name: ClassVar[str]
    question: ClassVar[str]
    Params: ClassVar[type]
    demo: ClassVar[dict[str, str]] = {}
    keys: ClassVar[tuple[str, ...]]

    def rows(self, params: Any, progress: Progress) -> Iterator[Row]:
        from ..kvm.apps import get

        app, _ = get(self.app)
        progress(0, 1)
        yield from app.rows(params)
        progress(1, 1)

    def interpret(self, table: pd.DataFrame, params: Any) -> list[str]:
        if table.empty:
            return ["Nothing was measured."]
        flavour = (f"{table.kvm_module.iloc[0]}, "
                   f"{'TDP' if table.tdp.iloc[0] else 'shadow paging'}")
        summary = summarize(table, self.keys)
        return [self.reading(summary) + f" (measured on KVM: {flavour}; mean and 95% interval "
                "over the seeds)."] + one_seed_note(table)

    @abstractmethod
    def reading(self, summary: pd.DataFrame) -> str:
        """One sentence read from the summary over seeds (one row per configuration: means,
        ``_lo``/``_hi`` bounds, ``n``), without the KVM flavour, which ``interpret`` adds."""

    def figures(self, table: pd.DataFrame, params: Any) -> dict[str, Figure]:
        figure = Figure(figsize=(5, 3.6))
        self.draw(figure.subplots(), summarize(table, self.keys))
        figure.tight_layout()
        return {self.name: figure}

    @abstractmethod
    def draw(self, ax: Axes, summary: pd.DataFrame) -> None:
        """Draw the summary's means with their intervals on ``ax``."""


class KvmFork(_KvmApp):
    app = "fork"
    name = "kvm-fork"
    question = "What does a copy-on-write fork of a real KVM guest cost (memfd MAP_PRIVATE)?"
    Params = KvmForkParams
    keys = ("guest_mib", "clones")
    demo = {"guest_mibs": "64,256", "seeds": "2"}

    def reading(self, summary: pd.DataFrame) -> str:
        big = summary.loc[summary.guest_mib.idxmax()]
        return (f"A fork of a {big.guest_mib} MiB guest took "
                f"{at(big, 'fork_ms').text('{:.2f}', ' ms')} and copied "
                f"{at(big, 'pages_copied').text('{:,.0f}')} pages for "
                f"{at(big, 'pages_written').text('{:,.0f}')} written")

    def draw(self, ax: Axes, summary: pd.DataFrame) -> None:
        ax.errorbar(summary.guest_mib, summary.fork_ms, yerr=yerr(column(summary, "fork_ms")),
                    fmt="o-", capsize=2)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("guest MiB")
        ax.set_ylabel("fork ms (measured)")
        ax.set_title("fork: memfd + MAP_PRIVATE clones")


class KvmDirtyLog(_KvmApp):
    app = "dirty-log"
    name = "kvm-dirty-log"
    question = "What does KVM's dirty logging (bitmap, ring) cost against trapping every write?"
    Params = KvmDirtyLogParams
    keys = ("mode", "rounds")
    demo = {"pages": "128", "seeds": "2"}

    def reading(self, summary: pd.DataFrame) -> str:
        # exits_per_write: exits that reach the VMM; kvm_exits_per_write: every exit the vCPU
        # took, KVM's own statistics (under shadow paging each first store faults into KVM)
        inside = "kvm_exits_per_write" in summary
        parts = [f"{r['mode']} {at(r, 'us_per_write').text('{:.2f}', ' us')}/write "
                 f"({at(r, 'exits_per_write').text('{:.2g}')} exits/write to the VMM"
                 + (f", {at(r, 'kvm_exits_per_write').text('{:.2g}')} taken by KVM itself"
                    if inside else "") + ")"
                 for _, r in summary.iterrows()]
        return "Per write: " + ", ".join(parts)

    def draw(self, ax: Axes, summary: pd.DataFrame) -> None:
        t = summary
        bars(ax, range(len(t)), column(t, "us_per_write"))
        ax.set_xticks(range(len(t)), list(t["mode"]))
        inside = t.get("kvm_exits_per_write", t.exits_per_write)  # older results lack it
        for i, (us, ex, kx) in enumerate(zip(t.us_per_write, t.exits_per_write, inside,
                                             strict=True)):
            ax.annotate(f"{ex:g} to VMM, {kx:.2g} in KVM\nexits/write", (i, us),
                        ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("us per write (measured)")
        ax.set_title("dirty logging vs trapping writes")


class KvmPrefetch(_KvmApp):
    app = "prefetch"
    name = "kvm-prefetch"
    question = "Does populating a hinted range ahead of a KVM guest save its first-touch faults?"
    Params = KvmPrefetchParams
    keys = ("method",)
    demo = {"range_mib": "16", "memory_mib": "32", "repeats": "1", "seeds": "2"}

    def reading(self, summary: pd.DataFrame) -> str:
        parts = [f"{r['method']} {at(r, 'cycles_per_page').text('{:,.0f}')} guest cycles/page"
                 for _, r in summary.iterrows()]
        return "First touch of the range: " + ", ".join(parts)

    def draw(self, ax: Axes, summary: pd.DataFrame) -> None:
        bars(ax, range(len(summary)), column(summary, "cycles_per_page"))
        ax.set_xticks(range(len(summary)), list(summary["method"]))
        ax.set_ylabel("guest cycles per page (measured)")
        ax.set_title("prefetch: populate ahead vs demand")


class KvmTrapRotation(_KvmApp):
    app = "trap-rotation"
    name = "kvm-trap-rotation"
    question = "What share of wild writes does rotating write traps over KVM memory catch?"
    Params = KvmTrapRotationParams
    keys = ("trap_fraction",)
    demo = {"iterations": "5000", "trap_fractions": "0,0.25,1", "seeds": "2"}

    def reading(self, summary: pd.DataFrame) -> str:
        caught = [at(r, "detection_rate").within(0.0, 1.0) for _, r in summary.iterrows()]
        parts = [f"{r['trap_fraction']:g} trapped: {c.scaled(100).text('{:.0f}', '%')} caught"
                 for (_, r), c in zip(summary.iterrows(), caught, strict=True)]
        return "Wild writes detected: " + ", ".join(parts)

    def draw(self, ax: Axes, summary: pd.DataFrame) -> None:
        t = summary
        ax.errorbar(t.trap_fraction, t.detection_rate, yerr=yerr(column(t, "detection_rate")),
                    fmt="o-", capsize=2, label="measured")
        ax.plot([0, 1], [0, 1], ":", color="grey", label="fraction trapped")
        ax.set_xlabel("fraction of memory write-protected")
        ax.set_ylabel("wild writes detected")
        ax.set_title("trap rotation")
        ax.legend(fontsize=8)

