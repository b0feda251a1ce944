"""The guest OS model: a small kernel that owns guest-physical memory, builds per-process page
tables, pages in memory on demand, places its image and every user region with ASLR, and keeps
a page cache for file reads.

It is the guest side of the simulation: a guest page fault reaches it (not the hypervisor),
exactly as on hardware; its own writes into guest memory (page tables, file data) go through
the VM, so first touches of guest-physical memory back it as EPT violations would.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..arch.bits import PAGE_SIZE, PageSize
from ..arch.exits import PAGE_FAULT_VECTOR, GuestFault
from ..arch.paging import PageFaultError
from ..errors import ConfigError
from ..hv.vcpu import VCPU
from ..hv.vm import VM
from ..memory import FrameAllocator
from ..memory.allocator import Policy
from ..memory.layout import LayoutConfig
from ..tables import GuestPageTables
from ..traces.model import TraceChunk
from .layout import (
    DIRECT_MAP_BASE,
    KERNEL_TEXT_FLOOR,
    KERNEL_TEXT_WINDOW,
    USER_MMAP_TOP,
    USER_PROGRAM_BASE,
    USER_STACK_TOP,
    AslrConfig,
    KernelImage,
)

_2M = PageSize.SIZE_2M.value


@dataclass
class Region:
    """A virtual memory area: what may be there, and how it is mapped on demand."""

    start: int
    length: int
    kind: str  # code, rodata, data, program, heap, stack, mmap, direct-map
    writable: bool
    executable: bool
    user: bool

    def __contains__(self, address: int) -> bool:
        return self.start <= address < self.start + self.length


@dataclass
class Process:
    """A guest process: its page tables (sharing the kernel half) and its regions."""
    pid: int
    name: str
    tables: GuestPageTables
    regions: list[Region] = field(default_factory=list)
    bases: dict[str, int] = field(default_factory=dict)
    mmap_next: int = 0

    @property
    def cr3(self) -> int:
        """The guest-physical address of the process's top-level table."""
        return self.tables.root

    def region_of(self, address: int) -> Region | None:
        """The region holding ``address``, or None."""
        for region in self.regions:
            if address in region:
                return region
        return None


@dataclass(frozen=True)
class File:
    """A file of the guest's page cache: its name and size."""
    name: str
    size: int


