"""The attacks on kernel code that do not (only) write the code page, and the guest's ordinary
page-table writes, as stores inserted into the integrity monitor's access stream.

``remap``
    The page-table remapping attack. The attacker copies one 4 KiB code page into a page it
    owns (a slab page) with its hook in it, builds a page table (another slab page) mapping the
    code's 2 MiB block 4 KiB by 4 KiB to the original code pages except that one, which goes to
    its copy, and swaps the page-directory entry of the code's linear address to point at its
    table. No store touches a code page: write traps on the code's guest-physical pages and PML
    see nothing. Effective when the processor's translation of the hooked code address reaches
    the copy (judged on the tables at the end of the run; stale TLB entries are not modelled as
    part of the attack: an attacker flushes them with INVLPG).
``alias``
    The attacker maps a code block writable at an unused linear address (a free entry of the
    direct map's page directory) and writes its hook through that alias. The store reaches the
    code's guest-physical page, so EPT write protection and PML see it as they see any other:
    they key on the guest-physical address, not on the linear one.
``restore``
    Write-then-restore: a hook, and ``restore_gap`` accesses later the original word written
    back. Between two PML reviews the page is logged but equals the golden copy.

``pt_updates`` (not an attack): the guest's own page-table writes in the page directory that
maps the code (mapping and unmapping 2 MiB regions in free entries next to the kernel image,
as module or vmalloc mappings do). They change no entry on the code's path; under ``trap-pt``
each costs an exit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..arch.bits import PAGE_SIZE, PageSize
from ..arch.paging import GuestEntry, Pte
from ..errors import ConfigError
from ..guest import DIRECT_MAP_BASE
from ..tables.guest import TABLE_FLAGS
from .integrity_guest import StoreInsert, jmp, with_insn

if TYPE_CHECKING:
    from .integrity_guest import CodeWrite, KernelActivity, KernelGuest, Stream

_2M = int(PageSize.SIZE_2M)
ATTACK_KINDS = ("remap", "alias", "restore")
TRIGGER = {"remap": "remap-pde", "alias": "alias-hook", "restore": "restore-hook"}
"""The store that makes each attack effective."""


@dataclass(frozen=True)
class Attack:
    """One attack: its kind, the code word it is about (GPA, and the code linear address that
    maps it), the hook value, the words whose report counts as catching it, and its stores."""

    kind: str
    target: int
    la: int
    value: int
    watch: frozenset[int]
    inserts: tuple[StoreInsert, ...]

    @property
    def trigger(self) -> StoreInsert:
        """The store that makes the attack effective."""
        return next(i for i in self.inserts if i.label == TRIGGER[self.kind])

    def first_index(self, stream: Stream) -> int:
        """Stream position of the attack's first store."""
        first = self.inserts[0]
        return self._index(stream, first)

    def trigger_write(self, stream: Stream) -> CodeWrite:
        """The trigger store as placed in ``stream``."""
        t = self.trigger
        index = self._index(stream, t)
        write = stream.store_at(index)
        assert write is not None
        return write

    @staticmethod
    def _index(stream: Stream, insert: StoreInsert) -> int:
        for w in stream.labelled(insert.label):
            if w.gpa == insert.gpa and w.value == insert.value:
                return w.index
        raise LookupError(f"{insert.label} store at {insert.gpa:#x} is not in the stream")


