"""tsx-drk: what does a guest learn about the hypervisor's EPT state by timing its own TSX
aborts (the DrK probe of Jang, Lee, Kim, CCS 2016, aimed at EPT instead of the kernel's page
tables), and how well does an observer that never sees the truth guess it?

Each configuration runs :func:`eptlab.apps.tsx_drk.probe` (the model and the observer are
described there): ``pages`` pages of the guest's own memory, a ``share`` of them backed
(``backing``) or written since the last dirty-logging round (``dirty-wp``, ``dirty-pml``);
each page probed twice with ``XBEGIN; access; XABORT``, timed from the cost profile.

Columns: state, probe (read or write), pages, positives (the truth: pages unbacked, or clean
since the last dirty-logging round), guessed (pages the observer called slow), accuracy,
precision, recall, fast_cycles and slow_cycles (median first-probe time of the negatives and of
the positives), threshold (the observer's, from its second probes), changed (pages the first
probes backed or un-protected: the probe is destructive), logged_dirty (pages the dirty log
reports after the probes; the guest's own writes are not counted).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..apps.tsx_drk import STATES, DrkResult, DrkSetup, probe
from ..errors import ConfigError
from ..memory.layout import check_layout, in_layout
from .base import Progress, Row
from .intervals import by_seed, interval


@dataclass(frozen=True)
class TsxDrkParams:
    states: tuple[str, ...] = STATES
    pages: int = 256
    share: float = 0.5
    seeds: int = 5
    seed: int = 0
    layout: str = "aged"  # memory layout: aged or contiguous (docs/layouts.md)

    def __post_init__(self) -> None:
        check_layout(self.layout)

    def validate(self) -> None:
        """The configurations build (before anything runs)."""
        TsxDrk().configurations(self)


class TsxDrk:
    name: ClassVar[str] = "tsx-drk"
    question: ClassVar[str] = (
        "What does timing its own TSX aborts tell a guest about the hypervisor's EPT state "
        "(backed pages, write-protected pages), and how well does an observer guess it?"
    )
    Params: ClassVar[type] = TsxDrkParams
    demo: ClassVar[dict[str, str]] = {"pages": "64", "seeds": "3"}
    keys: ClassVar[tuple[str, ...]] = ("state",)

    def configurations(self, p: TsxDrkParams) -> list[DrkSetup]:
        if not p.states:
            raise ConfigError("states", "no state to probe")
        for name in p.states:
            if name not in STATES:
                raise ConfigError("states", f"{name!r} is not one of {', '.join(STATES)}")
        return [DrkSetup(name, p.pages, p.share, p.seed) for name in p.states]

    def rows(self, params: TsxDrkParams, progress: Progress) -> Iterator[Row]:
        yield from in_layout(params.layout, self._rows(params, progress))

    def _rows(self, params: TsxDrkParams, progress: Progress) -> Iterator[Row]:
        configs = self.configurations(params)
        progress(0, len(configs))
        for done, setup in enumerate(configs, 1):
            yield self.row(probe(setup))
            progress(done, len(configs))

    @staticmethod
    def row(r: DrkResult) -> Row:
        """One configuration's row."""
        score = r.score()

        def median(values: np.ndarray) -> float:
            return round(float(np.median(values)), 1) if len(values) else 0.0

        return {
            "state": r.setup.state,
            "probe": "read" if r.setup.state == "backing" else "write",
            "pages": r.setup.pages,
            "positives": int(r.truth.sum()),
            "guessed": int(r.guess.sum()),
            "accuracy": round(score["accuracy"], 4),
            "precision": round(score["precision"], 4),  # NaN: no page guessed slow
            "recall": round(score["recall"], 4),
            "fast_cycles": median(r.first[~r.truth]),
            "slow_cycles": median(r.first[r.truth]),
            "threshold": round(r.threshold, 1),
            "changed": r.changed,
            "logged_dirty": r.logged_dirty,
        }

    def interpret(self, table: pd.DataFrame, params: TsxDrkParams) -> list[str]:
        out = []
        for state in dict.fromkeys(table["state"]):
            r = by_seed(table, state=state)

            def pct(values: pd.Series) -> str:
                return interval(values).scaled(100).text("{:.0f}", "%")

            text = (
                f"{state}: the observer is right about {pct(r.accuracy)} of the pages "
                f"(precision {pct(r.precision)}, recall {pct(r.recall)}); a first probe takes "
                f"{interval(r.slow_cycles).text('{:,.0f}')} cycles on the "
                f"{'unbacked' if state == 'backing' else 'clean'} pages and "
                f"{interval(r.fast_cycles).text('{:,.0f}')} on the others"
            )
            text += f"; the probes changed {interval(r.changed).text('{:,.0f}')} pages' state"
            out.append(text + ".")
        if len(out):
            out.append(
                "That a probe which exits is slower holds by construction (the exit round trip "
                "and the handler's work are added to the guest's measured time: the TSC runs "
                "across the exit); what the run measures is whether the walk-time "
                "spread of probes that do not exit (TLB miss, page-table and data lines from "
                "any cache level or DRAM) stays below that gap."
            )
        return out

    def figures(self, table: pd.DataFrame, params: TsxDrkParams) -> dict[str, Figure]:
        figure = Figure(figsize=(7, 4))
        ax = figure.subplots()
        states = list(dict.fromkeys(table["state"]))
        x = np.arange(len(states))
        for offset, column, label in ((-0.2, "fast_cycles", "backed / dirty"),
                                      (0.2, "slow_cycles", "unbacked / clean")):
            means = [float(by_seed(table, state=s)[column].mean()) for s in states]
            ax.bar(x + offset, means, 0.4, label=label)
        ax.set_xticks(x, states)
        ax.set_ylabel("median probe time (cycles)")
        ax.set_title("DrK probe against EPT state (mean of medians over seeds)")
        ax.legend()
        figure.tight_layout()
        return {"tsx-drk": figure}
