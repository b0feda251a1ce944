"""What guest page tables and EPT tables have in common: a radix tree of 512-entry tables.

Subclasses say what an entry means (present? leaf? which address?); this class finds entries,
creates intermediate tables and installs leaves, always by writing real entries into memory.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..arch.bits import (
    ENTRIES_PER_TABLE,
    ENTRY_BYTES,
    LEVEL_NAMES,
    PageSize,
    level_shift,
    table_index,
)
from ..errors import AddressError, MappingError
from .store import WordStore


@dataclass(frozen=True, slots=True)
class Leaf:
    """Where a software lookup ended: the leaf entry that maps an address."""

    level: int
    entry_address: int
    value: int
    target: int  # the address the input translates to

    @property
    def page_size(self) -> PageSize:
        return PageSize.at_level(self.level)


class RadixTables(ABC):
    """A ``levels``-deep tree of tables in ``store``, rooted at a table from ``alloc_table``."""

    kind = "page-table"

    def __init__(self, store: WordStore, alloc_table: Callable[[], int], levels: int) -> None:
        if levels not in (4, 5):
            raise ValueError(f"levels must be 4 or 5, not {levels}")
        self.store, self.levels = store, levels
        self._alloc_table = alloc_table
        self.tables: list[int] = []  # addresses of every table page, root first
        self.root = self._new_table()

    # what an entry means: defined by subclasses
    @abstractmethod
    def _present(self, value: int) -> bool: ...

    @abstractmethod
    def _is_leaf(self, value: int, level: int) -> bool: ...

    @abstractmethod
    def _table_address(self, value: int) -> int: ...

    @abstractmethod
    def _leaf_address(self, value: int, level: int) -> int: ...

    @abstractmethod
    def _table_entry(self, table: int) -> int: ...

    # ---------------------------------------------------------------------------------------

    def _new_table(self) -> int:
        table = self._alloc_table()
        self.store.zero_page(table)
        self.tables.append(table)
        return table

    def entry_address(self, address: int, level: int, *, create: bool = False) -> int:
        """Address of the entry at ``level`` on the path of ``address``.

        With ``create``, missing intermediate tables are allocated; without it a missing table
        raises :class:`MappingError`. A leaf above ``level`` is a conflict either way.
        """
        table = self.root
        for lvl in range(self.levels, level, -1):
            slot = table + table_index(address, lvl) * ENTRY_BYTES
            value = self.store.read_u64(slot)
            if not self._present(value):
                if not create:
                    raise MappingError(
                        f"no {self.kind} table below {LEVEL_NAMES[lvl]} of {address:#x}"
                    )
                child = self._new_table()
                self.store.write_u64(slot, self._table_entry(child))
                table = child
            elif self._is_leaf(value, lvl):
                raise MappingError(
                    f"{address:#x} is inside a {PageSize.at_level(lvl).label} page mapped at "
                    f"{LEVEL_NAMES[lvl]}; unmap or split it first"
                )
            else:
                table = self._table_address(value)
        return table + table_index(address, level) * ENTRY_BYTES

    def _install(self, address: int, size: PageSize, value: int, *, replace: bool) -> None:
        if address % size:
            raise AddressError(f"{address:#x} is not aligned to {size.label}")
        slot = self.entry_address(address, size.level, create=True)
        old = self.store.read_u64(slot)
        if self._present(old):
            if size.level > 1 and not self._is_leaf(old, size.level):
                raise MappingError(
                    f"a {size.label} page at {address:#x} would hide an existing table"
                )
            if not replace:
                raise MappingError(f"{address:#x} is already mapped ({self.kind})")
        self.store.write_u64(slot, value)

    def _install_range(
        self, address: int, target: int, length: int, size: PageSize, flags: int
    ) -> int:
        """Map ``length`` bytes from ``address`` to ``target`` with ``size`` pages whose entries
        are ``target | flags``, one leaf table at a time (vectorized); returns pages mapped."""
        if address % size or target % size or length % size or length <= 0:
            raise AddressError(
                f"range {address:#x}+{length:#x} -> {target:#x} is not aligned to {size.label}"
            )
        span = size * ENTRIES_PER_TABLE  # bytes covered by one table of leaves
        done, end = 0, address + length
        while address + done < end:
            lo = address + done
            hi = min(end, (lo // span + 1) * span)
            count = (hi - lo) // size
            slot = self.entry_address(lo, size.level, create=True)
            words = self.store.words(slot, count)
            if np.any(words):
                raise MappingError(f"{self.kind}: part of {lo:#x}..{hi:#x} is already mapped")
            first = np.uint64(target + done)
            words[:] = (first + np.arange(count, dtype=np.uint64) * np.uint64(size)) | np.uint64(
                flags
            )
            done += hi - lo
        return length // size

    def _install_pages(
        self, addresses: npt.NDArray[np.int64], targets: npt.NDArray[np.int64], size: PageSize,
        flags: int,
    ) -> int:
        """Map each ``addresses[i]`` to ``targets[i]`` with ``size`` pages whose entries are
        ``target | flags``, one leaf table at a time (vectorized; for scattered placements);
        returns pages mapped."""
        addresses = np.asarray(addresses, np.int64)
        targets = np.asarray(targets, np.int64)
        if len(addresses) != len(targets):
            raise AddressError(f"{len(addresses)} addresses for {len(targets)} targets")
        if np.any(addresses % size) or np.any(targets % size):
            raise AddressError(f"pages to map are not aligned to {size.label}")
        if len(addresses) == 0:
            return 0
        span = int(size) * ENTRIES_PER_TABLE
        order = np.argsort(addresses, kind="stable")
        addresses, targets = addresses[order], targets[order]
        tables = addresses // span
        cuts = np.flatnonzero(np.diff(tables)) + 1
        for lo, hi in zip(
            np.concatenate([[0], cuts]).tolist(),
            np.concatenate([cuts, [len(addresses)]]).tolist(),
            strict=True,
        ):
            first = int(tables[lo]) * span
            slot = self.entry_address(first, size.level, create=True)
            words = self.store.words(slot, ENTRIES_PER_TABLE)
            index = (addresses[lo:hi] - first) // int(size)
            if np.any(words[index]):
                raise MappingError(f"{self.kind}: a page near {first:#x} is already mapped")
            words[index] = targets[lo:hi].astype(np.uint64) | np.uint64(flags)
        return len(addresses)

    def lookup(self, address: int) -> Leaf | None:
        """Software walk without side effects: the leaf that maps ``address``, or None."""
        table = self.root
        for level in range(self.levels, 0, -1):
            slot = table + table_index(address, level) * ENTRY_BYTES
            value = self.store.read_u64(slot)
            if not self._present(value):
                return None
            if self._is_leaf(value, level):
                offset = address & ((1 << level_shift(level)) - 1)
                return Leaf(level, slot, value, self._leaf_address(value, level) | offset)
            table = self._table_address(value)
        raise AssertionError("unreachable: level 1 entries are leaves")

    def mapped(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, Leaf]]:
        """``(page address, leaf)`` of every present leaf overlapping ``[start, end)``, in
        address order; unmapped parts of the tree are skipped wholesale."""
        top = 1 << level_shift(self.levels + 1)
        stop = top if end is None else end

        def visit(table: int, level: int, base: int) -> Iterator[tuple[int, Leaf]]:
            span = 1 << level_shift(level)
            words = self.store.words(table, ENTRIES_PER_TABLE)
            for index in np.flatnonzero(words).tolist():
                low = base + index * span
                if low + span <= start or low >= stop:
                    continue
                value = int(words[index])
                if not self._present(value):
                    continue
                if self._is_leaf(value, level):
                    target = self._leaf_address(value, level)
                    yield low, Leaf(level, table + index * ENTRY_BYTES, value, target)
                else:
                    yield from visit(self._table_address(value), level - 1, low)

        yield from visit(self.root, self.levels, 0)

    def unmap(self, address: int) -> Leaf:
        """Clear the leaf that maps ``address``; returns what was there."""
        leaf = self.lookup(address)
        if leaf is None:
            raise MappingError(f"{address:#x} is not mapped ({self.kind})")
        self.store.write_u64(leaf.entry_address, 0)
        return leaf
