"""Trace formats: ChampSim (plain, xz, gzip), the native format, format detection, summaries,
and ``eptlab trace record`` / ``eptlab trace info`` end to end."""

from __future__ import annotations

import gzip
import json
import lzma
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from eptlab.cli import main
from eptlab.errors import ConfigError, TraceFormatError
from eptlab.traces import (
    RecordError,
    TraceChunk,
    detect_format,
    open_trace,
    read_champsim,
    read_native,
    record,
    summarize,
    write_native,
)
from eptlab.traces import champsim as champsim_module
from eptlab.traces import info as info_module
from eptlab.traces.champsim import RECORD
from eptlab.traces.native import BLOCK, HEADER, MAGIC

HIGH = 0xFFFF_FFFF_FF60_0000  # vsyscall page: a high-half address
I64 = 1 << 64


def signed(value: int) -> int:
    return value - I64 if value >= 1 << 63 else value


def records(rows: list[tuple[int, list[int], list[int]]]) -> np.ndarray:
    """ChampSim records from (ip, source_memory, destination_memory) rows."""
    out = np.zeros(len(rows), RECORD)
    for i, (ip, src, dst) in enumerate(rows):
        out[i]["ip"] = ip
        out[i]["source_memory"][: len(src)] = src
        out[i]["destination_memory"][: len(dst)] = dst
    return out


def reference(rows: np.ndarray) -> list[tuple[int, int]]:
    """(address, kind) in trace order, one record at a time: the oracle."""
    out: list[tuple[int, int]] = []
    for r in rows:
        out.append((signed(int(r["ip"])), 2))
        out += [(signed(int(a)), 0) for a in r["source_memory"] if a]
        out += [(signed(int(a)), 1) for a in r["destination_memory"] if a]
    return out


def flat(chunks: list[TraceChunk]) -> tuple[list[int], list[int], list[int]]:
    if not chunks:
        return [], [], []
    return (
        np.concatenate([c.address for c in chunks]).tolist(),
        np.concatenate([c.kind for c in chunks]).tolist(),
        np.concatenate([c.size for c in chunks]).tolist(),
    )


SMALL = records(
    [
        (0x401000, [0x1000, 0, 0x2000, 0], [0x3000]),
        (HIGH, [], []),
        (0x401004, [], [0, 0x4000]),
    ]
)
SMALL_EXPECTED = [0x401000, 0x1000, 0x2000, 0x3000, signed(HIGH), 0x401004, 0x4000]
SMALL_KINDS = [2, 0, 0, 1, 2, 2, 1]


# --- ChampSim ---------------------------------------------------------------------------------


def test_champsim_record_layout_is_64_bytes_as_in_champsim() -> None:
    assert RECORD.itemsize == 64
    fields = RECORD.fields
    assert fields is not None
    offsets = {name: fields[name][1] for name in RECORD.names or ()}
    assert offsets == {
        "ip": 0,
        "is_branch": 8,
        "branch_taken": 9,
        "destination_registers": 10,
        "source_registers": 12,
        "destination_memory": 16,
        "source_memory": 32,
    }


def test_champsim_fetch_then_reads_then_writes(tmp_path: Path) -> None:
    path = tmp_path / "small.champsim"
    path.write_bytes(SMALL.tobytes())
    address, kind, size = flat(list(read_champsim(path)))
    assert address == SMALL_EXPECTED
    assert kind == SMALL_KINDS
    assert size == [1] * 7


