"""Trace readers on small hand-made files where a slip in parsing shows: lackey sizes are
decimal (valgrind prints ``%lu``), and the native format's end block is CRC-checked like every
other block."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from eptlab.errors import TraceFormatError
from eptlab.traces.lackey import read_lackey
from eptlab.traces.model import TraceChunk
from eptlab.traces.native import BLOCK, END, read_native, write_native


def test_lackey_sizes_are_decimal(tmp_path: Path) -> None:
    path = tmp_path / "t.lackey"
    path.write_text(" L 0400d7d4,16\n S 7ff000010,10\n M 0040aa00,32\n")
    chunks = list(read_lackey(path))
    sizes = np.concatenate([c.size for c in chunks]).tolist()
    addresses = np.concatenate([c.address for c in chunks]).tolist()
    assert sizes[:2] == [16, 10] and set(sizes[2:]) == {32}  # M: a load and a store
    assert addresses[:2] == [0x0400D7D4, 0x7FF000010]


def native_file(tmp_path: Path) -> Path:
    path = tmp_path / "t.eptl"
    n = 50
    chunk = TraceChunk(
        np.arange(n, dtype=np.int64) * 64, np.zeros(n, np.int8), np.full(n, 8, np.int32)
    )
    assert write_native(path, [chunk], block_accesses=20) == n
    return path


def test_native_round_trip(tmp_path: Path) -> None:
    chunks = list(read_native(native_file(tmp_path)))
    assert np.concatenate([c.address for c in chunks]).tolist() == [i * 64 for i in range(50)]


def test_native_end_block_crc_is_checked(tmp_path: Path) -> None:
    path = native_file(tmp_path)
    data = bytearray(path.read_bytes())
    # the end block is the last header + 8-byte payload; its CRC field is bytes 8..12
    crc_at = len(data) - END.size - BLOCK.size + 8
    (crc,) = struct.unpack_from("<I", data, crc_at)
    struct.pack_into("<I", data, crc_at, crc ^ 1)
    path.write_bytes(bytes(data))
    with pytest.raises(TraceFormatError, match="CRC mismatch"):
        list(read_native(path))


def test_lackey_high_half_addresses_are_negative_from_bit_63(tmp_path: Path) -> None:
    path = tmp_path / "h.lackey"
    path.write_text(" L 8000000000000000,8\n L 7fffffffffffffff,1\n L ffffffffffffff00,8\n")
    addresses = np.concatenate([c.address for c in read_lackey(path)]).tolist()
    assert addresses == [-(1 << 63), (1 << 63) - 1, -0x100]


@pytest.mark.parametrize("extra", [0, 1])
def test_native_block_size_limit_is_inclusive(tmp_path: Path, extra: int) -> None:
    """A block may claim up to MAX_BLOCK_ACCESSES accesses: exactly that many is judged on its
    payload (here garbage), one more is refused for its count."""
    from eptlab.traces.native import HEADER, MAGIC, MAX_BLOCK_ACCESSES, VERSION

    payload = b"garbage!"
    block = BLOCK.pack(MAX_BLOCK_ACCESSES + extra, len(payload), zlib.crc32(payload), 0)
    path = tmp_path / "big.eptl"
    path.write_bytes(HEADER.pack(MAGIC, VERSION) + block + payload)
    with pytest.raises(TraceFormatError) as info:
        list(read_native(path))
    assert ("claims" in str(info.value)) == bool(extra)


def test_native_payload_without_the_end_of_its_zlib_stream_is_refused(tmp_path: Path) -> None:
    """A payload cut after its data but before the end of the zlib stream (flushed, never
    finished) decompresses to the right length; the reader must still refuse it."""
    from eptlab.traces.native import HEADER, MAGIC, VERSION, encode_block

    n = 10
    chunk = TraceChunk(
        np.arange(n, dtype=np.int64) * 8, np.zeros(n, np.int8), np.full(n, 4, np.int32)
    )
    good = encode_block(chunk, 0)
    raw = zlib.decompress(good[BLOCK.size :])
    packer = zlib.compressobj()
    cut = packer.compress(raw) + packer.flush(zlib.Z_SYNC_FLUSH)  # no Z_FINISH: no stream end
    assert zlib.decompressobj().decompress(cut) == raw
    end = END.pack(n)
    data = (
        HEADER.pack(MAGIC, VERSION)
        + BLOCK.pack(n, len(cut), zlib.crc32(cut), 0) + cut
        + BLOCK.pack(0, len(end), zlib.crc32(end), 1) + end
    )
    path = tmp_path / "cut.eptl"
    path.write_bytes(data)
    with pytest.raises(TraceFormatError, match="payload holds"):
        list(read_native(path))
    end_block = BLOCK.pack(0, len(end), zlib.crc32(end), 1) + end
    path.write_bytes(HEADER.pack(MAGIC, VERSION) + good + end_block)  # the same, finished
    addresses = np.concatenate([c.address for c in read_native(path)]).tolist()
    assert addresses == list(range(0, 80, 8))
