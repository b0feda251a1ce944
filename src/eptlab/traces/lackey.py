"""valgrind lackey traces (``valgrind --tool=lackey --trace-mem=yes PROGRAM``).

Each data line is ``I  ADDR,SIZE`` (instruction fetch), `` L ADDR,SIZE`` (load),
`` S ADDR,SIZE`` (store) or `` M ADDR,SIZE`` (modify: a load then a store). Lines starting with
``==`` are valgrind's own messages. Anything else is an error that names the file and line.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import TraceFormatError
from .model import TraceChunk

_KINDS = {"I": (2,), "L": (0,), "S": (1,), "M": (0, 1)}


def read_lackey(path: str | Path, chunk: int = 1 << 20) -> Iterator[TraceChunk]:
    """Stream a lackey trace in chunks of about ``chunk`` accesses."""
    path = Path(path)
    addresses: list[int] = []
    kinds: list[int] = []
    sizes: list[int] = []
    with path.open("r", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip() or line.startswith("=="):
                continue
            op = line[:2].strip()
            body = line[2:].strip() if len(line) > 2 else ""
            if op not in _KINDS or "," not in body:
                raise TraceFormatError(
                    path, number, f"expected 'I|L|S|M ADDR,SIZE', got {line.rstrip()!r}"
                )
            addr_text, _, size_text = body.partition(",")
            try:
                address, size = int(addr_text, 16), int(size_text)
            except ValueError:
                raise TraceFormatError(
                    path, number, f"bad address or size in {line.rstrip()!r}"
                ) from None
            if not 0 <= address < 1 << 64 or size <= 0:
                raise TraceFormatError(
                    path, number, f"address or size out of range in {line.rstrip()!r}"
                )
            if address >= 1 << 63:
                address -= 1 << 64
            for kind in _KINDS[op]:
                addresses.append(address)
                kinds.append(kind)
                sizes.append(size)
            if len(addresses) >= chunk:
                yield _chunk(addresses, kinds, sizes)
                addresses, kinds, sizes = [], [], []
    if addresses:
        yield _chunk(addresses, kinds, sizes)


def _chunk(addresses: list[int], kinds: list[int], sizes: list[int]) -> TraceChunk:
    return TraceChunk(
        np.asarray(addresses, np.int64), np.asarray(kinds, np.int8), np.asarray(sizes, np.int32)
    )
