"""Where page tables live: a word-addressed store, host-physical or guest-physical."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import numpy.typing as npt

from ..arch.bits import PAGE_SHIFT, PAGE_SIZE
from ..errors import AddressError
from ..memory.physical import PhysicalMemory


class WordStore(Protocol):
    """Memory that page-table builders read and write, 8 bytes at a time."""

    def read_u64(self, address: int) -> int: ...

    def write_u64(self, address: int, value: int) -> None: ...

    def zero_page(self, address: int) -> None: ...

    def words(self, address: int, count: int) -> npt.NDArray[np.uint64]:
        """A writable view of ``count`` words from ``address`` (inside one 4 KiB page)."""
        ...


class HostStore:
    """Host-physical memory as a :class:`WordStore` (EPT tables; guest tables without EPT)."""

    def __init__(self, memory: PhysicalMemory) -> None:
        self.memory = memory

    def read_u64(self, address: int) -> int:
        return self.memory.read_u64(address)

    def write_u64(self, address: int, value: int) -> None:
        self.memory.write_u64(address, value)

    def zero_page(self, address: int) -> None:
        self.memory.discard(address >> PAGE_SHIFT)

    def words(self, address: int, count: int) -> npt.NDArray[np.uint64]:
        return _words(self.memory, address, count)


def _words(memory: PhysicalMemory, address: int, count: int) -> npt.NDArray[np.uint64]:
    first = (address & (PAGE_SIZE - 1)) >> 3
    if address & 7 or first + count > PAGE_SIZE // 8:
        raise AddressError(f"{count} words at {address:#x} do not fit in one aligned page")
    return memory.frame(address >> PAGE_SHIFT)[first : first + count]


class Translator(Protocol):
    def host_address(self, gpa: int) -> int | None: ...


class GuestPhysicalStore:
    """Guest-physical memory as a :class:`WordStore`: each address goes through the EPT tables
    (a software lookup by the builder: no A/D flags set, no permission check)."""

    def __init__(self, memory: PhysicalMemory, ept: Translator) -> None:
        self.memory, self.ept = memory, ept

    def _hpa(self, gpa: int) -> int:
        hpa = self.ept.host_address(gpa)
        if hpa is None:
            raise AddressError(f"guest-physical {gpa:#x} is not mapped by EPT")
        return hpa

    def read_u64(self, address: int) -> int:
        return self.memory.read_u64(self._hpa(address))

    def write_u64(self, address: int, value: int) -> None:
        self.memory.write_u64(self._hpa(address), value)

    def zero_page(self, address: int) -> None:
        self.memory.discard(self._hpa(address & ~(PAGE_SIZE - 1)) >> PAGE_SHIFT)

    def words(self, address: int, count: int) -> npt.NDArray[np.uint64]:
        return _words(self.memory, self._hpa(address), count)