@pytest.mark.parametrize(
    ("name", "compress"),
    [
        ("t.champsim.xz", lzma.compress),
        ("t.bin", lzma.compress),  # xz recognized by magic, not by suffix
        ("t.trace.gz", gzip.compress),
    ],
)
def test_champsim_compressed_matches_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, compress: object
) -> None:
    rng = np.random.default_rng(7)
    rows = np.zeros(500, RECORD)
    rows["ip"] = rng.integers(0x400000, 0x500000, 500, dtype=np.uint64)
    mem = rng.integers(1, 1 << 47, (500, 6), dtype=np.uint64)
    mem[rng.random((500, 6)) < 0.6] = 0
    mem[3, 0] = HIGH
    rows["ip"][5] = 0  # still one fetch: every record is an instruction
    rows["source_memory"] = mem[:, :4]
    rows["destination_memory"] = mem[:, 4:]
    assert callable(compress)
    path = tmp_path / name
    path.write_bytes(compress(rows.tobytes()))
    monkeypatch.setattr(champsim_module, "MAX_RECORDS_PER_READ", 7)  # many reads per file
    chunks = list(read_champsim(path, chunk=100))
    expected = reference(rows)
    address, kind, _ = flat(chunks)
    assert list(zip(address, kind, strict=True)) == expected
    assert [len(c) for c in chunks[:-1]] == [100] * (len(chunks) - 1)
    assert 0 < len(chunks[-1]) <= 100


def test_champsim_chunks_are_exact(tmp_path: Path) -> None:
    path = tmp_path / "small.trace"
    path.write_bytes(SMALL.tobytes() * 2)
    chunks = list(read_champsim(path, chunk=3))
    assert [len(c) for c in chunks] == [3, 3, 3, 3, 2]
    assert flat(chunks)[0] == SMALL_EXPECTED * 2


@pytest.mark.parametrize("compress", [None, lzma.compress])
def test_champsim_truncated_record_names_byte_offset(tmp_path: Path, compress: object) -> None:
    data = SMALL.tobytes() + b"\x01" * 10
    path = tmp_path / "cut.champsim"
    path.write_bytes(compress(data) if callable(compress) else data)
    with pytest.raises(TraceFormatError) as info:
        list(read_champsim(path))
    assert info.value.where == 3 * 64 and info.value.unit == "byte"
    assert "byte 192" in str(info.value) and "10 of 64" in str(info.value)


