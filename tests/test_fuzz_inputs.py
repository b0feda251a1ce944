"""Issue 13: random and mutated input to every trace reader and to the sweep spec loader gives a
correct read or a clean EptlabError, never another exception, within a bounded time (a
hypothesis deadline per example)."""

from __future__ import annotations

import gzip
import lzma
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eptlab.errors import EptlabError
from eptlab.experiments.registry import experiments
from eptlab.sweep import load_spec, parse_spec
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

FUZZ = settings(
    max_examples=150,
    deadline=5000,  # ms per example: bounded, never a hang or an unbounded read
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def lackey_sample() -> bytes:
    lines = ["==1== Lackey"] + [f"{op} {0x1000 + 8 * i:x},{1 + i % 8}"
                                for i, op in enumerate(["I ", " L", " S", " M"] * 20)]
    return ("\n".join(lines) + "\n").encode()


def champsim_sample() -> bytes:
    data = np.zeros(40, RECORD)
    data["ip"] = 0x400000 + 4 * np.arange(40, dtype=np.uint64)
    data["source_memory"][::3, 0] = 0x7000 + np.arange(0, 40, 3, dtype=np.uint64)
    return data.tobytes()


def native_sample() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.ept"
        n = 300
        write_native(path, [TraceChunk(np.arange(n, dtype=np.int64) * 4096 - 5000,
                                       (np.arange(n) % 3).astype(np.int8),
                                       np.full(n, 8, np.int32))], block_accesses=64)
        return path.read_bytes()


SAMPLES = {
    "lackey": lackey_sample(),
    "champsim": champsim_sample(),
    "gz": gzip.compress(champsim_sample()),
    "xz": lzma.compress(champsim_sample()),
    "native": native_sample(),
}


@st.composite
def mutated(draw: st.DrawFn, sample: bytes) -> bytes:
    """``sample`` with a few random edits: bit flips, cuts, insertions, repeated slices."""
    data = bytearray(sample)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "repeat", "zero"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            del data[at : at + draw(st.integers(1, 200))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "repeat":
            data[at:at] = data[at : at + draw(st.integers(1, 300))]
        else:
            data[at : at + 16] = bytes(len(data[at : at + 16]))
    return bytes(data)


VALID_OPS = ["I  ", " L ", " S ", " M "] * 4
lackey_lines = st.lists(
    st.tuples(
        st.sampled_from([*VALID_OPS, "==1== ", " X ", "", "I"]),
        st.integers(0, 1 << 64) | st.integers(-10, 1 << 70),
        st.integers(1, 64) | st.integers(-5, 1 << 40),
        st.sampled_from([","] * 6 + [", ", ";", ""]),
    ),
    max_size=30,
).map(lambda rows: "".join(f"{op}{a:x}{sep}{n}\n" if a >= 0 else f"{op}{a}{sep}{n}\n"
                           for op, a, n, sep in rows).encode())


@st.composite
def native_files(draw: st.DrawFn) -> bytes:
    """Native traces with valid CRCs but random counts, payloads, sequence numbers and
    sizes: past the checksum, into the checks behind it."""
    import struct
    import zlib

    from eptlab.traces.native import _shuffle

    out = [b"EPTLTRC\0" + struct.pack("<H", draw(st.sampled_from([1, 2, 2, 3])))]
    version2 = out[0][-2:] != b"\x01\x00"
    total = 0
    for seq in range(draw(st.integers(0, 3))):
        n = draw(st.integers(1, 40))
        sizes = np.array(draw(st.lists(st.integers(-3, 1 << 31 - 1), min_size=n, max_size=n)),
                         np.int64).astype(np.int32)
        kinds = np.array(draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)), np.uint8)
        raw = _shuffle(np.arange(n, dtype=np.uint64), 8) + kinds.tobytes() + _shuffle(
            sizes.view(np.uint32), 4)
        raw = raw[: draw(st.integers(0, len(raw)))] if draw(st.booleans()) else raw
        payload = zlib.compress(raw)
        count = n if draw(st.integers(0, 4)) else draw(st.integers(0, 1 << 32 - 1))
        at = draw(st.sampled_from([seq, seq, seq + 1, 0]))
        header = struct.pack("<IIII" if version2 else "<III", count, len(payload),
                             zlib.crc32(payload), *([at] if version2 else []))
        out.append(header + payload)
        total += n
    end = struct.pack("<Q", total if draw(st.integers(0, 3)) else total + 1)
    head = struct.pack("<IIII" if version2 else "<III", 0, 8, zlib.crc32(end),
                       *([len(out) - 1] if version2 else []))
    out.append(head + end)
    return b"".join(out)


def inputs(name: str) -> st.SearchStrategy[bytes]:
    structured = {"lackey": lackey_lines, "native": native_files()}.get(name, st.nothing())
    return (
        st.binary(max_size=3000) | mutated(SAMPLES[name]) | st.just(SAMPLES[name]) | structured
    )


