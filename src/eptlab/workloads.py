"""Seeded synthetic access streams, generated with numpy chunk by chunk.

Every workload is a frozen dataclass of parameters. ``stream(base, accesses, chunk)`` yields
:class:`~eptlab.traces.TraceChunk` s of guest-virtual addresses ``base + offset`` with
``0 <= offset`` and ``offset + size <= footprint``.

Randomness is counter-based: access *i* draws from a hash (splitmix64) of the seed, the
workload's name, a channel and *i*. So a stream is a pure function of (parameters, seed): the
chunk size does not change it, :meth:`SyntheticWorkload.chunk_at` can start anywhere, and
different seeds give different streams. Sequential and strided *offsets* use no randomness (they
start at offset 0 for every seed); only their read/write mix is seeded.

Limits: ``footprint <= 2**40`` bytes (1 TiB) and access indices below ``2**47``.
"""

from __future__ import annotations

import math
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import MISSING, dataclass, fields
from functools import cached_property
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from .errors import ConfigError
from .traces.model import TraceChunk

__all__ = [
    "FETCH_BYTES",
    "MAX_FOOTPRINT",
    "PAGE",
    "WORKLOADS",
    "Gups",
    "Mixed",
    "PointerChase",
    "Sequential",
    "Strided",
    "SyntheticWorkload",
    "UniformRandom",
    "Workload",
    "Zipf",
    "make_workload",
]

PAGE = 4096
MAX_FOOTPRINT = 1 << 40
MAX_ACCESSES = 1 << 47
FETCH_BYTES = 16  # size of one instruction fetch in Mixed

READ, WRITE, FETCH = 0, 1, 2

U64 = npt.NDArray[np.uint64]
I8 = npt.NDArray[np.int8]
I32 = npt.NDArray[np.int32]
Generated = tuple[U64, I8, I32]  # offsets, kinds, sizes

_MASK = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_C1 = 0xBF58476D1CE4E5B9
_C2 = 0x94D049BB133111EB


# --- counter-based randomness -----------------------------------------------------------------


def _mix_int(z: int) -> int:
    """splitmix64 finalizer on a Python int."""
    z &= _MASK
    z = ((z ^ (z >> 30)) * _C1) & _MASK
    z = ((z ^ (z >> 27)) * _C2) & _MASK
    return z ^ (z >> 31)


