"""Issue 13, items 1 and 4: traces read from pipes lose nothing; trace edge cases are clean
errors (each of these failed on main before the fix)."""

from __future__ import annotations

import gzip
import json
import lzma
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from eptlab.cli import main
from eptlab.errors import TraceFormatError
from eptlab.traces import (
    TraceChunk,
    open_trace,
    read_champsim,
    read_lackey,
    read_native,
    summarize,
    write_native,
)
from eptlab.traces.champsim import RECORD

LACKEY = "".join(f" L {0x10000 + 64 * i:x},8\n" for i in range(1000))  # 11 KB: > 4096 bytes


def champsim_bytes(records: int) -> bytes:
    data = np.zeros(records, RECORD)
    data["ip"] = 0x400000 + 4 * np.arange(records, dtype=np.uint64)
    data["source_memory"][:, 0] = 0x7000_0000 + 64 * np.arange(records, dtype=np.uint64)
    return data.tobytes()


def fifo_with(tmp_path: Path, name: str, data: bytes) -> Iterator[Path]:
    """``/dev/fd/N`` of a pipe that a thread fills with ``data`` in short writes, as ``cat``
    does (what ``eptlab trace info /dev/stdin`` or ``<(...)`` sees)."""
    read_end, write_end = os.pipe()

    def feed() -> None:
        try:
            for start in range(0, len(data), 1000):
                os.write(write_end, data[start : start + 1000])
        except BrokenPipeError:  # the reader stopped early (a refused trace)
            pass
        finally:
            os.close(write_end)

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    try:
        yield Path(f"/dev/fd/{read_end}")
    finally:
        os.close(read_end)
        thread.join(timeout=10)


@pytest.mark.parametrize(
    ("name", "payload", "accesses"),
    [
        ("pipe", LACKEY.encode(), 1000),
        ("pipe", gzip.compress(champsim_bytes(3000)), 6000),
        ("pipe", lzma.compress(champsim_bytes(3000)), 6000),
        ("pipe", champsim_bytes(3000), None),  # plain ChampSim: no magic, no suffix -> refused
    ],
)
def test_a_trace_from_a_pipe_is_read_from_its_first_byte(
    tmp_path: Path, name: str, payload: bytes, accesses: int | None
) -> None:
    for fifo in fifo_with(tmp_path, name, payload):
        if accesses is None:
            with pytest.raises(TraceFormatError, match="cannot tell the trace format"):
                summarize(fifo)
            continue
        assert summarize(fifo).accesses == accesses


def test_a_native_trace_from_a_pipe_matches_the_file(tmp_path: Path) -> None:
    path = tmp_path / "t.ept"
    address = np.arange(5000, dtype=np.int64) * 4096
    write_native(path, [TraceChunk(address, np.zeros(5000, np.int8), np.ones(5000, np.int32))],
                 block_accesses=700)
    for fifo in fifo_with(tmp_path, "pipe", path.read_bytes()):
        got = np.concatenate([c.address for c in open_trace(fifo)])
    assert got.tolist() == address.tolist()


