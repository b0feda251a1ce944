"""What the KVM applications share: write patterns, the parameter area, flavour columns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ...errors import ConfigError
from ..backend import DATA_BASE, LOG_AREA, PAGE, PARAM_AREA, KvmGuest, flavour

Row = dict[str, Any]
MAX_LIST = (LOG_AREA - PARAM_AREA) // 8  # addresses the parameter area holds


def flavour_columns(guest_cpl: int = 3) -> Row:
    """``kvm_module`` and ``tdp`` (hardware EPT/NPT or shadow paging), and the guest's
    privilege level: on every KVM row."""
    return {**flavour().as_dict(), "guest_cpl": guest_cpl}


def user_mode(guest_cpl: int) -> bool:
    """True for CPL 3 (the default: native execution on every KVM flavour), False for 0."""
    if guest_cpl not in (0, 3):
        raise ConfigError("guest_cpl", f"{guest_cpl} is not 0 or 3")
    return guest_cpl == 3


@dataclass(frozen=True)
class WritePattern:
    """Addresses the guest writes: distinct data-region pages, an 8-byte-aligned offset in
    each (seeded)."""

    addresses: npt.NDArray[np.int64]

    @classmethod
    def random(cls, memory: int, pages: int, seed: int, *, exclude: int = 0) -> WritePattern:
        """``pages`` distinct data pages of a ``memory``-byte guest chosen from ``seed``, one
        address in each."""
        data_pages = (memory - DATA_BASE) // PAGE
        if not 0 < pages <= data_pages:
            raise ConfigError("pages", f"{pages} is not in 1..{data_pages} (the data region)")
        if pages > MAX_LIST:
            raise ConfigError("pages", f"at most {MAX_LIST} addresses fit the parameter area")
        rng = np.random.default_rng(seed)
        chosen = rng.choice(data_pages, pages, replace=False).astype(np.int64)
        offsets = rng.integers(0, PAGE // 8, pages) * 8
        return cls(DATA_BASE + chosen * PAGE + offsets)

    @property
    def pages(self) -> set[int]:
        """The pages written (4 KiB-aligned GPAs)."""
        return {int(a) & ~(PAGE - 1) for a in self.addresses}

    def split(self, parts: int) -> list[WritePattern]:
        """The pattern cut into ``parts`` consecutive pieces."""
        return [WritePattern(a) for a in np.array_split(self.addresses, parts)]

    def __len__(self) -> int:
        return len(self.addresses)


def put_list(guest: KvmGuest, addresses: npt.NDArray[np.int64], at: int = PARAM_AREA) -> int:
    """Write an address list into the parameter area (a host write: no dirty bit, no copy);
    returns its guest-physical address."""
    if at + 8 * len(addresses) > LOG_AREA:
        raise ConfigError("pages", f"at most {MAX_LIST} addresses fit the parameter area")
    guest.memory.write(at, np.asarray(addresses, "<u8").tobytes())
    return at
