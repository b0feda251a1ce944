"""Fixed cases for the bit formats of eptlab.arch that the mutation lists showed the suite could
not see (docs/mutation.md)."""

from __future__ import annotations

import pytest

from eptlab.arch.paging import canonical, is_canonical


@pytest.mark.parametrize(
    ("address", "width", "expected"),
    [
        (0x0000_7FFF_FFFF_F000, 48, 0x0000_7FFF_FFFF_F000),  # top of the low half: unchanged
        (0x0000_8000_0000_0000, 48, 0xFFFF_8000_0000_0000),  # bit 47 set: sign-extended
        (0x0000_FFFF_FFFF_FFFF, 48, 0xFFFF_FFFF_FFFF_FFFF),
        (0x0100_0000_0000_0000, 57, 0xFF00_0000_0000_0000),  # bit 56 with 5-level paging
        (0x01FF_FFFF_FFFF_F000, 57, 0xFFFF_FFFF_FFFF_F000),
        (0x1234_5678_9ABC_D000, 48, 0x0000_5678_9ABC_D000),  # bits 63:48 dropped, bit 47 clear
    ],
)
def test_canonical_sign_extends_bit_width_minus_1(address: int, width: int, expected: int) -> None:
    """SDM Vol. 1 §3.3.7.1: bits 63:width-1 of a canonical address equal bit width-1."""
    assert canonical(address, width) == expected
    assert is_canonical(expected, width)