def test_trace_info_on_stdin_counts_every_access(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for fifo in fifo_with(tmp_path, "stdin", gzip.compress(champsim_bytes(2000))):
        assert main(["trace", "info", str(fifo), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["accesses"] == 4000 and info["format"] == "champsim"


# --- item 4: edge cases -------------------------------------------------------------------------


def test_lackey_size_beyond_int32_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "t.lackey"
    path.write_text(f" L 1000,8\n L 2000,{1 << 31}\n")
    with pytest.raises(TraceFormatError) as info:
        list(read_lackey(path))
    assert info.value.where == 2 and "size" in str(info.value)


def test_an_error_message_quotes_at_most_a_short_excerpt(tmp_path: Path) -> None:
    path = tmp_path / "t.lackey"
    path.write_text(" L 1000,8\n" + "x" * 3000 + "\n")
    with pytest.raises(TraceFormatError) as info:
        list(read_lackey(path))
    assert info.value.where == 2 and len(str(info.value)) < 300


def test_a_line_without_end_is_refused_in_bounded_memory() -> None:
    with pytest.raises(TraceFormatError, match="longer than") as info:
        list(read_lackey("/dev/zero"))
    assert len(str(info.value)) < 300


@pytest.mark.parametrize("suffix", [".gz", ".xz"])
def test_an_empty_compressed_file_is_refused_alike(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"empty.champsim{suffix}"
    path.write_bytes(b"")
    with pytest.raises(TraceFormatError, match="empty file"):
        list(read_champsim(path))


def v1_trace(blocks: list[TraceChunk]) -> bytes:
    """A version-1 native trace (12-byte block headers, no sequence numbers), block by block."""
    from eptlab.traces.native import _shuffle

    out = [b"EPTLTRC\0" + struct.pack("<H", 1)]
    for c in blocks:
        deltas = np.diff(c.address.view(np.uint64), prepend=np.zeros(1, np.uint64)).view(np.int64)
        zigzag = ((deltas << 1) ^ (deltas >> 63)).view(np.uint64)
        raw = _shuffle(zigzag, 8) + c.kind.astype(np.uint8).tobytes() + _shuffle(
            c.size.astype(np.int32).view(np.uint32), 4
        )
        payload = zlib.compress(raw)
        out.append(struct.pack("<III", len(c), len(payload), zlib.crc32(payload)) + payload)
    end = struct.pack("<Q", sum(len(c) for c in blocks))
    out.append(struct.pack("<III", 0, 8, zlib.crc32(end)) + end)
    return b"".join(out)


@pytest.mark.parametrize("bad", [0, -4])
def test_native_sizes_below_one_are_refused(tmp_path: Path, bad: int) -> None:
    chunk = TraceChunk(np.arange(3, dtype=np.int64), np.zeros(3, np.int8),
                       np.array([8, bad, 8], np.int32))
    path = tmp_path / "t.ept"
    path.write_bytes(v1_trace([chunk]))
    with pytest.raises(TraceFormatError, match="size"):
        list(read_native(path))


def test_native_version_1_files_still_read(tmp_path: Path) -> None:
    chunk = TraceChunk(np.arange(3, dtype=np.int64), np.zeros(3, np.int8), np.ones(3, np.int32))
    path = tmp_path / "t.ept"
    path.write_bytes(v1_trace([chunk, chunk]))
    assert sum(len(c) for c in read_native(path)) == 6


def native_blocks(tmp_path: Path) -> tuple[Path, bytes, list[tuple[int, int]]]:
    path = tmp_path / "t.ept"
    address = np.arange(300, dtype=np.int64)
    write_native(path, [TraceChunk(address, np.zeros(300, np.int8), np.ones(300, np.int32))],
                 block_accesses=100)
    data = path.read_bytes()
    spans, offset = [], 10
    while offset < len(data):
        count, length = struct.unpack_from("<II", data, offset)
        size = len(data) - offset if count == 0 else None
        spans.append((offset, size or 16 + length))
        offset += 16 + length
    return path, data, spans


def test_native_reordered_blocks_are_refused(tmp_path: Path) -> None:
    path, data, spans = native_blocks(tmp_path)
    (a, la), (b, lb) = spans[0], spans[1]
    path.write_bytes(data[:a] + data[b : b + lb] + data[a : a + la] + data[b + lb :])
    with pytest.raises(TraceFormatError, match="block number 1 where block 0 belongs") as info:
        list(read_native(path))
    assert info.value.where == a


def test_native_duplicated_block_is_refused(tmp_path: Path) -> None:
    path, data, spans = native_blocks(tmp_path)
    (a, la), (b, _) = spans[0], spans[1]
    path.write_bytes(data[:b] + data[a : a + la] + data[b:])
    with pytest.raises(TraceFormatError, match="block number 0 where block 1 belongs") as info:
        list(read_native(path))
    assert info.value.where == b


def test_native_announced_payload_beyond_zlib_bound_is_refused_before_reading(
    tmp_path: Path,
) -> None:
    path, data, spans = native_blocks(tmp_path)
    first = spans[0][0]
    forged = bytearray(data)
    struct.pack_into("<I", forged, first + 4, 0xFFFF_FFF0)  # a 4 GiB payload for 100 accesses
    path.write_bytes(bytes(forged))
    with pytest.raises(TraceFormatError, match="more than"):
        list(read_native(path))


def test_a_directory_is_not_a_trace(tmp_path: Path) -> None:
    with pytest.raises(TraceFormatError, match="is a directory, not a trace file"):
        list(open_trace(tmp_path))
