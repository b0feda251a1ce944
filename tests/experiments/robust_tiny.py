"""A fast stand-in experiment for the runner and sweep robustness tests (issue 13)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure

from eptlab.experiments.base import Progress, Row


@dataclass(frozen=True)
class TinyParams:
    rows: int = 3
    interrupt_at: int = 0  # 0: never; else raise KeyboardInterrupt before that row
    break_png: bool = False
    widen_at: int = 0  # 0: never; else rows from that one on carry an extra column
    seed: int = 0


class Tiny:
    """A fast stand-in experiment that counts how often it computed."""

    name: ClassVar[str] = "tiny"
    question: ClassVar[str] = "Does the runner keep runs apart?"
    Params: ClassVar[type] = TinyParams
    demo: ClassVar[dict[str, str]] = {}
    computed: ClassVar[int] = 0

    def rows(self, params: TinyParams, progress: Progress) -> Iterator[Row]:
        for i in range(params.rows):
            if params.interrupt_at and i + 1 == params.interrupt_at:
                raise KeyboardInterrupt
            Tiny.computed += 1
            row: Row = {"i": i, "value": 10 * i + params.seed}
            if params.widen_at and i + 1 >= params.widen_at:
                row["extra"] = i
            yield row

    def figures(self, table: pd.DataFrame, params: TinyParams) -> dict[str, Figure]:
        figure, ax = plt.subplots()
        ax.plot(table["i"], table["value"])
        if params.break_png:
            def broken(path: Any, **kwargs: Any) -> None:
                Path(path).write_bytes(b"\x89PNG partial")  # some bytes, then the kill
                raise KeyboardInterrupt

            setattr(figure, "savefig", broken)  # noqa: B010 (mypy: a stand-in of another signature)
        return {"tiny-values": figure}

    def interpret(self, table: pd.DataFrame, params: TinyParams) -> list[str]:
        return [f"{len(table)} rows."]




@dataclass(frozen=True)
class SeededTinyParams:
    rows: int = 2
    seeds: int = 3
    seed: int = 0
    break_png: bool = False


class SeededTiny(Tiny):
    """Tiny over seeds; ``stop_in_seed`` interrupts the run in that seed's second row."""

    name: ClassVar[str] = "seeded-tiny"
    Params: ClassVar[type] = SeededTinyParams
    stop_in_seed: ClassVar[int | None] = None
    seeds_run: ClassVar[list[int]] = []

    def rows(self, params: SeededTinyParams, progress: Progress) -> Iterator[Row]:  # type: ignore[override]
        SeededTiny.seeds_run.append(params.seed)
        for i in range(params.rows):
            if params.seed == SeededTiny.stop_in_seed and i == 1:
                raise KeyboardInterrupt
            yield {"i": i, "value": 10 * i + params.seed, "flag": params.seed % 2 == 0}