class GuestKernel:
    """One guest OS instance running in ``vm``."""

    def __init__(
        self,
        vm: VM,
        *,
        seed: int = 0,
        aslr: AslrConfig | None = None,
        image: KernelImage | None = None,
        levels: int = 4,
        thp: bool = False,
        frame_policy: Policy = "sequential",
        layout: LayoutConfig | str | None = None,
        cma: int = 0,
        layout_seed: int | None = None,
    ) -> None:
        """``layout`` (None: the VM's): ``aged``, guest-physical frames come from an aged buddy
        allocator seeded by ``seed`` (its LIFO free lists reuse freed pages first, so
        ``frame_policy`` is not used); ``contiguous``, from an allocator of ``frame_policy``
        (``recycle``: freed pages are reused first, as Linux's per-CPU free lists do). Large
        pages (image, THP) come from compaction when no 2 MiB block is free. ``cma``: bytes of
        guest-physical memory to set aside as one contiguous run before anything else is
        allocated (like Linux's CMA area): :attr:`cma_base`, None without. ``layout_seed``:
        the aged allocator's seed, when it must differ from ``seed`` (the ASLR draws')."""
        self.vm, self.levels, self.thp = vm, levels, thp
        self.aslr, self.image = aslr or AslrConfig(), image or KernelImage()
        self.rng = np.random.default_rng(seed)
        self.layout = vm.layout if layout is None else LayoutConfig.of(layout)
        self.frames = FrameAllocator(  # guest-physical
            vm.memory,
            policy="aged" if self.layout.aged else frame_policy,
            seed=seed if layout_seed is None else layout_seed,
            aging=self.layout.aging,
            salt="guest",
        )
        self.cma_base = self.frames.alloc_run(cma) if cma else None
        self._cma_next, self._cma_end = self.cma_base or 0, (self.cma_base or 0) + cma
        self.counters: Counter[str] = Counter()
        self.processes: dict[int, Process] = {}
        self.current: dict[int, Process] = {}  # by vCPU engine id
        self.files: dict[str, File] = {}
        self.page_cache: dict[tuple[str, int], int] = {}  # (file, page index) -> GPA
        self.kernel_tables = self._new_tables()
        slots = 1 << self.aslr.kernel_bits
        self.kernel_base = KERNEL_TEXT_FLOOR + int(self.rng.integers(slots)) * (
            KERNEL_TEXT_WINDOW // 512
        )
        self.kernel_regions = self._map_kernel_image()
        self.kernel_regions.append(
            Region(DIRECT_MAP_BASE, vm.memory, "direct-map", True, False, False)
        )
        # create the kernel half's top-level entries now: processes copy them at spawn time
        for offset in range(0, vm.memory, 1 << 39):
            self.kernel_tables.entry_address(DIRECT_MAP_BASE + offset, 3, create=True)

    # -- guest-physical memory and page tables ----------------------------------------------------

    def _new_tables(self) -> GuestPageTables:
        return GuestPageTables(
            self.vm,
            self.frames.alloc,
            levels=self.levels,
            maxphyaddr=self.vm.hv.features.maxphyaddr,
        )

    def _map_kernel_image(self) -> list[Region]:
        regions = []
        address = self.kernel_base
        for kind, size, writable, executable in (
            ("code", self.image.code, False, True),
            ("rodata", self.image.rodata, False, False),
            ("data", self.image.data, True, False),
        ):
            for offset in range(0, size, _2M):
                gpa = self.frames.alloc(PageSize.SIZE_2M)
                self.kernel_tables.map(
                    address + offset,
                    gpa,
                    PageSize.SIZE_2M,
                    writable=writable,
                    xd=not executable,
                    global_=True,
                )
            regions.append(Region(address, size, kind, writable, executable, False))
            address += size
        return regions

    def cma_take(self, length: int) -> int | None:
        """The next ``length`` bytes (rounded up to 2 MiB) of the contiguous run set aside at
        boot (``cma``), or None when there is none or it is used up."""
        length = -(-length // _2M) * _2M
        if self.cma_base is None or self._cma_next + length > self._cma_end:
            return None
        self._cma_next += length
        return self._cma_next - length

    def kernel_region(self, kind: str) -> Region:
        """The kernel image region of ``kind`` (``code``, ``rodata``, ``data``)."""
        for region in self.kernel_regions:
            if region.kind == kind:
                return region
        raise ConfigError("kind", f"no kernel region {kind!r}")

    # -- processes ------------------------------------------------------------------------------

    def spawn(self, name: str = "proc", program_size: int = 4 << 20) -> Process:
        """A new process: own page tables with the kernel half shared, and randomized program,
        heap, stack and mmap bases."""
        tables = self._new_tables()
        kernel_root = self.kernel_tables.root
        user_root = tables.root
        top = self.vm.words(kernel_root, 512)
        self.vm.words(user_root, 512)[256:] = top[256:]  # the kernel half, shared
        pid = len(self.processes) + 1
        p = Process(pid, name, tables)
        r = self.rng
        program = USER_PROGRAM_BASE + int(r.integers(1 << self.aslr.program_bits)) * PAGE_SIZE
        program &= (1 << 47) - 1
        heap = program + program_size + int(r.integers(1 << self.aslr.heap_bits)) * PAGE_SIZE
        stack_top = USER_STACK_TOP - int(r.integers(1 << self.aslr.stack_bits)) * PAGE_SIZE
        mmap_base = USER_MMAP_TOP - int(r.integers(1 << self.aslr.mmap_bits)) * PAGE_SIZE
        p.bases = {"program": program, "heap": heap, "stack": stack_top, "mmap": mmap_base}
        p.regions = [
            Region(program, program_size, "program", False, True, True),
            Region(heap, 1 << 30, "heap", True, False, True),
            Region(stack_top - (8 << 20), 8 << 20, "stack", True, False, True),
        ]
        p.mmap_next = mmap_base
        self.processes[pid] = p
        return p

    def mmap(
        self, process: Process, length: int, *, writable: bool = True, executable: bool = False
    ) -> int:
        """Reserve an anonymous region below the previous one; pages come on first touch."""
        length = -(-length // PAGE_SIZE) * PAGE_SIZE
        process.mmap_next -= length
        align = _2M if self.thp and length >= _2M else PAGE_SIZE
        process.mmap_next &= ~(align - 1)
        process.regions.append(
            Region(process.mmap_next, length, "mmap", writable, executable, True)
        )
        return process.mmap_next

    def switch_to(self, vcpu: VCPU, process: Process) -> None:
        """Schedule ``process`` on ``vcpu``: MOV to CR3 (flushes its non-global translations)."""
        self.current[vcpu.engine_id] = process
        vcpu.guest_os = self
        self.vm.hv.engine.mov_cr3(vcpu.engine_id, process.cr3)
        self.counters["context_switches"] += 1

    # -- the page-fault handler -------------------------------------------------------------------

    def handle_fault(self, vcpu: VCPU, fault: GuestFault) -> bool:
        """Demand paging: a not-present fault inside a region gets a fresh frame and a mapping;
        anything else (protection, outside every region) is a segmentation fault."""
        if fault.vector != PAGE_FAULT_VECTOR or fault.error_code & PageFaultError.P:
            self.counters["protection_faults"] += 1
            return False
        process = self.current.get(vcpu.engine_id)
        address = fault.address
        region = None
        if address >> 63:
            region = next((r for r in self.kernel_regions if address in r), None)
        elif process is not None:
            region = process.region_of(address)
        if region is None or (fault.error_code & PageFaultError.US and not region.user):
            self.counters["segfaults"] += 1
            return False
        if region.kind == "direct-map":
            self._map_direct(address)
        else:
            assert process is not None or not region.user
            tables = process.tables if region.user and process else self.kernel_tables
            size = PageSize.SIZE_2M if self._huge(region, address) else PageSize.SIZE_4K
            gpa = self.frames.alloc(size)
            tables.map(
                address & ~(size - 1),
                gpa,
                size,
                writable=region.writable,
                user=region.user,
                xd=not region.executable,
            )
        self.counters["demand_faults"] += 1
        return True

    def _huge(self, region: Region, address: int) -> bool:
        base = address & ~(_2M - 1)
        return self.thp and region.start <= base and base + _2M <= region.start + region.length

    def _map_direct(self, address: int) -> None:
        """The direct map is built with 2 MiB pages as the kernel first touches each part."""
        base = address & ~(_2M - 1)
        self.kernel_tables.map(
            base, base - DIRECT_MAP_BASE, PageSize.SIZE_2M, global_=True, xd=True
        )

    # -- files and the page cache -------------------------------------------------------------

    def create_file(self, name: str, size: int) -> File:
        """Create a file of ``size`` bytes (its pages enter the page cache when read)."""
        self.files[name] = File(name, size)
        return self.files[name]

    def file_page(self, name: str, index: int) -> tuple[int, bool]:
        """GPA of page ``index`` of a file in the page cache, and whether it was a miss (a new
        guest-physical page was allocated for it and filled from the disk)."""
        key = (name, index)
        if key in self.page_cache:
            self.counters["page_cache_hits"] += 1
            return self.page_cache[key], False
        gpa = self.frames.alloc()
        self.page_cache[key] = gpa
        self.counters["page_cache_misses"] += 1
        return gpa, True

    def drop_page_cache(self) -> int:
        """Free every page-cache page (like ``echo 1 > /proc/sys/vm/drop_caches``)."""
        dropped = len(self.page_cache)
        for gpa in self.page_cache.values():
            self.frames.free(gpa)
        self.page_cache.clear()
        return dropped

    def read_file(
        self, name: str, offset: int, length: int, buffer: int
    ) -> tuple[TraceChunk, list[int]]:
        """What ``read(fd, buffer, length)`` does in memory: for each page, the kernel reads the
        page-cache page through the direct map and writes the user buffer (8-byte accesses
        every 64 bytes). Returns the accesses and the GPAs that missed in the page cache (the
        caller models the disk I/O that fills them)."""
        file = self.files[name]
        if offset < 0 or offset + length > file.size:
            raise ConfigError("read_file", f"{offset}+{length} is outside {name} ({file.size})")
        addresses: list[np.ndarray] = []
        kinds: list[np.ndarray] = []
        missed = []
        lines = np.arange(0, PAGE_SIZE, 64, dtype=np.int64)
        for index in range(offset // PAGE_SIZE, -(-(offset + length) // PAGE_SIZE)):
            gpa, miss = self.file_page(name, index)
            if miss:
                missed.append(gpa)
            src = DIRECT_MAP_BASE - (1 << 64) + gpa + lines
            dst = buffer + (index * PAGE_SIZE - offset) + lines
            addresses += [src, dst]
            kinds += [np.zeros(len(lines), np.int8), np.ones(len(lines), np.int8)]
        address = np.concatenate(addresses) if addresses else np.zeros(0, np.int64)
        kind = np.concatenate(kinds) if kinds else np.zeros(0, np.int8)
        return TraceChunk(address, kind, np.full(len(address), 8, np.int32)), missed
