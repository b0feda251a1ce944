"""eptlab's native trace format: compact, versioned, checksummed, streamed in blocks.

Layout (version 2; every integer little-endian)::

    header   magic  b"EPTLTRC\\0"               8 bytes
             version u16 = 2                    2 bytes
    block*   count   u32   accesses in the block (1 .. 2**24)
             length  u32   bytes of payload that follow
             crc32   u32   zlib.crc32 of those payload bytes
             seq     u32   the block's number: 0, 1, 2, ... (the end block's too)
             payload       zlib-compressed: D | K | S
                 D  count x u64, byte-shuffled: the zigzag-encoded deltas of the addresses
                    (address[i] - address[i-1] modulo 2**64, address[-1] = 0 in every block, so
                    each block decodes on its own), stored as 8 planes (all low bytes, then all
                    second bytes, ...) so that small deltas compress to almost nothing
                 K  count x u8: the access kinds (0 read, 1 write, 2 fetch)
                 S  count x u32, byte-shuffled the same way: the access sizes (the int32 bits)
    end      count = 0, length = 8, crc32, seq, payload = u64 total accesses (not compressed)

Version 1 is the same without ``seq`` (12-byte block headers); readers still accept it.

The end block is required: a file cut at a block boundary is still reported as truncated. A
reader rejects a bad magic, an unknown version, a truncated header or block, a payload longer
than zlib could make of ``13 * count`` bytes, a CRC mismatch, a block out of sequence
(reordered or duplicated blocks; version 2), a payload that does not decompress to
``13 * count`` bytes, a kind above 2, a size below 1, a wrong total and bytes after the end
block, each with the byte offset of the header or block at fault. Addresses are
the int64 values of :class:`TraceChunk` (high-half addresses are negative); a round trip is exact.

:func:`write_native` writes to a temporary file beside the target and renames it on success, so
an interrupted conversion never leaves a file that looks complete.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.typing as npt

from ..errors import ConfigError, TraceFormatError
from .model import TraceChunk, rechunk
from .source import Source, open_source, read_fully

MAGIC = b"EPTLTRC\0"
VERSION = 2
VERSIONS = (1, 2)
HEADER = struct.Struct("<8sH")
BLOCK_V1 = struct.Struct("<III")
BLOCK = struct.Struct("<IIII")
END = struct.Struct("<Q")
BLOCK_ACCESSES = 1 << 18
"""Accesses per block written (about 3.4 MB before compression)."""
MAX_BLOCK_ACCESSES = 1 << 24
"""Largest block a reader accepts (guards against a corrupt count)."""
BYTES_PER_ACCESS = 8 + 1 + 4
ZLIB_LEVEL = 6

_U8 = np.dtype(np.uint8)
_U64 = np.dtype("<u8")
_I64 = np.dtype("<i8")
_U32 = np.dtype("<u4")
_I32 = np.dtype("<i4")


def _shuffle(values: npt.NDArray[np.generic], width: int) -> bytes:
    """Byte planes of a little-endian array: all byte 0s, then all byte 1s, ..."""
    planes = np.ascontiguousarray(values).view(_U8).reshape(-1, width).T
    return np.ascontiguousarray(planes).tobytes()


def _unshuffle(data: bytes, count: int, width: int) -> npt.NDArray[np.uint8]:
    planes = np.frombuffer(data, _U8).reshape(width, count)
    return np.ascontiguousarray(planes.T).reshape(-1)


def encode_block(c: TraceChunk, seq: int = 0) -> bytes:
    """Block number ``seq`` (header and payload), holding the accesses of ``c``."""
    n = len(c)
    kinds = np.asarray(c.kind)
    if n and (int(kinds.min()) < 0 or int(kinds.max()) > 2):
        bad = int(kinds[(kinds < 0) | (kinds > 2)][0])
        raise ConfigError("kind", f"access kinds are 0 (read), 1 (write) or 2 (fetch), got {bad}")
    sizes_in = np.asarray(c.size)
    if n and int(sizes_in.min()) < 1:
        raise ConfigError("size", f"access sizes are at least 1, got {int(sizes_in.min())}")
    addresses = np.asarray(c.address, _I64).view(_U64)
    deltas = np.diff(addresses, prepend=np.zeros(1, _U64)).view(_I64)
    zigzag = ((deltas << 1) ^ (deltas >> 63)).view(_U64)
    sizes = np.asarray(c.size, _I32).view(_U32)
    raw = b"".join((_shuffle(zigzag, 8), kinds.astype(_U8).tobytes(), _shuffle(sizes, 4)))
    payload = zlib.compress(raw, ZLIB_LEVEL)
    return BLOCK.pack(n, len(payload), zlib.crc32(payload), seq) + payload


def decode_payload(raw: bytes, count: int) -> TraceChunk:
    """The accesses of one decompressed block payload (its length already checked)."""
    n = count
    zigzag = _unshuffle(raw[: 8 * n], n, 8).view(_U64)
    deltas = (zigzag >> np.uint64(1)).view(_I64) ^ -(zigzag & np.uint64(1)).view(_I64)
    addresses = np.cumsum(deltas.view(_U64), dtype=np.uint64).view(np.int64)
    kinds = np.frombuffer(raw, _U8, count=n, offset=8 * n).astype(np.int8)
    sizes = _unshuffle(raw[9 * n :], n, 4).view(_I32).astype(np.int32, copy=False)
    return TraceChunk(addresses, kinds, sizes)


def write_native(
    path: str | Path, chunks: Iterable[TraceChunk], *, block_accesses: int = BLOCK_ACCESSES
) -> int:
    """Write ``chunks`` to ``path`` in the native format, ``block_accesses`` accesses per block;
    return the number of accesses written."""
    if not 1 <= block_accesses <= MAX_BLOCK_ACCESSES:
        raise ConfigError("block_accesses", f"must be in 1..{MAX_BLOCK_ACCESSES}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    total = 0
    try:
        with tmp.open("wb") as fh:
            fh.write(HEADER.pack(MAGIC, VERSION))
            seq = 0
            for block in rechunk(chunks, block_accesses):
                fh.write(encode_block(block, seq))
                total += len(block)
                seq += 1
            end = END.pack(total)
            fh.write(BLOCK.pack(0, len(end), zlib.crc32(end), seq) + end)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return total


def read_native(path: str | Path, chunk: int = 1 << 20) -> Iterator[TraceChunk]:
    """Stream a native trace in chunks of ``chunk`` accesses (the last may be shorter)."""
    with open_source(path) as source:
        yield from native_chunks(source, chunk)


def native_chunks(source: Source, chunk: int = 1 << 20) -> Iterator[TraceChunk]:
    """The accesses of an opened native trace, in chunks of ``chunk`` accesses."""
    return rechunk(_blocks(source.path, source.stream, source.size), chunk)


def _read_exactly(fh: BinaryIO, n: int) -> bytes:
    return read_fully(fh, n)


def max_payload(count: int) -> int:
    """The longest zlib stream of ``13 * count`` bytes (zlib's ``compressBound`` plus slack):
    a longer announced payload is corrupt, and is refused before it is read."""
    raw = BYTES_PER_ACCESS * count
    return raw + (raw >> 12) + (raw >> 14) + (raw >> 25) + 64


def _blocks(path: Path, fh: BinaryIO, file_size: int | None) -> Iterator[TraceChunk]:
    head = _read_exactly(fh, HEADER.size)
    if head[: len(MAGIC)] != MAGIC:
        raise TraceFormatError(
            path, 0, f"not an eptlab native trace (magic {head[:8]!r})", unit="byte"
        )
    if len(head) < HEADER.size:
        raise TraceFormatError(path, len(MAGIC), "truncated header", unit="byte")
    _, version = HEADER.unpack(head)
    if version not in VERSIONS:
        raise TraceFormatError(
            path,
            len(MAGIC),
            f"unknown format version {version} (this eptlab reads versions "
            f"{', '.join(map(str, VERSIONS))})",
            unit="byte",
        )
    block_header = BLOCK if version >= 2 else BLOCK_V1
    offset = HEADER.size
    total = 0
    expected_seq = 0
    while True:
        header = _read_exactly(fh, block_header.size)
        if not header:
            raise TraceFormatError(
                path, offset, "truncated: the end-of-trace block is missing", unit="byte"
            )
        if len(header) < block_header.size:
            raise TraceFormatError(
                path,
                offset,
                f"truncated block header ({len(header)} of {block_header.size} bytes)",
                unit="byte",
            )
        count, length, crc, *rest = block_header.unpack(header)
        if count > MAX_BLOCK_ACCESSES:
            raise TraceFormatError(
                path,
                offset,
                f"block claims {count} accesses (at most {MAX_BLOCK_ACCESSES})",
                unit="byte",
            )
        limit = END.size if count == 0 else max_payload(count)
        if length > limit:
            raise TraceFormatError(
                path,
                offset,
                f"block announces {length} payload bytes, more than {limit} "
                f"for {count} accesses",
                unit="byte",
            )
        if file_size is not None:
            available = file_size - offset - block_header.size
            if length > available:
                raise TraceFormatError(
                    path,
                    offset,
                    f"truncated block: {length} payload bytes announced, "
                    f"{max(available, 0)} present",
                    unit="byte",
                )
        payload = _read_exactly(fh, length)
        if len(payload) < length:
            raise TraceFormatError(
                path,
                offset,
                f"truncated block: {length} payload bytes announced, {len(payload)} present",
                unit="byte",
            )
        computed = zlib.crc32(payload)
        if computed != crc:
            raise TraceFormatError(
                path,
                offset,
                f"CRC mismatch in block (stored {crc:#010x}, computed {computed:#010x})",
                unit="byte",
            )
        if rest and rest[0] != expected_seq:
            raise TraceFormatError(
                path,
                offset,
                f"block number {rest[0]} where block {expected_seq} belongs "
                "(blocks reordered, duplicated or missing)",
                unit="byte",
            )
        expected_seq += 1
        if count == 0:
            _check_end(path, offset, payload, total)
            if fh.read(1):
                raise TraceFormatError(
                    path,
                    offset + block_header.size + length,
                    "unexpected bytes after the end-of-trace block",
                    unit="byte",
                )
            return
        expected = BYTES_PER_ACCESS * count
        try:
            inflater = zlib.decompressobj()
            raw = inflater.decompress(payload, expected + 1)
            complete = inflater.eof
        except zlib.error as exc:
            raise TraceFormatError(
                path, offset, f"block payload does not decompress: {exc}", unit="byte"
            ) from exc
        if len(raw) != expected or not complete:
            raise TraceFormatError(
                path,
                offset,
                f"block payload holds {len(raw)} bytes, expected {expected} "
                f"for {count} accesses",
                unit="byte",
            )
        kind_max = int(np.frombuffer(raw, _U8, count=count, offset=8 * count).max())
        if kind_max > 2:
            raise TraceFormatError(
                path, offset, f"access kind {kind_max} in block (0..2 allowed)", unit="byte"
            )
        block = decode_payload(raw, count)
        if int(block.size.min()) < 1:
            raise TraceFormatError(
                path,
                offset,
                f"access size {int(block.size.min())} in block (at least 1)",
                unit="byte",
            )
        total += count
        yield block
        offset += block_header.size + length


def _check_end(path: Path, offset: int, payload: bytes, total: int) -> None:
    if len(payload) != END.size:
        raise TraceFormatError(
            path,
            offset,
            f"end-of-trace block has {len(payload)} bytes, expected {END.size}",
            unit="byte",
        )
    (announced,) = END.unpack(payload)
    if announced != total:
        raise TraceFormatError(
            path,
            offset,
            f"end-of-trace block announces {announced} accesses, the blocks hold {total}",
            unit="byte",
        )