def check_read(chunks: Callable[[], Iterator[TraceChunk]]) -> None:
    """A clean EptlabError, or accesses that satisfy every reader's contract."""
    try:
        got = list(chunks())
    except EptlabError:
        return
    for c in got:
        assert c.address.dtype == np.int64 and c.kind.dtype == np.int8
        assert c.size.dtype == np.int32
        assert len(c.address) == len(c.kind) == len(c.size)
        if len(c):
            assert int(c.kind.min()) >= 0 and int(c.kind.max()) <= 2
            assert int(c.size.min()) >= 1


def write(data: bytes, name: str) -> Path:
    directory = Path(tempfile.mkdtemp(prefix="eptlab-fuzz-"))
    path = directory / name
    path.write_bytes(data)
    return path


@FUZZ
@given(data=inputs("lackey"))
def test_fuzz_lackey(data: bytes) -> None:
    path = write(data, "t.lackey")
    check_read(lambda: read_lackey(path, chunk=50))
    check_read(lambda: open_trace(path))


@FUZZ
@given(data=inputs("champsim"), suffix=st.sampled_from([".champsim", ".trace", ""]))
def test_fuzz_champsim_plain(data: bytes, suffix: str) -> None:
    path = write(data, "t" + suffix)
    check_read(lambda: read_champsim(path, chunk=50))
    check_read(lambda: open_trace(path))


@FUZZ
@given(data=inputs("gz") | inputs("xz"), suffix=st.sampled_from([".gz", ".xz", ".bin"]))
def test_fuzz_champsim_compressed(data: bytes, suffix: str) -> None:
    path = write(data, "t.champsim" + suffix)
    check_read(lambda: read_champsim(path, chunk=50))


@FUZZ
@given(data=inputs("native"))
def test_fuzz_native(data: bytes) -> None:
    path = write(data, "t.ept")
    check_read(lambda: read_native(path, chunk=50))


@FUZZ
@given(data=inputs("native") | inputs("lackey") | inputs("gz"))
def test_fuzz_summarize_detects_then_reads(data: bytes) -> None:
    path = write(data, "trace")
    try:
        info = summarize(path)
    except EptlabError:
        return
    assert info.accesses == info.reads + info.writes + info.fetches >= 0


def test_unmutated_samples_read_correctly() -> None:
    """The fuzz seeds themselves read as what they hold (the 'correct read' half)."""
    assert sum(len(c) for c in read_lackey(write(SAMPLES["lackey"], "t.lackey"))) == 100
    for name in ("champsim", "gz", "xz"):
        path = write(SAMPLES[name], f"t.champsim.{name}")
        assert sum(len(c) for c in read_champsim(path)) == 40 + 14
    native = list(read_native(write(SAMPLES["native"], "t.ept")))
    assert np.concatenate([c.address for c in native]).tolist() == [
        4096 * i - 5000 for i in range(300)
    ]


# --- the sweep spec loader ------------------------------------------------------------------------

PARAMETERS = sorted({f for cls in experiments().values()
                     for f in cls.Params.__dataclass_fields__})
scalars = (
    st.integers(-(1 << 70), 1 << 70)
    | st.floats(allow_nan=True)
    | st.booleans()
    | st.text(max_size=20)
    | st.sampled_from(["4k", "2m", "random", "off", "on", "", "auto", "/dev/null", "/tmp",
                       "a\x00b", "-1", "1e400", "0x" + "f" * 30, "maybe"])
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4), max_leaves=8)
run_tables = st.fixed_dictionaries(
    {},
    optional={
        "experiment": st.sampled_from([*experiments(), "nope", ""]) | scalars,
        "set": st.dictionaries(st.sampled_from(["trace", "seed", *PARAMETERS])
                               | st.text(max_size=8), values, max_size=4) | scalars,
        "grid": st.dictionaries(st.sampled_from(PARAMETERS),
                                st.lists(values, max_size=3) | scalars, max_size=3),
        "extra": scalars,
    },
)
specs = st.fixed_dictionaries(
    {},
    optional={
        "out": st.text(max_size=20) | scalars,
        "run": st.lists(run_tables, max_size=3) | scalars,
        "runs": scalars,
    },
)


@FUZZ
@given(data=specs)
def test_fuzz_parse_spec(data: dict[str, Any]) -> None:
    try:
        spec = parse_spec(data, "fuzz.toml")
    except EptlabError:
        return
    assert spec.points and len({p.point_id for p in spec.points}) == len(spec.points)


VALID_TOML = b"""out = "out/x"
[[run]]
experiment = "nested-overhead"
[run.set]
accesses = 2000
trace = ""
[run.grid]
footprint_mib = [16, 32]
workloads = [["random"], ["zipf", "gups"]]
"""


@FUZZ
@given(data=st.binary(max_size=2000) | mutated(VALID_TOML) | st.just(VALID_TOML))
def test_fuzz_load_spec(data: bytes) -> None:
    path = write(data, "s.toml")
    try:
        spec = load_spec(path)
    except EptlabError:
        return
    assert spec.points
