"""Host-physical memory: 4 KiB frames of 512 little-endian 64-bit words, backed sparsely.

Only frames that have been written hold storage (a row of one growable numpy array); reading a
frame that was never written gives zeros, as freshly zeroed RAM would. A machine with 1 TiB of
physical address space that touches 1,000 frames holds 1,000 rows (about 4 MiB).

With TME-MK key IDs (``keyids``), addresses may carry a key ID in their top bits
(:mod:`eptlab.arch.mktme`): the part below it must lie inside ``size``, and storage is kept per
full address, key ID included. A VM uses one key ID for all its memory, so every access to a
frame goes through the same key; the same DRAM frame read through another key ID (on hardware:
ciphertext decrypted with the wrong key) is not modelled, it reads as separate storage.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ..arch.bits import ENTRIES_PER_TABLE, PAGE_SHIFT, PAGE_SIZE
from ..arch.mktme import KeyIdLayout
from ..errors import AddressError, ConfigError

Frame = npt.NDArray[np.uint64]

HASH_MULTIPLIER = 0x9E3779B97F4A7C15
"""Fibonacci hashing of frame numbers; :mod:`eptlab.mmu.kernels.memory` uses the same."""
EMPTY, TOMBSTONE = -1, -2


def frame_hash(pfn: int, mask: int) -> int:
    """Home slot of frame ``pfn`` in an open-addressing table of ``mask + 1`` slots."""
    return (((pfn * HASH_MULTIPLIER) & 0xFFFF_FFFF_FFFF_FFFF) >> 32) & mask


class PhysicalMemory:
    """A physical address space of ``size`` bytes made of sparsely backed 4 KiB frames."""

    def __init__(
        self, size: int, *, initial_frames: int = 64, keyids: KeyIdLayout | None = None
    ) -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise ConfigError("size", f"{size} is not a positive multiple of 4 KiB")
        if keyids is not None:
            keyids.check_memory(size)
        self.size = size
        self.keyids = keyids
        self._row_of: dict[int, int] = {}  # frame number -> row of self._rows
        self._rows: Frame = np.zeros((max(1, initial_frames), ENTRIES_PER_TABLE), np.uint64)
        self._free_rows: list[int] = []
        self._next_row = 0
        # The same frame -> row map as an open-addressing hash table in a numpy array, for the
        # numba kernels (which cannot read a dict): rows of (frame number | EMPTY | TOMBSTONE,
        # row); key and row side by side, so a probe touches one host cache line.
        self._htable = np.zeros((1024, 2), np.int64)
        self._htable[:, 0] = EMPTY
        self._hused = 0  # live keys + tombstones
        self.generation = 0  # bumped whenever a frame gains or loses storage

    # -- frames -------------------------------------------------------------------------------

    def _check(self, address: int, length: int = 1) -> None:
        if self.keyids is not None and 0 <= address < 1 << self.keyids.maxphyaddr:
            address = self.keyids.strip(address)  # the key ID selects a key, not a location
        if address < 0 or address + length > self.size:
            raise AddressError(
                f"physical address {address:#x}+{length} is outside memory of {self.size:#x} bytes"
            )

    def frame(self, pfn: int) -> Frame:
        """The 512 words of frame ``pfn`` as a writable view, creating (zeroed) storage."""
        row = self._row_of.get(pfn)
        if row is None:
            self._check(pfn << PAGE_SHIFT, PAGE_SIZE)
            row = self._new_row()
            self._hash_insert(pfn, row)  # first: a rehash re-inserts what the dict holds
            self._row_of[pfn] = row
            self.generation += 1
        return self._rows[row]  # type: ignore[no-any-return]

    def peek_frame(self, pfn: int) -> Frame | None:
        """The words of frame ``pfn`` if it is backed, else None (no storage is created)."""
        row = self._row_of.get(pfn)
        return None if row is None else self._rows[row]

    def _new_row(self) -> int:
        if self._free_rows:
            row = self._free_rows.pop()
            self._rows[row] = 0
            return row
        if self._next_row == len(self._rows):
            grown = np.zeros((2 * len(self._rows), ENTRIES_PER_TABLE), np.uint64)
            grown[: len(self._rows)] = self._rows
            self._rows = grown
        self._next_row += 1
        return self._next_row - 1

    def discard(self, pfn: int) -> None:
        """Drop the storage of frame ``pfn``: it reads as zeros again."""
        row = self._row_of.pop(pfn, None)
        if row is not None:
            self.generation += 1
            self._free_rows.append(row)
            self._htable[self._hash_slot(pfn), 0] = TOMBSTONE

    # -- the kernel-visible hash table ----------------------------------------------------------

    def _hash_slot(self, pfn: int) -> int:
        table, mask = self._htable, len(self._htable) - 1
        slot = frame_hash(pfn, mask)
        while table[slot, 0] != pfn:
            slot = (slot + 1) & mask
        return slot

    def _hash_insert(self, pfn: int, row: int) -> None:
        if 2 * (self._hused + 1) > len(self._htable):
            self._rehash(max(1024, 4 * len(self._row_of)))
        table, mask = self._htable, len(self._htable) - 1
        slot = frame_hash(pfn, mask)
        while table[slot, 0] >= 0:  # pfn is not present (the dict said so): take the first free
            slot = (slot + 1) & mask
        if table[slot, 0] == EMPTY:
            self._hused += 1
        table[slot, 0], table[slot, 1] = pfn, row

    def _rehash(self, minimum: int) -> None:
        size = 1 << (minimum - 1).bit_length()
        self._htable = np.zeros((size, 2), np.int64)
        self._htable[:, 0] = EMPTY
        self._hused = 0
        for pfn, row in self._row_of.items():
            self._hash_insert(pfn, row)

    def kernel_arrays(self) -> tuple[Frame, npt.NDArray[np.int64]]:
        """``(rows, hash table)``: what the numba kernels read and write. Valid until the next
        frame is created (arrays may be reallocated then)."""
        return self._rows, self._htable

    def copy_frame(self, src_pfn: int, dst_pfn: int) -> None:
        """Copy the 4 KiB of frame ``src_pfn`` into ``dst_pfn``."""
        src = self.peek_frame(src_pfn)
        if src is None:
            self.discard(dst_pfn)
        else:
            data = src.copy()  # the destination may grow the array and move ``src``
            self.frame(dst_pfn)[:] = data

    @property
    def backed_frames(self) -> int:
        return len(self._row_of)

    @property
    def nbytes(self) -> int:
        """Bytes of host RAM the storage array occupies (grows by doubling)."""
        return int(self._rows.nbytes)

    # -- words and bytes ----------------------------------------------------------------------

    def read_u64(self, address: int) -> int:
        """The 8-byte-aligned little-endian word at ``address``."""
        if address & 7:
            raise AddressError(f"{address:#x} is not 8-byte aligned")
        self._check(address, 8)
        row = self._row_of.get(address >> PAGE_SHIFT)
        if row is None:
            return 0
        return int(self._rows[row, (address & (PAGE_SIZE - 1)) >> 3])

    def write_u64(self, address: int, value: int) -> None:
        if address & 7:
            raise AddressError(f"{address:#x} is not 8-byte aligned")
        if not 0 <= value < 1 << 64:
            raise ValueError(f"{value:#x} does not fit in 64 bits")
        self._check(address, 8)
        self.frame(address >> PAGE_SHIFT)[(address & (PAGE_SIZE - 1)) >> 3] = value

    def read(self, address: int, length: int) -> bytes:
        """``length`` bytes from ``address`` (may cross frames)."""
        self._check(address, length)
        out = bytearray()
        while length:
            pfn, offset = address >> PAGE_SHIFT, address & (PAGE_SIZE - 1)
            chunk = min(length, PAGE_SIZE - offset)
            frame = self.peek_frame(pfn)
            out += (
                bytes(chunk)
                if frame is None
                else frame.view(np.uint8)[offset : offset + chunk].tobytes()
            )
            address, length = address + chunk, length - chunk
        return bytes(out)

    def write(self, address: int, data: bytes) -> None:
        self._check(address, len(data))
        view = memoryview(data)
        while view:
            pfn, offset = address >> PAGE_SHIFT, address & (PAGE_SIZE - 1)
            chunk = min(len(view), PAGE_SIZE - offset)
            self.frame(pfn).view(np.uint8)[offset : offset + chunk] = np.frombuffer(
                view[:chunk], np.uint8
            )
            address, view = address + chunk, view[chunk:]
