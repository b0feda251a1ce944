"""The prime+probe attacker: eviction sets from its own timings, rounds, and its decision.

It holds only a :class:`~eptlab.apps.prime_probe.Knowledge` and an
:class:`~eptlab.apps.prime_probe.Oracle`.

Eviction sets. *LLC*: for the cache-line column of the secret's data line (the line offset
``o`` inside a 4 KiB page, which it knows), it takes line ``o`` of its first 4 KiB page in every
2 MiB chunk and splits these lines into congruence classes by timing alone: the group-testing
reduction of Vila, Köpf and Morales ("Theory and Practice of Finding Eviction Sets", IEEE S&P
2019) finds ``ways`` lines that evict a line, then every other line the set evicts joins its
class. It then guesses that the same chunks stay congruent at every other page of the chunk
(true when the host backs whole 2 MiB pages and the slice hash is linear) and keeps, per page
and class, the ``ways`` lines that a timing test confirms evict one more line of the class.
Under a 4 KiB EPT layout the chunks' lines land in random host frames, the classes are too
small to evict anything and it builds none. *L1*: for every other line offset, ``ways + 1``
lines at that offset of its first chunk's pages, kept when the timing test confirms them.

Rounds. Prime (a pass over every set), let the victim run, probe (a pass over the L1 sets, then
the LLC sets; a pass is the next round's prime). A set is active when one of its lines is slower
than halfway between the level that should hold it and the one below. The L1 set of the LLC
column is left out (the LLC pass evicts it).

Decision. For every candidate slot it predicts, from the same knowledge the exact attacker uses
(:meth:`eptlab.apps.cache_attacker.Attacker.predict`), the L1 set (line offset) of each walk
reference whose offset depends on the slot, and which of its LLC eviction sets could hold the
data line (those whose known host-index bits agree with the candidate's). Each prediction is
scored per round as naive Bayes: active counts ``log((1 - miss) / q)``, inactive
``log(miss / (1 - q))``, with ``q`` the observed share of active sets of that cache (for the
LLC, the chance that any of the compatible sets is active) and ``miss`` the attacker's assumed
chance that a touched set reads inactive. Candidates are ranked by score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..arch.bits import PAGE_SIZE
from ..guest import DIRECT_MAP_BASE
from .cache_attacker import Attacker, SetIndex
from .llc_slices import SliceHash
from .prime_probe import CHUNK, Knowledge, Oracle

B = npt.NDArray[np.bool_]
F64 = npt.NDArray[np.float64]
U64 = npt.NDArray[np.uint64]
PAGES_PER_CHUNK = CHUNK // PAGE_SIZE
LINE_OFFSETS = PAGE_SIZE >> 6


@dataclass(frozen=True)
class Predictions:
    """What the attacker predicts for every candidate (see :meth:`PrimeProbeAttacker.
    predictions`)."""

    l1: npt.NDArray[np.int64]  # [n, features]: L1 set, -1 unobserved
    llc_rows: B  # [u, evsets]: distinct masks of the sets that could hold the data line
    llc_of: npt.NDArray[np.int64]  # [n]: each candidate's row


class PrimeProbeAttacker:
    """Prime+probe on the L1 (all line offsets) and on one LLC column, from timings only."""

    def __init__(self, know: Knowledge, oracle: Oracle, *, miss: float = 0.05) -> None:
        self.know, self.oracle, self.miss = know, oracle, miss
        self.column = (know.target.offset >> 6) % LINE_OFFSETS
        self.l1_threshold = self.llc_threshold = 0.0  # set by calibrate()
        self.classes: list[list[int]] = []  # chunk indices of each congruence class
        self.evsets: list[list[int]] = []  # LLC eviction sets (GVAs)
        self.l1_sets: dict[int, list[int]] = {}  # line offset -> L1 eviction set
        self.tests = 0  # timing tests made while building

    # -- eviction sets --------------------------------------------------------------------------

    def _evicts(self, lines: list[int], x: int, threshold: float) -> bool:
        """Whether reading ``lines`` after ``x`` makes ``x`` slow again (``x`` evicted)."""
        self.tests += 1
        return self.oracle.time([x, *lines, x])[-1] >= threshold

    def _reduce(self, pool: list[int], x: int) -> list[int] | None:
        """``ways`` lines of ``pool`` that evict ``x`` (Vila et al.'s group test), or None."""
        ways = self.know.llc_ways
        if len(pool) < ways or not self._evicts(pool, x, self.llc_threshold):
            return None
        lines = list(pool)
        while len(lines) > ways:
            groups = np.array_split(np.arange(len(lines)), ways + 1)
            for group in groups:
                drop = set(group.tolist())
                rest = [v for i, v in enumerate(lines) if i not in drop]
                if len(rest) >= ways and self._evicts(rest, x, self.llc_threshold):
                    lines = rest
                    break
            else:
                return None
        return lines

    def _split(self, lines: list[int]) -> list[list[int]]:
        """Congruence classes (indices into ``lines``) of at least ``ways + 1`` lines."""
        ways = self.know.llc_ways
        left = list(range(len(lines)))
        classes = []
        while len(left) > ways:
            x, pool = left[0], left[1:]
            found = self._reduce([lines[i] for i in pool], lines[x])
            if found is None:
                left.pop(0)
                continue
            chosen = {lines.index(v) for v in found}
            members = [x, *sorted(chosen)]
            members += [i for i in pool if i not in chosen
                        and self._evicts(found, lines[i], self.llc_threshold)]
            classes.append(members)
            left = [i for i in left if i not in set(members)]
        return classes

    def calibrate(self) -> None:
        """Time a line read twice: the second read is an L1 hit plus whatever its translation
        costs; the thresholds sit halfway between the published latencies above that."""
        l1, l2, llc, dram = self.know.latencies
        x = self.know.line(0, self.column * 64)
        base = min(self.oracle.time([x] * 8)[1:]) - l1
        self.l1_threshold = base + (l1 + l2) / 2
        self.llc_threshold = base + (llc + dram) / 2

    def _distinct(self, candidates: list[tuple[int, list[int]]]) -> list[list[int]]:
        """Drop candidate sets congruent with one kept before (a timing test each), among
        candidates whose page bits below the slice bits agree (``key``)."""
        kept: dict[int, list[list[int]]] = {}
        for key, lines in candidates:
            same = kept.setdefault(key, [])
            if not any(self._evicts(other, lines[0], self.llc_threshold) for other in same):
                same.append(lines)
        return [lines for group in kept.values() for lines in group]

    def build(self) -> None:
        """Find the LLC eviction sets of the data line's column and the L1 eviction sets."""
        self.calibrate()
        know, ways = self.know, self.know.llc_ways
        inner = know.llc_sets.bit_length() - 1 - SliceHash.named(know.slice_hash).bits
        at = self.column * 64
        first = [know.line(c, at) for c in range(know.chunks)]
        self.classes = self._split(first)
        candidates = []
        for page in range(PAGES_PER_CHUNK):
            offset = page * PAGE_SIZE + at
            for members in self.classes:
                lines = [know.line(c, offset) for c in members[: ways + 1]]
                if self._evicts(lines[:ways], lines[ways], self.llc_threshold):
                    candidates.append((offset >> 6 & ((1 << inner) - 1), lines[:ways]))
        # with a slice hash, sets of different classes and pages can be the same cache set
        self.evsets = self._distinct(candidates) if len(self.classes) > 1 else [
            lines for _, lines in candidates]
        w1 = know.l1_ways
        for o in range(LINE_OFFSETS):
            if o == self.column:
                continue
            lines = [know.line(0, p * PAGE_SIZE + o * 64) for p in range(w1 + 1)]
            if self._evicts(lines[:w1], lines[w1], self.l1_threshold):
                self.l1_sets[o] = lines[:w1]

    # -- measuring ------------------------------------------------------------------------------

    def _pass(self) -> tuple[B, B]:
        """Probe (and so prime) every L1 set, then every LLC set: which read as active."""
        l1_lines = [v for o in sorted(self.l1_sets) for v in self.l1_sets[o]]
        llc_lines = [v for s in self.evsets for v in s]
        l1_times = np.array(self.oracle.time(l1_lines), np.int64)
        llc_times = np.array(self.oracle.time(llc_lines), np.int64)
        l1 = np.zeros(LINE_OFFSETS, bool)
        if l1_lines:
            slow = l1_times.reshape(len(self.l1_sets), -1).max(axis=1) >= self.l1_threshold
            l1[sorted(self.l1_sets)] = slow
        llc = np.zeros(len(self.evsets), bool)
        if llc_lines:
            llc = llc_times.reshape(len(self.evsets), -1).max(axis=1) >= self.llc_threshold
        return l1, llc

    def observe(self, rounds: int) -> tuple[B, B, list[int]]:
        """Prime, then ``rounds`` times: victim, probe. Returns the active L1 sets and LLC
        sets of each round (``[rounds, 64]``, ``[rounds, evsets]``) and each round's time."""
        self._pass()
        l1 = np.zeros((rounds, LINE_OFFSETS), bool)
        llc = np.zeros((rounds, len(self.evsets)), bool)
        times = []
        for r in range(rounds):
            self.oracle.trigger()
            l1[r], llc[r] = self._pass()
            times.append(self.oracle.now())
        return l1, llc, times

    # -- deciding -------------------------------------------------------------------------------

    def _index(self, mask: int, value: U64) -> tuple[int, npt.NDArray[np.int64]]:
        """Known LLC-index bits (``slice << inner | inner index``) of partly known HPAs."""
        know = self.know
        slices = SliceHash.named(know.slice_hash)
        inner = know.llc_sets.bit_length() - 1 - slices.bits
        imask = (mask >> 6) & ((1 << inner) - 1)
        ivalue = ((value >> np.uint64(6)) & np.uint64(imask)).astype(np.int64)
        if slices.bits and mask & slices.input_mask == slices.input_mask:
            imask |= (slices.slices - 1) << inner
            ivalue |= slices.of_array(value) << inner
        return imask, ivalue

    def predictions(self) -> Predictions:
        """Per candidate: the L1 set of each slot-dependent walk reference (``[n, f]``, -1 where
        unobserved), and which LLC eviction sets could hold its data line, as rows of distinct
        set masks (``[u, evsets]``) and each candidate's row."""
        know = self.know
        exact = Attacker(know.target, know.layout, know.offset, SetIndex(1 << 15), know.probes,
                         channel="walk+data", noise=0.5)
        n = len(exact.candidates)
        l1_columns = []
        llc = np.ones((n, len(self.evsets)), bool)
        for probe in know.probes:
            mask, value = exact.predict(probe)
            if probe.dim == "data" and self.evsets:
                cmask, cvalue = self._index(mask, value)
                own = np.array([set_[0] - DIRECT_MAP_BASE for set_ in self.evsets],
                               np.uint64)
                omask, ovalue = self._index(*know.layout.known_hpa(own, know.offset))
                both = cmask & omask
                llc = ((cvalue[:, None] ^ ovalue[None, :]) & both) == 0
            if mask & 0xFC0 != 0xFC0:
                continue
            offsets = ((value >> np.uint64(6)) & np.uint64(63)).astype(np.int64)
            if np.all(offsets == offsets[0]):
                continue
            offsets[~np.isin(offsets, list(self.l1_sets))] = -1
            l1_columns.append(offsets)
        l1 = np.stack(l1_columns, axis=1) if l1_columns else np.zeros((n, 0), np.int64)
        packed = np.packbits(llc, axis=1)
        _, first, inverse = np.unique(packed.view(f"V{packed.shape[1]}").ravel() if
                                      packed.shape[1] else np.zeros(n, np.int8),
                                      return_index=True, return_inverse=True)
        return Predictions(l1, llc[first], inverse.ravel())

    def scores(self, l1_active: B, llc_active: B, k: int,
               predicted: Predictions | None = None) -> F64:
        """Naive-Bayes score of every candidate after the first ``k`` rounds."""
        pred = predicted if predicted is not None else self.predictions()
        l1_pred = pred.l1
        n = l1_pred.shape[0]
        score = np.zeros(n, np.float64)
        if k == 0:
            return score
        observed = sorted(self.l1_sets)
        if observed and l1_pred.shape[1]:
            q = float(np.clip(l1_active[:k, observed].mean(), 1e-3, 1 - 1e-3))
            on, off = np.log((1 - self.miss) / q), np.log(self.miss / (1 - q))
            counts = np.append(l1_active[:k].sum(axis=0), 0)  # index -1: unobserved
            got = counts[l1_pred]
            seen = l1_pred >= 0
            score += ((got * on + (k - got) * off) * seen).sum(axis=1)
        sets = pred.llc_rows.shape[1]
        if sets:
            q1 = float(np.clip(llc_active[:k].mean(), 1e-3, 1 - 1e-3))
            for u, row in enumerate(pred.llc_rows):
                m = int(row.sum())
                if m in (0, sets):
                    continue  # no set, or every set, could hold it: no information
                q = float(np.clip(1 - (1 - q1) ** m, 1e-3, 1 - 1e-3))
                hits = int(llc_active[:k, row].any(axis=1).sum())
                value = hits * np.log((1 - self.miss) / q) + (k - hits) * np.log(
                    self.miss / (1 - q))
                score[pred.llc_of == u] += value
        return score


def rank_of(score: F64, slot: int) -> tuple[float, float]:
    """Expected rank of ``slot`` (1 = guessed first; ties broken uniformly) and the chance
    that the first guess is ``slot``."""
    s = score[slot]
    above = int((score > s).sum())
    ties = int((score == s).sum())
    return 1 + above + (ties - 1) / 2, (1.0 / ties if above == 0 else 0.0)
