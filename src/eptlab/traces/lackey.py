"""valgrind lackey traces (``valgrind --tool=lackey --trace-mem=yes PROGRAM``).

Each data line is ``I  ADDR,SIZE`` (instruction fetch), `` L ADDR,SIZE`` (load),
`` S ADDR,SIZE`` (store) or `` M ADDR,SIZE`` (modify: a load then a store). Lines starting with
``==`` are valgrind's own messages. Anything else is an error that names the file and line and
quotes at most the line's first characters. A line longer than :data:`MAX_LINE` characters is
an error (lackey's lines are about 30), so a file without newlines (``/dev/zero``) is refused
instead of filling memory. Sizes are 1 .. 2**31 - 1 (the int32 of :class:`TraceChunk`).
Each access's ``ip`` is the address of the last instruction fetch before it (0 before any).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import TraceFormatError
from .model import TraceChunk
from .source import Source, excerpt, open_source

_KINDS = {"I": (2,), "L": (0,), "S": (1,), "M": (0, 1)}
MAX_LINE = 4096
"""Longest line (characters) a lackey reader accepts."""
MAX_SIZE = (1 << 31) - 1


def read_lackey(path: str | Path, chunk: int = 1 << 20) -> Iterator[TraceChunk]:
    """Stream a lackey trace in chunks of about ``chunk`` accesses."""
    with open_source(path) as source:
        yield from lackey_chunks(source, chunk)


def lackey_chunks(source: Source, chunk: int = 1 << 20) -> Iterator[TraceChunk]:
    """The accesses of an opened lackey trace, in chunks of about ``chunk`` accesses."""
    path = source.path
    addresses: list[int] = []
    kinds: list[int] = []
    sizes: list[int] = []
    ips: list[int] = []
    ip = 0
    with io.TextIOWrapper(source.stream, encoding="utf-8", errors="replace") as text:
        number = 0
        while True:
            line = text.readline(MAX_LINE + 1)
            if not line:
                break
            number += 1
            if len(line) > MAX_LINE:
                raise TraceFormatError(
                    path, number, f"line longer than {MAX_LINE} characters: {excerpt(line)}"
                )
            if not line.strip() or line.startswith("=="):
                continue
            op = line[:2].strip()
            body = line[2:].strip() if len(line) > 2 else ""
            if op not in _KINDS or "," not in body:
                raise TraceFormatError(
                    path, number, f"expected 'I|L|S|M ADDR,SIZE', got {excerpt(line)}"
                )
            addr_text, _, size_text = body.partition(",")
            try:
                address, size = int(addr_text, 16), int(size_text)
            except ValueError:
                raise TraceFormatError(
                    path, number, f"bad address or size in {excerpt(line)}"
                ) from None
            if not 0 <= address < 1 << 64 or not 0 < size <= MAX_SIZE:
                raise TraceFormatError(
                    path,
                    number,
                    f"address (< 2**64) or size (1 .. 2**31-1) out of range in {excerpt(line)}",
                )
            if address >= 1 << 63:
                address -= 1 << 64
            if op == "I":
                ip = address
            for kind in _KINDS[op]:
                addresses.append(address)
                kinds.append(kind)
                sizes.append(size)
                ips.append(ip)
            if len(addresses) >= chunk:
                yield _chunk(addresses, kinds, sizes, ips)
                addresses, kinds, sizes, ips = [], [], [], []
    if addresses:
        yield _chunk(addresses, kinds, sizes, ips)


def _chunk(addresses: list[int], kinds: list[int], sizes: list[int], ips: list[int]) -> TraceChunk:
    return TraceChunk(
        np.asarray(addresses, np.int64),
        np.asarray(kinds, np.int8),
        np.asarray(sizes, np.int32),
        np.asarray(ips, np.int64),
    )