def test_champsim_corrupt_xz_is_a_format_error(tmp_path: Path) -> None:
    data = bytearray(lzma.compress(SMALL.tobytes() * 50))
    data[len(data) // 2] ^= 0xFF
    path = tmp_path / "bad.xz"
    path.write_bytes(bytes(data))
    with pytest.raises(TraceFormatError, match="corrupt xz stream"):
        list(read_champsim(path))


# --- native format ----------------------------------------------------------------------------

accesses = st.lists(
    st.tuples(
        st.integers(-(1 << 63), (1 << 63) - 1) | st.sampled_from([0, -1, signed(HIGH), 1 << 62]),
        st.integers(0, 2),
        st.integers(1, (1 << 31) - 1) | st.sampled_from([1, 4, 8, 64]),  # sizes are >= 1
    ),
    max_size=300,
)


@given(
    rows=accesses,
    cuts=st.lists(st.integers(0, 300), max_size=6),
    block=st.integers(1, 64),
    chunk=st.integers(1, 100),
)
def test_native_round_trip_is_exact(
    rows: list[tuple[int, int, int]], cuts: list[int], block: int, chunk: int
) -> None:
    address = np.array([r[0] for r in rows], np.int64)
    kind = np.array([r[1] for r in rows], np.int8)
    size = np.array([r[2] for r in rows], np.int32)
    bounds = [0, *sorted(min(c, len(rows)) for c in cuts), len(rows)]
    pieces = [
        TraceChunk(address[a:b], kind[a:b], size[a:b])
        for a, b in zip(bounds, bounds[1:], strict=False)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.ept"
        assert write_native(path, pieces, block_accesses=block) == len(rows)
        back = list(read_native(path, chunk=chunk))
    assert flat(back) == (address.tolist(), kind.tolist(), size.tolist())
    assert all(len(c) == chunk for c in back[:-1])
    assert all(c.address.dtype == np.int64 and c.kind.dtype == np.int8 for c in back)
    assert all(c.size.dtype == np.int32 for c in back)


def sequential(n: int) -> TraceChunk:
    return TraceChunk(
        (0x7F00_0000_0000 + 8 * np.arange(n)).astype(np.int64),
        (np.arange(n) % 3).astype(np.int8),
        np.full(n, 8, np.int32),
    )


def test_native_is_compact(tmp_path: Path) -> None:
    path = tmp_path / "seq.ept"
    assert write_native(path, [sequential(100_000)]) == 100_000
    assert path.stat().st_size < 20_000  # 13 raw bytes per access; < 0.2 stored
    assert flat(list(read_native(path))) == flat([sequential(100_000)])


def block_offsets(data: bytes) -> list[tuple[int, int, int]]:
    """(offset, count, length) of every block, end block included, walking the layout."""
    out, offset = [], HEADER.size
    while offset < len(data):
        count, length, _, _ = BLOCK.unpack_from(data, offset)
        out.append((offset, count, length))
        offset += BLOCK.size + length
    return out


@pytest.fixture
def three_blocks(tmp_path: Path) -> tuple[Path, bytes, list[tuple[int, int, int]]]:
    path = tmp_path / "t.ept"
    write_native(path, [sequential(250)], block_accesses=100)
    data = path.read_bytes()
    blocks = block_offsets(data)
    assert [count for _, count, _ in blocks] == [100, 100, 50, 0]
    assert data[:8] == MAGIC == b"EPTLTRC\0" and struct.unpack_from("<H", data, 8) == (2,)
    assert blocks[0][0] == HEADER.size == 10 and BLOCK.size == 16
    return path, data, blocks


def expect_error(path: Path, where: int, text: str) -> None:
    with pytest.raises(TraceFormatError) as info:
        list(read_native(path))
    assert info.value.where == where and info.value.unit == "byte"
    assert f"byte {where}:" in str(info.value)
    assert text in str(info.value)


def test_native_bad_magic(three_blocks: tuple[Path, bytes, list[tuple[int, int, int]]]) -> None:
    path, data, _ = three_blocks
    path.write_bytes(b"NOTATRC\0" + data[8:])
    expect_error(path, 0, "magic")


def test_native_unknown_version(
    three_blocks: tuple[Path, bytes, list[tuple[int, int, int]]],
) -> None:
    path, data, _ = three_blocks
    path.write_bytes(data[:8] + struct.pack("<H", 9) + data[10:])
    expect_error(path, 8, "version 9")


def test_native_crc_mismatch_names_the_block(
    three_blocks: tuple[Path, bytes, list[tuple[int, int, int]]],
) -> None:
    path, data, blocks = three_blocks
    second = blocks[1][0]
    corrupt = bytearray(data)
    corrupt[second + BLOCK.size + 5] ^= 0x40
    path.write_bytes(bytes(corrupt))
    expect_error(path, second, "CRC mismatch")


def test_native_truncated_inside_a_block(
    three_blocks: tuple[Path, bytes, list[tuple[int, int, int]]],
) -> None:
    path, data, blocks = three_blocks
    third = blocks[2][0]
    path.write_bytes(data[: third + BLOCK.size + 3])
    expect_error(path, third, "truncated block")
    path.write_bytes(data[: third + 5])
    expect_error(path, third, "truncated block header")


def test_native_cut_at_a_block_boundary_is_truncated(
    three_blocks: tuple[Path, bytes, list[tuple[int, int, int]]],
) -> None:
    path, data, blocks = three_blocks
    end = blocks[3][0]
    path.write_bytes(data[:end])
    expect_error(path, end, "end-of-trace block is missing")


def test_native_trailing_bytes_and_wrong_total(
    three_blocks: tuple[Path, bytes, list[tuple[int, int, int]]],
) -> None:
    path, data, blocks = three_blocks
    path.write_bytes(data + b"x")
    expect_error(path, len(data), "after the end-of-trace block")
    # drop the second block: its successor's sequence number gives it away
    second, third = blocks[1][0], blocks[2][0]
    path.write_bytes(data[:second] + data[third:])
    expect_error(path, second, "block number 2 where block 1 belongs")
    # an end block (valid CRC, right number) announcing another total
    end = blocks[3][0]
    total = struct.pack("<Q", 249)
    path.write_bytes(data[:end] + BLOCK.pack(0, 8, zlib.crc32(total), 3) + total)
    expect_error(path, end, "announces 249 accesses, the blocks hold 250")


def test_native_writer_rejects_bad_kinds_and_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.ept"
    bad = TraceChunk(np.zeros(2, np.int64), np.array([0, 3], np.int8), np.ones(2, np.int32))
    with pytest.raises(ConfigError, match="got 3"):
        write_native(path, [bad])
    assert list(tmp_path.iterdir()) == []


def test_native_empty_trace(tmp_path: Path) -> None:
    path = tmp_path / "empty.ept"
    assert write_native(path, []) == 0
    assert list(read_native(path)) == []
    info = summarize(path)
    assert (info.accesses, info.unique_pages, info.min_address) == (0, 0, None)


# --- detection and summaries ------------------------------------------------------------------

LACKEY = """==1== Lackey, an example Valgrind tool
I  0400d7d4,8
 S 7ff000398,8
 L 04010f18,4
 M 0421c7f0,4
I  ffffffffff600000,3
 L 00001ffc,8
==1== exit
"""


def test_detection_by_magic_then_suffix_then_content(tmp_path: Path) -> None:
    native = tmp_path / "looks-like.lackey"
    write_native(native, [sequential(10)])
    xz = tmp_path / "champsim.bin"
    xz.write_bytes(lzma.compress(SMALL.tobytes()))
    plain = tmp_path / "t.champsim"
    plain.write_bytes(SMALL.tobytes())
    text = tmp_path / "t.txt"
    text.write_text(LACKEY)
    bare = tmp_path / "lackey-no-suffix"
    bare.write_text(LACKEY)
    junk = tmp_path / "junk"
    junk.write_bytes(bytes(range(256)))
    assert [detect_format(p) for p in (native, xz, plain, text, bare)] == [
        "native",
        "champsim",
        "champsim",
        "lackey",
        "lackey",
    ]
    assert flat(list(open_trace(native))) == flat([sequential(10)])
    assert flat(list(open_trace(xz)))[0] == SMALL_EXPECTED
    assert flat(list(open_trace(plain, chunk=2)))[1] == SMALL_KINDS
    assert flat(list(open_trace(bare)))[1] == [2, 1, 0, 0, 1, 2, 0]
    with pytest.raises(TraceFormatError) as info:
        detect_format(junk)
    assert info.value.where == 0 and "cannot tell" in str(info.value)


def test_summarize_known_trace_in_two_formats(tmp_path: Path) -> None:
    text = tmp_path / "t.lackey"
    text.write_text(LACKEY)
    native = tmp_path / "t.ept"
    write_native(native, open_trace(text, chunk=2))
    for path, fmt in ((text, "lackey"), (native, "native")):
        info = summarize(path)
        assert info.format == fmt and info.path == str(path)
        assert (info.accesses, info.reads, info.writes, info.fetches) == (7, 3, 2, 2)
        # pages 0x400d, 0x7ff000, 0x4010, 0x421c, vsyscall, and 0x1 and 0x2 (0x1ffc,8 crosses)
        assert info.unique_pages == 7 and info.footprint_bytes == 7 * 4096
        assert info.min_address == 0x1FFC and info.max_address == HIGH  # unsigned order
        assert set(info.as_dict()) == {
            "path",
            "format",
            "accesses",
            "reads",
            "writes",
            "fetches",
            "unique_pages",
            "footprint_bytes",
            "min_address",
            "max_address",
        }


def test_summarize_merges_pages_across_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(3)
    address = (rng.integers(0, 5000, 20_000) << 12) + rng.integers(0, 4000, 20_000)
    chunk = TraceChunk(
        address.astype(np.int64), np.zeros(20_000, np.int8), np.ones(20_000, np.int32)
    )
    path = tmp_path / "r.ept"
    write_native(path, [chunk])
    monkeypatch.setattr(info_module, "MERGE_AT", 16)  # merge many times along the way
    info = summarize(path, chunk=500)
    assert info.unique_pages == len(np.unique(address >> 12))
    assert info.reads == 20_000 and info.max_address == int(address.max())


# --- CLI and recording ------------------------------------------------------------------------


def test_cli_info_missing_file_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", "info", "missing-file"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "missing-file" in err
    assert "Traceback" not in err


def test_cli_info_malformed_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "cut.champsim"
    path.write_bytes(SMALL.tobytes()[:100])
    assert main(["trace", "info", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "byte 64" in err


def test_cli_info_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t.lackey"
    path.write_text(LACKEY)
    assert main(["trace", "info", str(path)]) == 0
    table = capsys.readouterr().out
    assert "accesses" in table and "fetches" in table and "28.6%" in table  # 2 of 7
    assert main(["trace", "info", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["accesses"] == 7 and out["format"] == "lackey" and out["unique_pages"] == 7


def test_record_errors_without_running_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError):
        record([], tmp_path / "x.ept")
    with pytest.raises(ConfigError, match="not an existing directory"):
        record(["/bin/true"], tmp_path / "missing" / "x.ept")
    with pytest.raises(RecordError, match="command not found"):
        record(["no-such-program-eptlab"], tmp_path / "x.ept")
    monkeypatch.setenv("PATH", str(tmp_path))  # no valgrind on this PATH
    with pytest.raises(RecordError, match="valgrind is not installed"):
        record(["/bin/true"], tmp_path / "x.ept")
    assert list(tmp_path.iterdir()) == []


needs_valgrind = pytest.mark.skipif(
    shutil.which("valgrind") is None, reason="valgrind is not installed"
)


@needs_valgrind
def test_record_failing_command(tmp_path: Path) -> None:
    with pytest.raises(RecordError, match="status 1") as info:
        record(["/bin/false"], tmp_path / "x.ept")
    assert info.value.status == 1
    assert not (tmp_path / "x.ept").exists()


@needs_valgrind
def test_cli_record_then_info_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.ept"
    assert main(["trace", "record", "-o", str(out), "--", "/bin/true"]) == 0
    assert "accesses" in capsys.readouterr().out
    assert out.read_bytes()[:8] == MAGIC
    assert main(["trace", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info) >= {"accesses", "reads", "writes", "fetches", "unique_pages"}
    assert info["format"] == "native"
    assert info["accesses"] > 10_000
    assert info["reads"] > 0 and info["writes"] > 0 and info["fetches"] > 0
    assert info["accesses"] == info["reads"] + info["writes"] + info["fetches"]
    assert info["footprint_bytes"] == 4096 * info["unique_pages"] > 0


@needs_valgrind
def test_cli_record_json_keeps_program_output_off_stdout(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "echo.ept"
    code = main(["trace", "record", "--json", "-o", str(out), "/bin/echo", "-n", "hello"])
    assert code == 0  # no "--": arguments after COMMAND are not options of eptlab
    captured = capfd.readouterr()
    info = json.loads(captured.out)  # only the JSON object on stdout
    assert info["path"] == str(out) and info["accesses"] > 10_000
    assert "hello" in captured.err


@needs_valgrind
def test_record_limit_keeps_the_first_accesses_of_the_full_recording(tmp_path: Path) -> None:
    full = tmp_path / "full.ept"
    head = tmp_path / "head.ept"
    record(["/bin/true"], full)
    info = record(["/bin/true"], head, limit=1_000)
    assert info.accesses == 1_000
    whole = next(read_native(full, chunk=1_000))
    first = next(read_native(head, chunk=1_000))
    assert len(first) == 1_000
    np.testing.assert_array_equal(first.address, whole.address)
    np.testing.assert_array_equal(first.kind, whole.kind)
    np.testing.assert_array_equal(first.size, whole.size)


@needs_valgrind
def test_record_limit_stops_a_program_that_never_ends(tmp_path: Path) -> None:
    # `yes` writes forever: the recording returns only because it stops the program itself
    info = record(["yes"], tmp_path / "yes.ept", stdout=subprocess.DEVNULL, limit=5_000)
    assert info.accesses == 5_000
    with pytest.raises(ConfigError, match="limit"):
        record(["yes"], tmp_path / "no.ept", limit=0)
