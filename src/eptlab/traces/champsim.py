"""ChampSim binary traces (``input_instr`` records), plain, xz- or gzip-compressed.

A record is 64 bytes, little-endian, as ChampSim's ``trace_instr.h`` lays it out::

    offset  0  ip                         u64
            8  is_branch                  u8
            9  branch_taken               u8
           10  destination_registers[2]   u8
           12  source_registers[4]        u8
           16  destination_memory[2]      u64
           32  source_memory[4]           u64

Each record becomes, in this order: one instruction fetch of ``ip``, one read per nonzero
``source_memory`` slot (slot order), one write per nonzero ``destination_memory`` slot. ChampSim
records no access sizes, so every access gets :data:`ACCESS_SIZE` = 1 byte: it marks the byte the
trace names and never invents a page crossing. Addresses keep their 64 bits as int64 (high-half
addresses are negative), as every eptlab reader does.

Compression is recognized by magic bytes (xz ``FD 37 7A 58 5A 00``, gzip ``1F 8B``) or, failing
that, by the ``.xz`` / ``.gz`` suffix, and decompressed while streaming. Records are decoded a
block at a time with a numpy structured dtype; there is no per-record Python loop. A stream
whose length is not a multiple of 64 raises :class:`TraceFormatError` naming the byte offset of
the truncated record (in the decompressed stream for a compressed file).
"""

from __future__ import annotations

import gzip
import io
import lzma
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import TraceFormatError
from .model import TraceChunk, rechunk
from .source import Source, open_source

RECORD = np.dtype(
    [
        ("ip", "<u8"),
        ("is_branch", "u1"),
        ("branch_taken", "u1"),
        ("destination_registers", "u1", (2,)),
        ("source_registers", "u1", (4,)),
        ("destination_memory", "<u8", (2,)),
        ("source_memory", "<u8", (4,)),
    ]
)
RECORD_SIZE = RECORD.itemsize  # 64
ACCESS_SIZE = 1
XZ_MAGIC = b"\xfd7zXZ\x00"
GZIP_MAGIC = b"\x1f\x8b"
MAX_RECORDS_PER_READ = 1 << 18

# per record: fetch, 4 source slots (reads), 2 destination slots (writes)
_KINDS = np.array([2, 0, 0, 0, 0, 1, 1], np.int8)


def compression(path: str | Path, head: bytes | None = None) -> str | None:
    """``"xz"``, ``"gzip"`` or None for a file (or its first bytes ``head``), by magic bytes
    first and suffix second."""
    path = Path(path)
    if head is None:
        with path.open("rb") as fh:
            head = fh.read(len(XZ_MAGIC))
    if head.startswith(XZ_MAGIC):
        return "xz"
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    suffix = path.suffix.lower()
    return {".xz": "xz", ".gz": "gzip"}.get(suffix)


def _open(stream: BinaryIO, codec: str | None) -> io.BufferedIOBase:
    if codec == "xz":
        return lzma.LZMAFile(stream, "rb")
    if codec == "gzip":
        return gzip.GzipFile(fileobj=stream, mode="rb")
    return stream  # type: ignore[return-value]


def decode_records(records: np.ndarray) -> TraceChunk:
    """The accesses of an array of :data:`RECORD` values, in trace order."""
    n = records.shape[0]
    table = np.empty((n, 7), np.uint64)
    table[:, 0] = records["ip"]
    table[:, 1:5] = records["source_memory"]
    table[:, 5:7] = records["destination_memory"]
    keep = table != 0
    keep[:, 0] = True  # every record is one instruction fetch, whatever its ip
    addresses = table[keep].view(np.int64)  # row-major: fetch, reads, writes per record
    kinds = np.broadcast_to(_KINDS, (n, 7))[keep]
    ips = np.broadcast_to(table[:, :1], (n, 7))[keep].view(np.int64)  # the record's ip
    return TraceChunk(
        addresses, kinds, np.full(addresses.shape[0], ACCESS_SIZE, np.int32), ips
    )


def read_champsim(path: str | Path, chunk: int = 1 << 20) -> Iterator[TraceChunk]:
    """Stream a ChampSim trace in chunks of ``chunk`` accesses (the last may be shorter)."""
    with open_source(path) as source:
        yield from champsim_chunks(source, chunk)


def champsim_chunks(source: Source, chunk: int = 1 << 20) -> Iterator[TraceChunk]:
    """The accesses of an opened ChampSim trace. An empty compressed file is refused (a
    compressed stream of nothing is not zero bytes long), for xz and gzip alike."""
    codec = compression(source.path, source.head)
    if codec is not None and not source.head:
        raise TraceFormatError(source.path, 0, f"empty file: not a {codec} stream", unit="byte")
    return rechunk(_records(source.path, _open(source.stream, codec), codec), chunk)


def _records(path: Path, fh: io.BufferedIOBase, codec: str | None) -> Iterator[TraceChunk]:
    block = MAX_RECORDS_PER_READ * RECORD_SIZE
    offset = 0
    where = "" if codec is None else f" of the {codec}-decompressed stream"
    with fh:
        while True:
            data = _read(fh, block, path, offset, codec)
            if not data:
                return
            whole = len(data) - len(data) % RECORD_SIZE
            if whole != len(data):
                raise TraceFormatError(
                    path,
                    offset + whole,
                    f"truncated record{where}: {len(data) - whole} of {RECORD_SIZE} bytes",
                    unit="byte",
                )
            offset += len(data)
            yield decode_records(np.frombuffer(data, RECORD))


def _read(fh: io.BufferedIOBase, n: int, path: Path, offset: int, codec: str | None) -> bytes:
    """Up to ``n`` bytes, fewer only at the end of the stream."""
    parts: list[bytes] = []
    got = 0
    while got < n:
        try:
            data = fh.read(n - got)
        except (lzma.LZMAError, gzip.BadGzipFile, zlib.error, EOFError) as exc:
            raise TraceFormatError(
                path,
                offset + got,
                f"corrupt {codec} stream (offset in decompressed bytes): {exc}",
                unit="byte",
            ) from exc
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)
