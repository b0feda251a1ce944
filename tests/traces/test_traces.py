"""Trace readers: real valgrind lackey output, chunking, and malformed input."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from eptlab.errors import TraceFormatError
from eptlab.traces import read_lackey

SAMPLE = """==123== Lackey, an example Valgrind tool
I  0400d7d4,8
 S 7ff000398,8
 L 04010f18,4
 M 0421c7f0,4
I  ffffffffff600000,3
==123== exit
"""


def test_lackey_kinds_sizes_and_addresses(tmp_path: Path) -> None:
    path = tmp_path / "t.lackey"
    path.write_text(SAMPLE)
    (chunk,) = list(read_lackey(path))
    assert chunk.kind.tolist() == [2, 1, 0, 0, 1, 2]  # M is a load then a store
    assert chunk.size.tolist() == [8, 8, 4, 4, 4, 3]
    assert chunk.address[0] == 0x0400D7D4 and chunk.address[3] == chunk.address[4] == 0x0421C7F0
    assert chunk.address[5] == np.int64(0xFFFFFFFFFF600000 - (1 << 64))  # high half, signed


def test_lackey_chunks(tmp_path: Path) -> None:
    path = tmp_path / "t.lackey"
    path.write_text("".join(f" L {i * 64:x},8\n" for i in range(10)))
    chunks = list(read_lackey(path, chunk=4))
    assert [len(c) for c in chunks] == [4, 4, 2]
    assert np.concatenate([c.address for c in chunks]).tolist() == [i * 64 for i in range(10)]


@pytest.mark.parametrize(
    ("line", "number"),
    [(" X 1000,8", 2), (" L zzzz,8", 2), (" L 1000", 2), (" L 1000,0", 2), ("garbage", 2)],
)
def test_malformed_lines_name_file_and_line(tmp_path: Path, line: str, number: int) -> None:
    path = tmp_path / "bad.lackey"
    path.write_text(f" L 1000,8\n{line}\n L 2000,8\n")
    with pytest.raises(TraceFormatError) as info:
        list(read_lackey(path))
    assert f"bad.lackey:{number}:" in str(info.value)
    assert info.value.where == number


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_real_program_under_lackey(tmp_path: Path) -> None:
    path = tmp_path / "true.lackey"
    subprocess.run(
        ["valgrind", "--tool=lackey", "--trace-mem=yes", f"--log-file={path}", "/bin/true"],
        check=True,
    )
    chunks = list(read_lackey(path))
    kinds = np.concatenate([c.kind for c in chunks])
    assert len(kinds) > 10_000
    assert {0, 1, 2} <= set(np.unique(kinds).tolist())
