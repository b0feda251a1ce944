"""Opening a trace once: a regular file, or a pipe, FIFO or character device read as a stream.

Format detection needs the first bytes of the input. A regular file can seek back to the start;
a pipe cannot, so the bytes read for detection are replayed in front of the rest of the stream
(:class:`Replayed`). Every reader takes the stream this module opens, so ``cat t | eptlab trace
info /dev/stdin`` and ``--set trace=/dev/stdin`` read every access, never only what follows
the detection read.
"""

from __future__ import annotations

import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import TraceFormatError

HEAD = 4096
"""Bytes read for format detection."""
EXCERPT = 60
"""Characters of an offending line quoted in an error message."""


class Replayed(io.RawIOBase):
    """``head`` followed by what is left of ``rest`` (a non-seekable stream)."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        super().__init__()
        self._head, self._rest = memoryview(head), rest

    def readable(self) -> bool:
        """Always True: a readable stream."""
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        """Fill ``buffer`` from the replayed head first, then from the rest of the stream."""
        out = memoryview(buffer).cast("B")
        if self._head.nbytes:
            n = min(out.nbytes, self._head.nbytes)
            out[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._rest.read(out.nbytes)
        if not data:
            return 0
        out[: len(data)] = data
        return len(data)

    def close(self) -> None:
        """Close the underlying stream."""
        self._rest.close()
        super().close()


@dataclass
class Source:
    """An opened trace: ``stream`` starts at byte 0; ``head`` is its first bytes (for detection);
    ``size`` is the file size for a regular file, None for a stream."""

    path: Path
    stream: BinaryIO
    head: bytes
    size: int | None

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stream.close()


def open_source(path: str | Path) -> Source:
    """Open ``path`` once for reading. A directory or an unreadable path is a
    :class:`TraceFormatError` naming it."""
    path = Path(path)
    try:
        raw = path.open("rb")
    except IsADirectoryError:
        raise TraceFormatError(path, 0, "is a directory, not a trace file", unit="byte") from None
    except OSError as exc:
        message = f"cannot open: {exc.strerror or exc}"
        raise TraceFormatError(path, 0, message, unit="byte") from None
    mode = os.fstat(raw.fileno()).st_mode
    if stat.S_ISDIR(mode):
        raw.close()
        raise TraceFormatError(path, 0, "is a directory, not a trace file", unit="byte")
    head = read_fully(raw, HEAD)
    if stat.S_ISREG(mode):
        raw.seek(0)
        return Source(path, raw, head, os.fstat(raw.fileno()).st_size)
    stream = io.BufferedReader(Replayed(head, raw), buffer_size=1 << 16)
    return Source(path, stream, head, None)


def read_fully(fh: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes, fewer only at the end of the stream (a pipe returns short reads)."""
    parts: list[bytes] = []
    got = 0
    while got < n:
        data = fh.read(n - got)
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def excerpt(line: str | bytes) -> str:
    """An offending line as quoted in a message: at most :data:`EXCERPT` characters."""
    text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
    text = text.rstrip("\r\n")
    shown = repr(text[:EXCERPT])
    if len(shown) > EXCERPT + 2:  # escapes made it longer
        shown = shown[: EXCERPT + 2] + "'"
    if len(text) > EXCERPT:
        return shown + f" ... ({len(text):,} characters)"
    return shown
