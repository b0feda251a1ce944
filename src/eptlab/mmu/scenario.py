"""A guest address space under EPT, built in memory and ready to walk.

Composes host memory, a host frame allocator, EPT tables, a guest-physical allocator and guest
page tables. Guest page-table pages live in guest-physical memory (below ``TABLE_REGION``) and
are mapped by EPT with 4 KiB pages; data pages are placed above it.

``layout`` (:class:`eptlab.memory.LayoutConfig`): ``aged`` (the default) takes guest-physical
frames (tables and data, each from its own region) and host frames from aged buddy allocators,
so consecutive guest pages are scattered in both dimensions; 2 MiB blocks come from compaction
(never a smaller page). ``contiguous`` hands both out in address order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..arch.bits import PAGE_SIZE, PageSize
from ..arch.ept import parse_permissions
from ..arch.paging import Cr4, Efer
from ..errors import AddressError, ConfigError
from ..memory import FrameAllocator, PhysicalMemory
from ..memory.allocator import Policy
from ..memory.layout import LayoutConfig, resolve
from ..tables import EptTables, GuestPageTables, GuestPhysicalStore, HostStore
from ..tables.store import WordStore
from .context import CpuFeatures, GuestState, Vmcs
from .walker import ReferenceWalker

TABLE_REGION = PageSize.SIZE_1G.value
"""Guest-physical [0, 1 GiB) holds guest page tables; data pages are allocated above it."""


@dataclass
class NestedSpace:
    """One guest address space and its EPT, with the allocators that built them."""

    memory: PhysicalMemory
    host_frames: FrameAllocator
    guest_frames: FrameAllocator
    ept: EptTables | None
    tables: GuestPageTables
    guest: GuestState
    vmcs: Vmcs | None
    features: CpuFeatures
    _table_frames: FrameAllocator
    layout: LayoutConfig
    _backed: set[int] = field(default_factory=set)  # aged: large data EPT pages backed so far

    @classmethod
    def create(
        cls,
        *,
        guest_levels: int = 4,
        ept_levels: int = 4,
        use_ept: bool = True,
        ept_ad: bool = False,
        mbec: bool = False,
        host_memory: int = 1 << 40,
        guest_memory: int = 1 << 40,
        host_policy: Policy = "sequential",
        seed: int = 0,
        features: CpuFeatures | None = None,
        cr0: int | None = None,
        cr4_extra: int = 0,
        efer: int | None = None,
        table_ept_page: PageSize = PageSize.SIZE_4K,
        key_id: int = 0,
        layout: LayoutConfig | str | None = None,
    ) -> NestedSpace:
        """``layout``: ``aged`` (None: the default, see :func:`eptlab.memory.layout.layout_scope`)
        or ``contiguous`` placement of guest-physical and host frames
        (module docstring; ``host_policy`` applies to ``contiguous`` only).
        ``table_ept_page``: the EPT page size backing the guest page-table pages (a
        hypervisor backs all of guest RAM alike, page tables included). ``key_id``: with
        ``features.keyid_bits``, the TME-MK key ID the EPT leaves give the guest's memory
        (host memory must fit below the key-ID bits)."""
        features = features or CpuFeatures()
        keyids = features.keyids if features.keyid_bits else None
        if key_id and not use_ept:
            raise ConfigError(
                "key_id", "native paging: key IDs in the guest's own page tables are not modelled"
            )
        memory = PhysicalMemory(host_memory, keyids=keyids)
        lay = resolve(layout)
        aged: Policy = "aged"
        aging = lay.aging
        host_frames = FrameAllocator(
            host_memory, policy=aged if lay.aged else host_policy, seed=seed, aging=aging,
            salt="host",
        )
        guest_policy: Policy = aged if lay.aged else "sequential"
        table_frames = FrameAllocator(
            TABLE_REGION, base=0, policy=guest_policy, seed=seed, aging=aging, salt="guest-tables"
        )
        guest_frames = FrameAllocator(
            guest_memory - TABLE_REGION, base=TABLE_REGION, policy=guest_policy, seed=seed,
            aging=aging, salt="guest",
        )
        ept = (
            EptTables(
                HostStore(memory),
                host_frames.alloc,
                levels=ept_levels,
                maxphyaddr=features.maxphyaddr,
                ad_enabled=ept_ad,
                mbec=mbec,
                keyids=keyids,
                key_id=key_id,
            )
            if use_ept
            else None
        )
        store: WordStore = GuestPhysicalStore(memory, ept) if ept else HostStore(memory)

        table_page = PageSize(table_ept_page)

        def alloc_guest_table() -> int:
            gpa = table_frames.alloc()
            if ept is not None and ept.lookup(gpa) is None:
                base = gpa & ~(table_page - 1)
                ept.map(base, host_frames.alloc(table_page), table_page)
            return gpa

        tables = GuestPageTables(
            store, alloc_guest_table, levels=guest_levels, maxphyaddr=features.maxphyaddr
        )
        cr4 = Cr4.PAE | (Cr4.LA57 if guest_levels == 5 else 0) | cr4_extra
        kwargs: dict[str, int] = {"cr3": tables.root, "cr4": int(cr4)}
        if cr0 is not None:
            kwargs["cr0"] = cr0
        kwargs["efer"] = efer if efer is not None else int(Efer.LME | Efer.LMA | Efer.NXE)
        guest = GuestState(**kwargs)
        vmcs = Vmcs(eptp=ept.eptp, mbec=mbec) if ept else None
        return cls(
            memory, host_frames, guest_frames, ept, tables, guest, vmcs, features, table_frames,
            lay,
        )

    def map_ept(self, gpa: int, size: PageSize = PageSize.SIZE_4K, perms: str = "rwx") -> int:
        """Back the ``size`` EPT page containing ``gpa`` with a fresh host block; returns its
        HPA. ``perms`` may be any string of :func:`parse_permissions`, misconfigurations too."""
        assert self.ept is not None, "this space has no EPT"
        size = PageSize(size)
        hpa = self.host_frames.alloc(size)
        self.ept.map(gpa & ~(size - 1), hpa, size)
        if self.layout.aged and size != PageSize.SIZE_4K:
            self._backed.add(gpa & ~(size - 1))
        if perms != "rwx":
            self.ept.set_permission_bits(gpa, parse_permissions(perms))
        return hpa

    def map(
        self,
        gva: int,
        guest_page: PageSize = PageSize.SIZE_4K,
        ept_page: PageSize = PageSize.SIZE_4K,
        *,
        ept_perms: str = "rwx",
        writable: bool = True,
        user: bool = False,
        xd: bool = False,
        pkey: int = 0,
    ) -> int:
        """Map the guest page at ``gva`` to fresh guest-physical memory and back the
        ``ept_page`` that contains ``gva``'s guest-physical address with host memory (the rest
        of a guest page larger than ``ept_page`` stays unbacked); returns the guest page's GPA."""
        guest_page, ept_page = PageSize(guest_page), PageSize(ept_page)
        # the guest page gets a whole EPT page of its own (aged: wherever the buddy allocator
        # finds one); guest-physical memory an EPT page already backs is not backed again
        base = self.guest_frames.alloc(max(guest_page, ept_page))
        self.tables.map(
            gva & ~(guest_page - 1),
            base,
            guest_page,
            writable=writable,
            user=user,
            xd=xd,
            pkey=pkey,
        )
        gpa = base + (gva & (guest_page - 1))
        if self.ept is not None and not (self.layout.aged and self.ept.lookup(gpa) is not None):
            self.map_ept(gpa, ept_page, ept_perms)
        return base

    def map_range(
        self,
        gva: int,
        length: int,
        guest_page: PageSize = PageSize.SIZE_4K,
        ept_page: PageSize = PageSize.SIZE_4K,
        *,
        writable: bool = True,
        user: bool = False,
    ) -> None:
        """Map and fully back ``length`` bytes of guest-linear memory at ``gva`` (vectorized;
        fine for tens of GiB of 4 KiB pages). Contiguous: in 1 GiB pieces (2 MiB ones for less).
        Aged: each guest page gets its own guest-physical block, and each EPT page of
        guest-physical memory those pages touch its own host block (shared with whatever else
        lies in it)."""
        guest_page, ept_page = PageSize(guest_page), PageSize(ept_page)
        if self.layout.aged:
            self._map_range_aged(gva, length, guest_page, ept_page, writable, user)
            return
        piece = PageSize.SIZE_1G if length >= PageSize.SIZE_1G else PageSize.SIZE_2M
        if max(guest_page, ept_page) > piece or gva % piece or length % piece:
            raise AddressError(f"map_range wants {piece.label}-aligned ranges of whole pieces")
        for offset in range(0, length, piece):
            gpa = self.guest_frames.alloc(piece)
            self.tables.map_range(
                gva + offset, gpa, piece, guest_page, writable=writable, user=user
            )
            if self.ept is not None:
                self.ept.map_range(gpa, self.host_frames.alloc(piece), piece, ept_page)

    def _map_range_aged(
        self, gva: int, length: int, guest_page: PageSize, ept_page: PageSize, writable: bool,
        user: bool,
    ) -> None:
        if gva % guest_page or length % guest_page or length <= 0:
            raise AddressError(f"{gva:#x}+{length:#x} is not aligned to {guest_page.label}")
        count = length // guest_page
        if guest_page == PageSize.SIZE_4K:
            gpas = self.guest_frames.alloc_pages(count)
        else:
            gpas = np.array([self.guest_frames.alloc(guest_page) for _ in range(count)], np.int64)
        gvas = gva + np.arange(count, dtype=np.int64) * int(guest_page)
        self.tables.map_pages(gvas, gpas, guest_page, writable=writable, user=user)
        if self.ept is None:
            return
        step = int(ept_page)
        if guest_page > ept_page:
            gpas = (gpas[:, None] + np.arange(guest_page // step, dtype=np.int64) * step).ravel()
        pages = gpas - gpas % step
        _, first = np.unique(pages, return_index=True)
        pages = pages[np.sort(first)]  # each EPT page once, in first-touch order
        if ept_page != PageSize.SIZE_4K:  # a large EPT page may hold pages mapped before
            backed = self._backed
            pages = pages[np.array([p not in backed for p in pages.tolist()], bool)]
            backed.update(pages.tolist())
        if ept_page == PageSize.SIZE_4K:
            hpas = self.host_frames.alloc_pages(len(pages))
        else:
            hpas = np.array([self.host_frames.alloc(ept_page) for _ in pages.tolist()], np.int64)
        self.ept.map_pages(pages, hpas, ept_page)

    def protect_tables(self, perms: str) -> None:
        """Give every EPT leaf that maps a guest page-table page the permissions ``perms``."""
        assert self.ept is not None, "this space has no EPT"
        bits_ = parse_permissions(perms)
        for table in self.tables.tables:
            self.ept.set_permission_bits(table, bits_)

    def walker(self) -> ReferenceWalker:
        """A reference walker over this space's memory, guest state, VMCS and CPU features."""
        return ReferenceWalker(self.memory, self.guest, self.vmcs, self.features)

    @property
    def host_bytes_backed(self) -> int:
        """Bytes of host memory actually backed (touched frames)."""
        return self.memory.backed_frames * PAGE_SIZE