def _mix(z: U64) -> U64:
    """splitmix64 finalizer, elementwise (uint64 arithmetic wraps)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_C1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_C2)
    return z ^ (z >> np.uint64(31))


def _key(seed: int, *labels: str | int) -> int:
    """A 64-bit stream key from a seed and labels (stable across processes)."""
    key = _mix_int(seed & _MASK ^ _GAMMA)
    for label in labels:
        value = zlib.crc32(label.encode()) if isinstance(label, str) else label
        key = _mix_int(key ^ _mix_int(value + _GAMMA))
    return key


def _rand(key: int, idx: U64) -> U64:
    """Uniform 64-bit values for the counters ``idx`` of stream ``key``."""
    return _mix(idx * np.uint64(_GAMMA) + np.uint64(key))


def _below(key: int, idx: U64, n: int) -> U64:
    """Uniform integers in ``[0, n)`` (modulo bias below 2**-24 for n <= 2**40)."""
    return _rand(key, idx) % np.uint64(n)


def _unit(key: int, idx: U64) -> npt.NDArray[np.float64]:
    """Uniform floats in ``[0, 1)`` with 53 random bits."""
    return (_rand(key, idx) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _mulmod(a: U64, b: int, m: int) -> U64:
    """``a * b mod m`` for ``a, b < m <= 2**40`` without 64-bit overflow."""
    lo = (a * np.uint64(b & 0xFFFFF)) % np.uint64(m)
    hi = (a * np.uint64(b >> 20)) % np.uint64(m)
    hi = (hi * np.uint64(1 << 20)) % np.uint64(m)
    return (hi + lo) % np.uint64(m)


@dataclass(frozen=True)
class _Bijection:
    """A seeded pseudo-random permutation of ``[0, n)``: Feistel network plus cycle walking."""

    n: int
    key: int
    rounds: int = 6

    def __call__(self, x: U64) -> U64:
        if self.n <= 1:
            return np.zeros_like(x)
        y = self._permute(x)
        bad = np.flatnonzero(y >= np.uint64(self.n))
        while bad.size:  # cycle walking: at most a few passes, each vectorized
            y[bad] = self._permute(y[bad])
            bad = bad[y[bad] >= np.uint64(self.n)]
        return y

    def _permute(self, x: U64) -> U64:
        half = ((self.n - 1).bit_length() + 1) // 2
        mask, shift = np.uint64((1 << half) - 1), np.uint64(half)
        left, right = x >> shift, x & mask
        for r in range(self.rounds):
            left, right = right, left ^ (_rand(_key(self.key, r), right) & mask)
        return (left << shift) | right


# --- validation -------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if not isinstance(value, int | np.integer) or isinstance(value, bool | np.bool_):
        raise ConfigError(name, f"must be an integer, got {value!r}")
    v = int(value)
    if v < low or (high is not None and v > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(name, f"must be {bound}, got {v}")
    return v


def _check_fraction(name: str, value: object) -> float:
    if not isinstance(value, int | float | np.integer | np.floating) or isinstance(value, bool):
        raise ConfigError(name, f"must be a number, got {value!r}")
    v = float(value)
    if not 0.0 <= v <= 1.0:  # also rejects NaN
        raise ConfigError(name, f"must be in [0, 1], got {value!r}")
    return v


def _check_pow2(name: str, value: object, high: int) -> int:
    v = _check_int(name, value, 1, high)
    if v & (v - 1):
        raise ConfigError(name, f"must be a power of two, got {v}")
    return v


# --- the protocol and the common base ---------------------------------------------------------


@runtime_checkable
class Workload(Protocol):
    """Anything that yields an access stream."""

    name: ClassVar[str]

    def stream(self, base: int, accesses: int, chunk: int = 1 << 20) -> Iterator[TraceChunk]:
        """Yield ``accesses`` accesses at ``base + offset`` in chunks of at most ``chunk``."""
        ...


@dataclass(frozen=True, kw_only=True)
class SyntheticWorkload(ABC):
    """Base of the synthetic workloads: ``footprint`` bytes (multiple of 4096), ``seed``."""

    name: ClassVar[str] = ""

    footprint: int
    seed: int = 0

    def __post_init__(self) -> None:
        fp = _check_int("footprint", self.footprint, 1, MAX_FOOTPRINT)
        if fp % PAGE:
            raise ConfigError("footprint", f"must be a multiple of {PAGE}, got {fp}")
        if not _is_int(self.seed):
            raise ConfigError("seed", f"must be an integer, got {self.seed!r}")

    def stream(self, base: int, accesses: int, chunk: int = 1 << 20) -> Iterator[TraceChunk]:
        """Yield accesses ``0 .. accesses-1`` in chunks of at most ``chunk``."""
        base = self._check_base(base)
        total = _check_int("accesses", accesses, 0, MAX_ACCESSES)
        step = _check_int("chunk", chunk, 1)
        return self._chunks(base, total, step)

    def chunk_at(self, base: int, start: int, count: int) -> TraceChunk:
        """Accesses ``start .. start+count-1`` of the stream (what ``stream`` would yield)."""
        base = self._check_base(base)
        start = _check_int("start", start, 0, MAX_ACCESSES)
        count = _check_int("count", count, 0, MAX_ACCESSES - start)
        return self._make(base, start, count)

    def _check_base(self, base: int) -> int:
        return _check_int("base", base, 0, (1 << 64) - self.footprint)

    def _chunks(self, base: int, total: int, step: int) -> Iterator[TraceChunk]:
        for start in range(0, total, step):
            yield self._make(base, start, min(step, total - start))

    def _make(self, base: int, start: int, count: int) -> TraceChunk:
        idx = np.arange(start, start + count, dtype=np.uint64)
        offsets, kinds, sizes = self._generate(idx)
        address = (offsets + np.uint64(base)).view(np.int64)  # high half -> negative, as lackey
        return TraceChunk(address=address, kind=kinds, size=sizes)

    @abstractmethod
    def _generate(self, idx: U64) -> Generated:
        """Offsets, kinds and sizes of the accesses with indices ``idx`` (any order)."""

    def _stream_key(self, channel: str) -> int:
        return _key(int(self.seed), self.name, channel)


@dataclass(frozen=True, kw_only=True)
class _DataWorkload(SyntheticWorkload):
    """Reads and writes: each access is a write with probability ``write_fraction``."""

    write_fraction: float = 0.0
    access_size: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_fraction("write_fraction", self.write_fraction)
        _check_pow2("access_size", self.access_size, PAGE)

    def _generate(self, idx: U64) -> Generated:
        kinds = (_unit(self._stream_key("kind"), idx) < float(self.write_fraction)).astype(np.int8)
        sizes = np.full(idx.shape, self.access_size, dtype=np.int32)
        return self._offsets(idx), kinds, sizes

    @abstractmethod
    def _offsets(self, idx: U64) -> U64:
        """Offsets of the accesses with indices ``idx``."""


def _strided(idx: U64, stride: int, footprint: int) -> U64:
    return _mulmod(idx % np.uint64(footprint), stride % footprint, footprint)


# --- the workloads ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Sequential(_DataWorkload):
    """Offsets 0, access_size, 2*access_size, ... wrapping around the footprint."""

    name: ClassVar[str] = "sequential"

    def _offsets(self, idx: U64) -> U64:
        return _strided(idx, self.access_size, self.footprint)


@dataclass(frozen=True, kw_only=True)
class Strided(_DataWorkload):
    """Offset ``i * stride mod footprint`` (stride a positive multiple of access_size)."""

    name: ClassVar[str] = "strided"

    stride: int = PAGE

    def __post_init__(self) -> None:
        super().__post_init__()
        stride = _check_int("stride", self.stride, 1)
        if stride % self.access_size:
            raise ConfigError(
                "stride", f"must be a multiple of access_size {self.access_size}, got {stride}"
            )

    def _offsets(self, idx: U64) -> U64:
        return _strided(idx, self.stride, self.footprint)


@dataclass(frozen=True, kw_only=True)
class UniformRandom(_DataWorkload):
    """Independent uniform offsets over the footprint, aligned to access_size."""

    name: ClassVar[str] = "random"

    def _offsets(self, idx: U64) -> U64:
        slots = self.footprint // self.access_size
        return _below(self._stream_key("offset"), idx, slots) * np.uint64(self.access_size)


@dataclass(frozen=True, kw_only=True)
class Zipf(_DataWorkload):
    """Zipf(alpha) over 4 KiB pages: page of rank r (0 hottest) has weight ``(r+1)**-alpha``.

    Ranks map to pages through a fixed seeded bijection, so hot pages are scattered over the
    footprint; the offset inside the page is uniform (aligned to access_size). The 65536 hottest
    ranks are sampled exactly, colder ranks from the continuous power law (midpoint rule).
    """

    name: ClassVar[str] = "zipf"
    HEAD: ClassVar[int] = 1 << 16

    alpha: float = 1.2

    def __post_init__(self) -> None:
        super().__post_init__()
        ok = isinstance(self.alpha, int | float | np.integer | np.floating)
        if not ok or isinstance(self.alpha, bool) or not 0 < float(self.alpha) < math.inf:
            raise ConfigError("alpha", f"must be a positive finite number, got {self.alpha!r}")

    @cached_property
    def _table(self) -> tuple[npt.NDArray[np.float64], float]:
        """Cumulative weights of the head ranks and the total weight (head + tail)."""
        pages, a = self.footprint // PAGE, float(self.alpha)
        head = min(pages, self.HEAD)
        cdf = np.cumsum(np.arange(1, head + 1, dtype=np.float64) ** -a)
        return cdf, float(cdf[-1]) + self._tail_integral(head + 0.5, pages + 0.5)

    def _tail_integral(self, lo: float, hi: float) -> float:
        a = float(self.alpha)
        if hi <= lo:
            return 0.0
        if a == 1.0:
            return math.log(hi / lo)
        return float((hi ** (1 - a) - lo ** (1 - a)) / (1 - a))

    def ranks(self, idx: U64) -> U64:
        """Popularity rank (0 = hottest) drawn by the accesses ``idx``."""
        pages, a = self.footprint // PAGE, float(self.alpha)
        cdf, total = self._table
        u = _unit(self._stream_key("rank"), idx) * total
        rank = np.minimum(np.searchsorted(cdf, u, side="right"), cdf.size - 1).astype(np.uint64)
        tail = u >= cdf[-1]
        if tail.any():
            v, lo, hi = u[tail] - cdf[-1], cdf.size + 0.5, pages + 0.5
            if a == 1.0:
                x = lo * np.exp(v)
            else:  # invert the integral of t**-a from lo to x; clamp rounding into [lo, hi]
                ends = sorted((lo ** (1 - a), hi ** (1 - a)))
                x = np.clip(lo ** (1 - a) + (1 - a) * v, *ends) ** (1 / (1 - a))
            r = np.floor(x + 0.5) - 1
            rank[tail] = np.clip(r, cdf.size, pages - 1).astype(np.uint64)
        return rank

    def page_of_rank(self, rank: U64) -> U64:
        """Page index (within the footprint) of each popularity rank."""
        return _Bijection(self.footprint // PAGE, self._stream_key("pages"))(rank)

    def _offsets(self, idx: U64) -> U64:
        page = self.page_of_rank(self.ranks(idx))
        inside = _below(self._stream_key("inside"), idx, PAGE // self.access_size)
        return page * np.uint64(PAGE) + inside * np.uint64(self.access_size)


@dataclass(frozen=True, kw_only=True)
class PointerChase(_DataWorkload):
    """A dependent chain over ``footprint // node_size`` nodes in one random cycle.

    Access *i* touches the first ``access_size`` bytes of node ``order(i mod nodes)``, where
    ``order`` is a seeded pseudo-random permutation (Feistel network, computed on the fly: no
    table, no cap on the node count). ``successors()`` materializes the next-pointer table.
    """

    name: ClassVar[str] = "pointer-chase"

    node_size: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        size = _check_int("node_size", self.node_size, 1, self.footprint)
        if size % self.access_size:
            raise ConfigError(
                "node_size", f"must be a multiple of access_size {self.access_size}, got {size}"
            )

    @property
    def nodes(self) -> int:
        """Number of nodes in the cycle."""
        return self.footprint // self.node_size

    def order(self, position: U64) -> U64:
        """Node visited at each cycle position (positions taken modulo ``nodes``)."""
        return _Bijection(self.nodes, self._stream_key("cycle"))(position % np.uint64(self.nodes))

    def successors(self) -> npt.NDArray[np.int64]:
        """``next[node]``: the node the chain visits after ``node`` (O(nodes) memory)."""
        positions = np.arange(self.nodes, dtype=np.uint64)
        here = self.order(positions)
        nxt = np.empty(self.nodes, dtype=np.int64)
        nxt[here.astype(np.int64)] = np.roll(here, -1).astype(np.int64)
        return nxt

    def _offsets(self, idx: U64) -> U64:
        return self.order(idx) * np.uint64(self.node_size)


@dataclass(frozen=True, kw_only=True)
class Gups(SyntheticWorkload):
    """HPCC RandomAccess: update *u* reads then writes one random ``access_size`` word.

    Access ``2u`` is the read and ``2u + 1`` the write, at the same address.
    """

    name: ClassVar[str] = "gups"

    access_size: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_pow2("access_size", self.access_size, PAGE)

    def _generate(self, idx: U64) -> Generated:
        update = idx >> np.uint64(1)
        words = self.footprint // self.access_size
        offsets = _below(self._stream_key("word"), update, words) * np.uint64(self.access_size)
        kinds = (idx & np.uint64(1)).astype(np.int8)
        return offsets, kinds, np.full(idx.shape, self.access_size, dtype=np.int32)


Phase = tuple[SyntheticWorkload, int | float]


@dataclass(frozen=True, kw_only=True)
class Mixed(SyntheticWorkload):
    """A server-like stream: data phases cycled, interleaved with instruction fetches.

    Layout: code is the *last* ``code_bytes`` of the footprint; the data phases run at offsets
    ``[0, footprint - code_bytes)`` (each phase's own footprint must fit there).

    ``phases`` is a sequence of ``(workload, length)``: an int length is a number of data
    accesses, a float in (0, 1] a fraction of ``period``. The phases run in order and repeat; each
    phase's workload resumes where it stopped. Empty ``phases`` means the default: Zipf reads
    (0.5), a sequential scan (0.3), uniform random writes (0.2) over the whole data region.

    Fetches: in every block of 64 accesses, ``fetch_fraction`` of them (spread exactly over
    blocks, at seeded random positions) are 16-byte fetches that run sequentially through the
    code and jump to a random 16-byte slot every ``jump_every`` fetches.
    """

    name: ClassVar[str] = "mixed"
    BLOCK: ClassVar[int] = 64
    _Q: ClassVar[int] = 1 << 16  # fetch_fraction resolution

    phases: Sequence[Phase] = ()
    period: int = 1 << 16
    code_bytes: int = 256 << 10
    fetch_fraction: float = 0.3
    jump_every: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        code = _check_int("code_bytes", self.code_bytes, PAGE, self.footprint - PAGE)
        if code % PAGE:
            raise ConfigError("code_bytes", f"must be a multiple of {PAGE}, got {code}")
        _check_fraction("fetch_fraction", self.fetch_fraction)
        _check_int("period", self.period, 1)
        _check_int("jump_every", self.jump_every, 1)
        object.__setattr__(self, "phases", self._checked_phases())

    @property
    def data_bytes(self) -> int:
        """Size of the data region ``[0, footprint - code_bytes)``."""
        return self.footprint - self.code_bytes

    def _checked_phases(self) -> tuple[Phase, ...]:
        if isinstance(self.phases, str | bytes) or not isinstance(self.phases, Sequence):
            raise ConfigError(
                "phases", f"must be a sequence of (workload, length), got {self.phases!r}"
            )
        if not self.phases:
            return self._default_phases()
        checked: list[Phase] = []
        for i, item in enumerate(self.phases):
            if not isinstance(item, Sequence) or len(item) != 2:
                raise ConfigError("phases", f"phase {i} must be (workload, length), got {item!r}")
            workload, length = item
            if not isinstance(workload, SyntheticWorkload):
                raise ConfigError("phases", f"phase {i}: not a synthetic workload: {workload!r}")
            if workload.footprint > self.data_bytes:
                raise ConfigError(
                    "phases",
                    f"phase {i}: footprint {workload.footprint} exceeds the data region "
                    f"{self.data_bytes} (footprint - code_bytes)",
                )
            if _is_int(length):
                _check_int(f"phases[{i}]", length, 1)
                checked.append((workload, int(length)))
            else:
                frac = _check_fraction(f"phases[{i}]", length)
                if round(frac * self.period) < 1:
                    raise ConfigError(f"phases[{i}]", f"fraction {frac} of period is empty")
                checked.append((workload, frac))
        return tuple(checked)

    def _default_phases(self) -> tuple[Phase, ...]:
        data, seed = self.data_bytes, int(self.seed)
        return (
            (Zipf(footprint=data, seed=_key(seed, "mixed-zipf") >> 1), 0.5),
            (Sequential(footprint=data, seed=_key(seed, "mixed-scan") >> 1), 0.3),
            (
                UniformRandom(footprint=data, seed=_key(seed, "mixed-w") >> 1, write_fraction=1.0),
                0.2,
            ),
        )

    @property
    def phase_lengths(self) -> tuple[int, ...]:
        """Data accesses per phase in one cycle."""
        return tuple(n if isinstance(n, int) else round(n * self.period) for _, n in self.phases)

    def _fetches_before(self, block: U64) -> U64:
        q = round(float(self.fetch_fraction) * self._Q)
        return (block * np.uint64(self.BLOCK * q)) >> np.uint64(16)

    def _split(self, idx: U64) -> tuple[npt.NDArray[np.bool_], U64]:
        """Whether each access is a fetch, and its index among fetches or among data accesses."""
        block, pos = idx // np.uint64(self.BLOCK), (idx % np.uint64(self.BLOCK)).astype(np.intp)
        blocks, row = np.unique(block, return_inverse=True)
        cells = blocks[:, None] * np.uint64(self.BLOCK) + np.arange(self.BLOCK, dtype=np.uint64)
        rank = np.argsort(np.argsort(_rand(self._stream_key("interleave"), cells), axis=1), axis=1)
        first = self._fetches_before(blocks)
        count = (self._fetches_before(blocks + np.uint64(1)) - first).astype(np.intp)
        is_fetch = rank < count[:, None]
        before: npt.NDArray[np.intp] = np.cumsum(is_fetch, axis=1, dtype=np.intp) - is_fetch
        fetch = is_fetch[row, pos]
        fetches_before = first[row] + before[row, pos].astype(np.uint64)
        return fetch, np.where(fetch, fetches_before, idx - fetches_before)

    def _generate(self, idx: U64) -> Generated:
        offsets = np.empty(idx.shape, dtype=np.uint64)
        kinds = np.empty(idx.shape, dtype=np.int8)
        sizes = np.empty(idx.shape, dtype=np.int32)
        step = 1 << 16  # bounds the per-block tables when idx is scattered
        for lo in range(0, idx.size, step):
            part = slice(lo, lo + step)
            fetch, sub = self._split(idx[part])
            o, k, s = offsets[part], kinds[part], sizes[part]
            o[fetch], k[fetch], s[fetch] = self._code(sub[fetch]), FETCH, FETCH_BYTES
            data = ~fetch
            o[data], k[data], s[data] = self._data(sub[data])
        return offsets, kinds, sizes

    def _code(self, j: U64) -> U64:
        slots = self.code_bytes // FETCH_BYTES
        run = j // np.uint64(self.jump_every)
        start = _below(self._stream_key("jump"), run, slots)
        slot = (start + j % np.uint64(self.jump_every)) % np.uint64(slots)
        return np.uint64(self.data_bytes) + slot * np.uint64(FETCH_BYTES)

    def _data(self, d: U64) -> Generated:
        lengths = np.array(self.phase_lengths, dtype=np.uint64)
        starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.uint64)
        cycle, within = d // starts[-1], d % starts[-1]
        phase = np.searchsorted(starts, within, side="right") - 1
        offsets = np.empty(d.shape, dtype=np.uint64)
        kinds = np.empty(d.shape, dtype=np.int8)
        sizes = np.empty(d.shape, dtype=np.int32)
        for k, (workload, _) in enumerate(self.phases):
            sel = phase == k
            if sel.any():
                local = cycle[sel] * lengths[k] + (within[sel] - starts[k])
                offsets[sel], kinds[sel], sizes[sel] = workload._generate(local)
        return offsets, kinds, sizes


# --- registry ---------------------------------------------------------------------------------

WORKLOADS: dict[str, type[SyntheticWorkload]] = {
    cls.name: cls for cls in (Sequential, Strided, UniformRandom, Zipf, PointerChase, Gups, Mixed)
}


def make_workload(name: str, **params: Any) -> Workload:
    """Build the workload registered as ``name``; bad names and parameters raise ConfigError."""
    cls = WORKLOADS.get(name)
    if cls is None:
        raise ConfigError("name", f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
    known = {f.name: f for f in fields(cls) if f.init}
    for param in params:
        if param not in known:
            raise ConfigError(
                param, f"unknown parameter of {name!r}; known: {', '.join(sorted(known))}"
            )
    for f in known.values():
        if f.name not in params and f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(f.name, f"required by {name!r}")
    workload: Workload = cls(**params)
    return workload
