"""The oracle's random cases (no Bochs needed): deterministic, laid out where the harness
expects them, encoded as harness.c reads them, and varied enough to reach every outcome."""

from __future__ import annotations

import struct
from collections import Counter

import pytest

from eptlab.arch import Access, Mode
from eptlab.oracle.cases import (
    CASE_MAGIC,
    EPT_TABLE_HPA,
    GPA_BASE,
    HEADER_WORDS,
    MAXPHYADDR,
    TABLE_LOW,
    build_case,
)
from eptlab.oracle.compare import engine_fields, walker_fields

MiB = 1 << 20


def test_cases_are_deterministic() -> None:
    a, b = build_case(17, 3), build_case(17, 3)
    assert a.words() == b.words() and a.gva == b.gva and a.record() == b.record()
    assert build_case(18, 3).record() != a.record()


def test_record_layout_matches_the_harness() -> None:
    case = build_case(5, 1)
    record = case.record()
    words = struct.unpack(f"<{len(record) // 8}Q", record)
    header = words[:HEADER_WORDS]
    assert header[0] == CASE_MAGIC and header[1] == 5
    n_zero, n_writes = header[2], header[3]
    assert len(words) == HEADER_WORDS + n_zero + 2 * n_writes
    assert header[4] == case.vmcs.eptp.encode() and header[6] == case.guest.cr3
    assert header[12] == case.gva and header[11] == int(case.access)
    zeros = words[HEADER_WORDS : HEADER_WORDS + n_zero]
    assert list(zeros) == case.pages
    writes = words[HEADER_WORDS + n_zero :]
    assert list(zip(writes[::2], writes[1::2], strict=True)) == case.words()


def test_host_layout() -> None:
    """EPT tables in [32, 64) MiB, guest pages in [64, 128) MiB, GPAs in [512 GiB, 1 TiB)."""
    for i in range(60):
        case = build_case(i, 2)
        for page in case.pages:
            assert EPT_TABLE_HPA <= page < 128 * MiB
        assert EPT_TABLE_HPA <= case.vmcs.eptp.root < TABLE_LOW
        assert GPA_BASE <= case.guest.cr3 < 2 * GPA_BASE
        assert case.guest.cr3 % (1 << 30) >= TABLE_LOW
        assert case.guest.cr3 < 1 << MAXPHYADDR


def test_cases_reach_every_outcome_and_the_engine_agrees() -> None:
    outcomes: Counter[object] = Counter()
    kinds: Counter[tuple[Access, Mode]] = Counter()
    for i in range(150):
        walker = walker_fields(build_case(i, 9))
        engine = engine_fields(build_case(i, 9))
        assert walker == engine, i
        outcomes[walker["outcome"]] += 1
        case = build_case(i, 9)
        kinds[(case.access, case.mode)] += 1
    assert set(outcomes) == {"ok", "fault", "ept_violation", "ept_misconfig", "pml_full"}
    assert len(kinds) == 6
    assert min(outcomes.values()) >= 3


def test_protection_keys_only_when_the_model_has_them() -> None:
    assert not any(build_case(i, 4, pke=False).guest.cr4 & (1 << 22) for i in range(100))
    assert any(build_case(i, 4, pke=True).guest.cr4 & (1 << 22) for i in range(100))


def test_missing_bochs_is_a_named_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from eptlab.oracle import bochs

    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert bochs.missing() == "bochs" and not bochs.bochs_available()
    with pytest.raises(bochs.BochsError, match="bochs not installed"):
        bochs.run_bochs([build_case(0, 1)])


def test_disk_image_layout() -> None:
    from eptlab.oracle.bochs import CASE_HEADER_LBA, SECTOR, Harness, disk_image

    harness = Harness(b"\0" * 510 + b"\x55\xaa", b"\x90" * 1000)
    cases = [build_case(i, 1) for i in range(3)]
    image = disk_image(harness, cases)
    assert image[:512] == harness.boot and image[512:1512] == harness.kernel
    header = struct.unpack("<3Q", image[CASE_HEADER_LBA * SECTOR : CASE_HEADER_LBA * SECTOR + 24])
    records = b"".join(c.record() for c in cases)
    assert header == (CASE_MAGIC, 3, -(-len(records) // SECTOR))
    start = (CASE_HEADER_LBA + 1) * SECTOR
    assert image[start : start + len(records)] == records
    assert len(image) % (16 * 63 * SECTOR) == 0
