"""Walk options that mean what users expect (issue 18 item 4): ``--ept-page`` backs all guest
memory, page tables included; ``--table-ept-page`` sets the tables' EPT page size apart; the
explorer names EPT entry bits by what the SDM makes of them at that level."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from eptlab.arch import PageSize
from eptlab.arch.ept import Ept
from eptlab.cli import app
from eptlab.cli.walk import run_walk
from eptlab.explore.model import entry_flags
from eptlab.mmu.walker import Dim, Reference


def _count(*args: str) -> int:
    result = CliRunner().invoke(app, ["walk", *args, "--json"])
    assert result.exit_code == 0, result.output
    return int(json.loads(result.output)["count"])


@pytest.mark.parametrize(
    ("args", "count"),
    [
        ((), 24),
        (("--guest-page", "2m", "--ept-page", "2m"), 15),  # 3 guest rows * (3 + 1) + 3
        (("--ept-page", "1g"), 14),  # 4 guest rows * (2 + 1) + 2
        (("--ept-page", "2m"), 19),  # 4 * (3 + 1) + 3
        (("--guest-page", "2m", "--ept-page", "2m", "--table-ept-page", "4k"), 18),
        (("--table-ept-page", "1g"), 4 * 3 + 4),
    ],
)
def test_walk_reference_counts(args: tuple[str, ...], count: int) -> None:
    assert _count(*args) == count


def test_ept_page_backs_the_guest_tables() -> None:
    """Every EPT walk that translates a guest table's GPA ends at the 2 MiB leaf (level 2)."""
    t = run_walk(ept_page=PageSize.SIZE_2M)
    table_walks = [r for r in t.references if r.dim == Dim.EPT and r.for_level != 0]
    assert min(r.level for r in table_walks) == 2
    small = run_walk(ept_page=PageSize.SIZE_2M, table_ept_page=PageSize.SIZE_4K)
    assert min(r.level for r in small.references if r.dim == Dim.EPT and r.for_level) == 1


def _ept_ref(level: int, value: int) -> Reference:
    return Reference(Dim.EPT, level, 0x1000, value, 0x2000, 0)


def test_mbec_leaf_with_only_bit_10_is_present() -> None:
    value = int(Ept.XU) | 6 << 3
    assert entry_flags(_ept_ref(1, value), mbec=True) == "XU MT=6"
    assert entry_flags(_ept_ref(1, value), mbec=False) == "not present"


def test_pml4e_bit_7_is_reserved_not_ps() -> None:
    value = 0x5000 | int(Ept.R | Ept.W | Ept.X | Ept.PS)
    flags = entry_flags(_ept_ref(4, value)).split()
    assert "PS" not in flags and "bit7(reserved)" in flags
    assert not any(f.startswith("MT=") for f in flags)  # not a leaf, no memory type
    assert "PS" in entry_flags(_ept_ref(2, value | 6 << 3)).split()
    guest = Reference(Dim.GUEST, 4, 0x1000, 0x5000 | 0x83, 0x2000, 4)
    assert "bit7(reserved)" in entry_flags(guest).split()


@pytest.mark.parametrize("e", [PageSize.SIZE_2M, PageSize.SIZE_1G])
def test_explorer_grid_with_uniform_backing(e: PageSize) -> None:
    """Tables and data on the same EPT page size: every row has the same EPT columns."""
    from eptlab.explore.model import grid_of

    t = run_walk(guest_page=PageSize.SIZE_2M, ept_page=e)
    grid = grid_of(t)
    assert len(grid.cells) == t.count == 3 * (4 - e.level + 2) + (4 - e.level + 1)
    assert [s.kind for s in grid.slots] == ["data"]