def plan_attacks(
    guest: KernelGuest, activity: KernelActivity, rng: np.random.Generator
) -> list[Attack]:
    """The remap, alias and restore attacks ``activity`` asks for, at random positions."""
    n = activity.accesses
    lo, hi = max(1, n // 50), max(2, n - n // 50)
    blocks = guest.section_blocks["code"]
    counts = (activity.remap_attacks, activity.alias_attacks, activity.restore_attacks)
    if activity.remap_attacks > len(blocks):
        raise ConfigError("remap_attacks", f"at most one per 2 MiB code block ({len(blocks)})")
    words = guest.random_code_words(rng, sum(counts), exclude=set(guest.sites))
    remap_blocks = rng.permutation(len(blocks))[: activity.remap_attacks].tolist()
    attacks: list[Attack] = []
    for i, block_index in enumerate(remap_blocks):
        block = blocks[block_index]
        target = block + (words[i] & (_2M - 1))
        attacks.append(_remap(guest, i, target, int(rng.integers(lo, hi)), rng))
    start = activity.remap_attacks
    for i in range(activity.alias_attacks):
        attacks.append(_alias(guest, i, words[start + i], int(rng.integers(lo, hi)), rng))
    start += activity.alias_attacks
    gap = activity.restore_gap
    for i in range(activity.restore_attacks):
        pos = int(rng.integers(lo, max(lo + 1, hi - gap)))
        attacks.append(_restore(guest, words[start + i], pos, gap, rng))
    return attacks


def _hook(guest: KernelGuest, gpa: int, rng: np.random.Generator) -> int:
    return with_insn(guest.read_word(gpa), jmp(-int(rng.integers(1 << 20, 1 << 30))))


def _remap(
    guest: KernelGuest, i: int, target: int, pos: int, rng: np.random.Generator
) -> Attack:
    """Copy the target's code page with the hook into a slab page, build a page table that
    maps the code block through the copy, swap the block's page-directory entry."""
    top = guest.slab_blocks[-1] + _2M
    payload, table = top - (2 * i + 1) * PAGE_SIZE, top - (2 * i + 2) * PAGE_SIZE
    page, block = target & ~(PAGE_SIZE - 1), target & ~(_2M - 1)
    hook = _hook(guest, target, rng)
    inserts = [
        StoreInsert(
            pos,
            payload + 8 * k,
            hook if page + 8 * k == target & ~7 else guest.read_word(page + 8 * k),
            False,
            "remap-payload",
        )
        for k in range(PAGE_SIZE // 8)
    ]
    flags = int(Pte.P | Pte.G)  # as the kernel maps its code: present, read-only, global
    for k in range(PAGE_SIZE // 8):
        frame = payload if block + k * PAGE_SIZE == page else block + k * PAGE_SIZE
        inserts.append(StoreInsert(pos, table + 8 * k, frame | flags, False, "remap-table"))
    la = guest.code_address(target)
    pde = guest.pde_address(la)
    inserts.append(StoreInsert(pos, pde, table | int(TABLE_FLAGS), False, "remap-pde"))
    return Attack("remap", target, la, hook, frozenset({pde, target & ~7}), tuple(inserts))


def _alias(guest: KernelGuest, i: int, target: int, pos: int, rng: np.random.Generator) -> Attack:
    """Map the target's 2 MiB code block writable at a free direct-map slot, write through it."""
    block = target & ~(_2M - 1)
    alias = DIRECT_MAP_BASE + guest.vm.memory + (i + 1) * _2M
    tables = guest.kernel.kernel_tables
    slot = tables.entry_address(alias, 2, create=True)  # a free entry of a page directory
    value = GuestEntry(
        level=2, address=block, writable=True, xd=True, page_size=True
    ).encode(tables.maxphyaddr)
    hook = _hook(guest, target, rng)
    inserts = (
        StoreInsert(pos, slot, value, False, "alias-pde"),
        StoreInsert(pos, target & ~7, hook, False, "alias-hook", alias + (target - block)),
    )
    la = guest.code_address(target)
    return Attack("alias", target, la, hook, frozenset({target & ~7}), inserts)


def _restore(
    guest: KernelGuest, target: int, pos: int, gap: int, rng: np.random.Generator
) -> Attack:
    """A hook, then the original word written back ``gap`` base accesses later."""
    original = guest.read_word(target)
    hook = _hook(guest, target, rng)
    inserts = (
        StoreInsert(pos, target & ~7, hook, False, "restore-hook"),
        StoreInsert(pos + gap, target & ~7, original, False, "restore"),
    )
    la = guest.code_address(target)
    return Attack("restore", target, la, hook, frozenset({target & ~7}), inserts)


def pt_update_inserts(
    guest: KernelGuest, count: int, n: int, rng: np.random.Generator
) -> list[StoreInsert]:
    """``count`` legitimate page-directory writes (map, unmap, map, ...) in free entries of
    the page directory that maps the kernel code."""
    if count <= 0:
        return []
    code = guest.sections["code"]
    pd = guest.pde_address(code.start) & ~(PAGE_SIZE - 1)
    words = guest.vm.words(pd, PAGE_SIZE // 8)
    free = [int(k) for k in np.flatnonzero(words == 0)]
    if not free:
        return []
    mapped = GuestEntry(
        level=2, address=guest.slab_blocks[0], writable=True, xd=True, page_size=True,
        global_=True,
    ).encode(guest.kernel.kernel_tables.maxphyaddr)
    positions = np.sort(rng.integers(0, n, count)).tolist()
    return [
        StoreInsert(
            pos, pd + 8 * free[(u // 2) % len(free)], mapped if u % 2 == 0 else 0, True,
            "pt-update",
        )
        for u, pos in enumerate(positions)
    ]


def attack_inserts(
    guest: KernelGuest, activity: KernelActivity, rng: np.random.Generator
) -> tuple[list[Attack], list[StoreInsert]]:
    """The attacks of ``activity`` and every store to insert for them and for its page-table
    updates."""
    attacks = plan_attacks(guest, activity, rng)
    stores = [s for a in attacks for s in a.inserts]
    stores += pt_update_inserts(guest, activity.pt_updates, activity.accesses, rng)
    return attacks, stores
