"""Open a trace of any supported format, and summarize one in a single streaming pass."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from ..errors import ConfigError, TraceFormatError
from .champsim import GZIP_MAGIC, XZ_MAGIC, champsim_chunks
from .lackey import lackey_chunks
from .model import TraceChunk
from .native import MAGIC, native_chunks
from .source import Source, open_source

FORMATS = ("lackey", "champsim", "native")
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
MERGE_AT = 1 << 20
"""Page numbers held back before they are merged into the sorted set of distinct pages."""

_SUFFIXES = {
    ".lackey": "lackey",
    ".txt": "lackey",
    ".log": "lackey",
    ".champsim": "champsim",
    ".trace": "champsim",
    ".xz": "champsim",
    ".gz": "champsim",
    ".ept": "native",
}
_LACKEY_LINE = re.compile(rb"^(==\d+==|I  [0-9a-fA-F]+,\d+| [LSM] [0-9a-fA-F]+,\d+)")


def detect_format(path: str | Path) -> str:
    """``"native"``, ``"champsim"`` or ``"lackey"``: by magic bytes first (native magic; xz or
    gzip compression means ChampSim), then by suffix (``.lackey .txt .log`` lackey,
    ``.champsim .trace .xz .gz`` ChampSim, ``.ept`` native), then by a look at the first line
    (lackey text). Raises :class:`TraceFormatError` when none of these tells. Reading a pipe
    consumes it: use :func:`open_trace`, which detects and reads from one opening."""
    with open_source(path) as source:
        return detect(source)


def detect(source: Source) -> str:
    """The format of an opened trace, from its first bytes and its name (see
    :func:`detect_format`)."""
    path, head = source.path, source.head
    if head.startswith(MAGIC):
        return "native"
    if head.startswith(XZ_MAGIC) or head.startswith(GZIP_MAGIC):
        return "champsim"
    by_suffix = _SUFFIXES.get(path.suffix.lower())
    if by_suffix is not None:
        return by_suffix
    first = next((line for line in head.splitlines() if line.strip()), b"")
    if _LACKEY_LINE.match(first):
        return "lackey"
    raise TraceFormatError(
        path,
        0,
        "cannot tell the trace format (no native/xz/gzip magic, no known suffix "
        f"{' '.join(sorted(_SUFFIXES))}, not lackey text)",
        unit="byte",
    )


def open_trace(
    path: str | Path, chunk: int = 1 << 20, *, fmt: str | None = None
) -> Iterator[TraceChunk]:
    """Stream the accesses of a trace in chunks, with the reader its format calls for
    (``fmt`` overrides :func:`detect_format`). The path is opened once, so a pipe or
    ``/dev/stdin`` is read from its first byte."""
    if fmt is not None and fmt not in FORMATS:
        raise ConfigError("format", f"{fmt!r} is not one of {', '.join(FORMATS)}")
    return _stream(path, chunk, fmt, None)


def _stream(
    path: str | Path, chunk: int, fmt: str | None, found: list[str] | None
) -> Iterator[TraceChunk]:
    with open_source(path) as source:
        fmt = detect(source) if fmt is None else fmt
        if found is not None:
            found.append(fmt)
        if fmt == "lackey":
            yield from lackey_chunks(source, chunk)
        elif fmt == "champsim":
            yield from champsim_chunks(source, chunk)
        else:
            yield from native_chunks(source, chunk)


@dataclass(frozen=True)
class TraceInfo:
    """What a trace holds. Addresses are reported as unsigned 64-bit values (the high half is
    above the low half); ``unique_pages`` counts the 4 KiB pages holding the first or the last
    byte of any access (accesses are never longer than a page in these formats)."""

    path: str
    format: str
    accesses: int
    reads: int
    writes: int
    fetches: int
    unique_pages: int
    footprint_bytes: int
    min_address: int | None
    max_address: int | None

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly view."""
        return asdict(self)


def _sorted_unique(values: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """The distinct values, sorted (by a sort: numpy's hash-based ``unique`` is much slower on
    large arrays of page numbers)."""
    ordered = np.sort(values)
    if ordered.shape[0] < 2:
        return ordered
    keep = np.empty(ordered.shape[0], bool)
    keep[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=keep[1:])
    return ordered[keep]


def summarize(path: str | Path, *, fmt: str | None = None, chunk: int = 1 << 20) -> TraceInfo:
    """Count a trace's accesses by kind, its distinct 4 KiB pages and its address range, in
    one streaming pass."""
    if fmt is not None and fmt not in FORMATS:
        raise ConfigError("format", f"{fmt!r} is not one of {', '.join(FORMATS)}")
    found: list[str] = []
    counts = np.zeros(3, np.int64)
    pages: npt.NDArray[np.uint64] = np.zeros(0, np.uint64)
    pending: list[npt.NDArray[np.uint64]] = []
    pending_len = 0
    low: int | None = None
    high: int | None = None
    for c in _stream(path, chunk, fmt, found):
        if len(c) == 0:
            continue
        counts += np.bincount(c.kind.astype(np.intp), minlength=3)[:3]
        address = c.address.view(np.uint64)
        first = address >> PAGE_SHIFT
        last = (address + np.maximum(c.size, 1).astype(np.uint64) - np.uint64(1)) >> PAGE_SHIFT
        mine = _sorted_unique(np.concatenate([first, last[last != first]]))
        pending.append(mine)
        pending_len += mine.shape[0]
        if pending_len > max(MERGE_AT, pages.shape[0]):
            pages = _sorted_unique(np.concatenate([pages, *pending]))
            pending, pending_len = [], 0
        lo, hi = int(address.min()), int(address.max())
        low = lo if low is None else min(low, lo)
        high = hi if high is None else max(high, hi)
    if pending:
        pages = _sorted_unique(np.concatenate([pages, *pending]))
    unique = int(pages.shape[0])
    return TraceInfo(
        path=str(path),
        format=found[0],
        accesses=int(counts.sum()),
        reads=int(counts[0]),
        writes=int(counts[1]),
        fetches=int(counts[2]),
        unique_pages=unique,
        footprint_bytes=unique * PAGE_SIZE,
        min_address=low,
        max_address=high,
    )
