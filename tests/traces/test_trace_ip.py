"""The ``ip`` column of trace chunks: each access's instruction pointer where the format has
one (lackey: the last instruction fetch; ChampSim: the record's ip), kept by rechunking, and
None (unknown) where the source has none."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from eptlab.errors import ConfigError
from eptlab.traces.champsim import RECORD, read_champsim
from eptlab.traces.lackey import read_lackey
from eptlab.traces.model import TraceChunk, rechunk


def chunk(addresses: list[int], ips: list[int] | None) -> TraceChunk:
    n = len(addresses)
    return TraceChunk(
        np.array(addresses, np.int64), np.zeros(n, np.int8), np.full(n, 8, np.int32),
        None if ips is None else np.array(ips, np.int64),
    )


def test_lackey_ip_is_the_last_instruction_fetch(tmp_path: Path) -> None:
    path = tmp_path / "t.lackey"
    path.write_text(" L 0500,8\nI  0400,4\n S 0600,8\n M 0700,8\nI  0404,2\n L 0800,4\n")
    (got,) = list(read_lackey(path))
    assert got.ip is not None
    assert got.address.tolist() == [0x500, 0x400, 0x600, 0x700, 0x700, 0x404, 0x800]
    assert got.ip.tolist() == [0, 0x400, 0x400, 0x400, 0x400, 0x404, 0x404]


def test_champsim_ip_is_the_records(tmp_path: Path) -> None:
    rows = np.zeros(2, RECORD)
    rows[0]["ip"], rows[1]["ip"] = 0x401000, (1 << 64) - 0x1000  # a kernel-half ip
    rows[0]["source_memory"][:2] = [0x7000, 0x7008]
    rows[1]["destination_memory"][:1] = [0x9000]
    path = tmp_path / "t.champsim"
    path.write_bytes(rows.tobytes())
    (got,) = list(read_champsim(path))
    assert got.ip is not None
    assert got.ip.tolist() == [0x401000] * 3 + [-0x1000] * 2  # signed, like the addresses


def test_rechunk_keeps_ips_and_fills_unknown_with_zero() -> None:
    parts = [chunk([1, 2, 3], [10, 20, 30]), chunk([4], None), chunk([5, 6], [50, 60])]
    out = list(rechunk(parts, 4))
    assert [c.address.tolist() for c in out] == [[1, 2, 3, 4], [5, 6]]
    assert [None if c.ip is None else c.ip.tolist() for c in out] == [[10, 20, 30, 0], [50, 60]]
    plain = list(rechunk([chunk([1, 2], None), chunk([3], None)], 2))
    assert all(c.ip is None for c in plain)


def test_ip_needs_one_value_per_access() -> None:
    with pytest.raises(ConfigError):
        chunk([1, 2], [10])
