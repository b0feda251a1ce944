"""Transaction streams for the real-RTM measurements, and the decoding of their abort logs.

One :class:`TxPlan` is run three ways with the same meaning: in this process by the C probe
(:mod:`eptlab.kvm.rtm_host`), in a KVM guest (``guests/tsx.S``, :mod:`eptlab.kvm.apps.tsx`) and
through the simulator's RTM model (the ``kvm-crosscheck`` experiment). A transaction is a fixed
number of *runs* ``(offset, count, stride)``: it stores 8 bytes at ``base + offset + k * stride``
for ``k < count``, run after run. *Warm* runs are performed once before the first round, outside
any transaction, as ``or $0`` (a write that keeps the value).

Each attempt leaves one log entry of two u64 (written by the probe or the guest):
``kind << 56 | tx << 32 | status`` (kind 0 abort, 1 commit, 2 fallback; status the EAX abort
status, SDM Vol. 1 §16.3.5 Table 16-1) and the RDTSC cycles of the attempt.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..errors import ConfigError
from ..mmu.rtm import (
    XABORT_CAPACITY,
    XABORT_CONFLICT,
    XABORT_DEBUG,
    XABORT_EXPLICIT,
    XABORT_NESTED,
    XABORT_RETRY,
)

PAGE = 4096
LINE = 64
KIND_ABORT, KIND_COMMIT, KIND_FALLBACK = 0, 1, 2
U64 = npt.NDArray[np.uint64]

STATUS_BITS = {  # column suffix -> EAX bit (SDM Vol. 1 Table 16-1)
    "xabort": XABORT_EXPLICIT,
    "retry": XABORT_RETRY,
    "conflict": XABORT_CONFLICT,
    "capacity": XABORT_CAPACITY,
    "debug": XABORT_DEBUG,
    "nested": XABORT_NESTED,
}


@dataclass(frozen=True)
class TxPlan:
    """``runs[t, r] = (offset, count, stride)`` of transaction ``t``; ``warm[w]`` likewise.
    ``span`` is the bytes from offset 0 the plan touches (the region it needs)."""

    runs: U64
    warm: U64
    span: int

    def __post_init__(self) -> None:
        if self.runs.ndim != 3 or self.runs.shape[2] != 3 or self.warm.shape[1:] != (3,):
            raise ConfigError("TxPlan", "runs must be (tx, runs, 3) and warm (n, 3)")

    @property
    def transactions(self) -> int:
        """Number of transactions in the plan."""
        return int(self.runs.shape[0])

    @property
    def per_tx(self) -> int:
        """Stores per transaction."""
        return int(self.runs.shape[1])

    def addresses(self, t: int) -> npt.NDArray[np.int64]:
        """Offsets transaction ``t`` stores to, in order."""
        return _expand(self.runs[t])

    def warm_addresses(self) -> npt.NDArray[np.int64]:
        """Addresses touched before the transactions (the warm-up)."""
        return _expand(self.warm)


def _expand(runs: U64) -> npt.NDArray[np.int64]:
    parts = [int(o) + int(s) * np.arange(int(c), dtype=np.int64) for o, c, s in runs]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def fresh_pages_plan(
    transactions: int, fresh: int, lines: int, seed: int, *, warm_pages: int = 16
) -> TxPlan:
    """Transactions of ``lines`` stores each: ``fresh`` of them to a seeded random line of a page
    no earlier code touched (a new page for every transaction), the others to seeded random lines
    of ``warm_pages`` pages written (warmed) before the first transaction."""
    if transactions < 1:
        raise ConfigError("transactions", "must be at least 1")
    if not 0 <= fresh <= lines:
        raise ConfigError("fresh_pages", f"{fresh} is not in 0..lines ({lines})")
    if warm_pages < 1:
        raise ConfigError("warm_pages", "must be at least 1")
    rng = np.random.default_rng([seed, 0x75C])
    fresh_base = warm_pages * PAGE
    order = rng.permutation(transactions * fresh) if fresh else np.zeros(0, np.int64)
    runs = np.zeros((transactions, lines, 3), np.uint64)
    warm_lines = rng.integers(0, warm_pages * PAGE // LINE, (transactions, lines - fresh))
    fresh_lines = rng.integers(0, PAGE // LINE, (transactions, fresh))
    for t in range(transactions):
        offsets = [fresh_base + int(order[t * fresh + j]) * PAGE + int(fresh_lines[t, j]) * LINE
                   for j in range(fresh)]
        offsets += [int(x) * LINE for x in warm_lines[t]]
        runs[t, :, 0] = rng.permutation(np.array(offsets, np.int64)).astype(np.uint64)
        runs[t, :, 1] = 1
    warm = np.array([[0, warm_pages * PAGE // LINE, LINE]], np.uint64)
    return TxPlan(runs, warm, fresh_base + transactions * fresh * PAGE)


def write_set_plan(transactions: int, lines: int) -> TxPlan:
    """Transactions that each store to ``lines`` consecutive 64-byte lines of a warmed buffer:
    consecutive lines fill the L1 data cache's sets evenly, so the first capacity aborts come
    near sets x ways lines."""
    if transactions < 1 or lines < 1:
        raise ConfigError("lines", "transactions and lines must be at least 1")
    pages = -(-lines * LINE // PAGE)
    runs = np.zeros((transactions, 1, 3), np.uint64)
    runs[:, 0] = (0, lines, LINE)
    warm = np.array([[0, pages * PAGE // LINE, LINE]], np.uint64)
    return TxPlan(runs, warm, pages * PAGE)


# -- the log --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttemptLog:
    """One entry per attempt (and per fallback), in execution order."""

    kind: npt.NDArray[np.uint8]
    tx: npt.NDArray[np.int64]
    status: npt.NDArray[np.uint32]
    cycles: npt.NDArray[np.int64]

    @classmethod
    def decode(cls, words: npt.ArrayLike) -> AttemptLog:
        """From the raw log: pairs of u64 (see the module docstring)."""
        w = np.asarray(words, np.uint64).reshape(-1, 2)
        head = w[:, 0]
        kind = (head >> np.uint64(56)).astype(np.uint8)
        if len(kind) and int(kind.max()) > KIND_FALLBACK:
            raise ConfigError("log", f"entry kind {int(kind.max())} is not 0, 1 or 2")
        return cls(
            kind,
            ((head >> np.uint64(32)) & np.uint64(0xFFFFFF)).astype(np.int64),
            (head & np.uint64(0xFFFFFFFF)).astype(np.uint32),
            w[:, 1].astype(np.int64),
        )

    def __len__(self) -> int:
        return len(self.kind)

    def summary(self) -> dict[str, float | int]:
        """Attempts, commits, fallbacks, aborts by status bit (an abort counts under every bit
        set in its status; ``abort_zero`` counts status 0), abort rate, commit cycles."""
        aborts = self.kind == KIND_ABORT
        commits = self.kind == KIND_COMMIT
        status = self.status[aborts]
        out: dict[str, float | int] = {
            "attempts": int(aborts.sum() + commits.sum()),
            "commits": int(commits.sum()),
            "fallbacks": int((self.kind == KIND_FALLBACK).sum()),
            "aborts": int(aborts.sum()),
        }
        for name, bit in STATUS_BITS.items():
            out[f"abort_{name}"] = int((status & bit != 0).sum())
        out["abort_zero"] = int((status == 0).sum())
        out["abort_rate"] = out["aborts"] / out["attempts"] if out["attempts"] else 0.0
        cyc = self.cycles[commits]
        out["commit_cycles_median"] = float(np.median(cyc)) if len(cyc) else float("nan")
        out["commit_cycles_mean"] = float(cyc.mean()) if len(cyc) else float("nan")
        return out

    def aborts_per_tx(self, transactions: int) -> npt.NDArray[np.int64]:
        """Aborted attempts of each transaction (summed over rounds)."""
        return np.bincount(self.tx[self.kind == KIND_ABORT], minlength=transactions)


def describe_status(status: int) -> str:
    """``"retry|conflict"``, ``"0"`` for status 0, with the XABORT code when bit 0 is set."""
    if status == 0:
        return "0"
    names = [name for name, bit in STATUS_BITS.items() if status & bit]
    if status & XABORT_EXPLICIT:
        names[names.index("xabort")] = f"xabort({status >> 24 & 0xFF:#x})"
    return "|".join(names) if names else f"{status:#x}"
