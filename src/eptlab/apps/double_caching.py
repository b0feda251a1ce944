"""Double caching, seen from the EPT: a guest reads files from a virtual disk while the host
caches the same disk image in its own page cache -- through a virtio block device into the
guest's page cache (two copies of the data in host RAM), or through a DAX window that maps the
host cache's pages straight into the guest (one copy).

The virtio-blk read path (:class:`GuestFileReader`), one readahead window at a time:
    1. ``read(fd, buf, window)`` looks each file page up in the guest page cache
       (:meth:`GuestKernel.read_file`); a miss allocates a guest-physical page for it.
    2. With ``init_on_alloc=1`` (the default of most distribution kernels) the guest zeroes
       each newly allocated page: its first touch of that guest-physical page. When the host
       has never backed the page, the access takes an EPT violation (SDM Vol. 3C §29.3.3) and
       the hypervisor's lazy-backing handler gives it a fresh, zeroed host frame. With
       ``init_on_alloc=0`` the device's write (step 3) is the first touch instead: a host page
       fault in the VMM's mapping, no exit (:mod:`eptlab.apps.host_touch`); the guest's first
       access (step 4) then takes the EPT violation, which only maps the host's frame.
    3. The driver queues one virtio block request per run of consecutive missing pages and
       notifies the device (one exit); the hypervisor serves them from its page cache or the
       disk (:class:`~eptlab.apps.virtio_blk.VirtioBlk`) and writes the data into the pages.
    4. The kernel copies the pages to the user buffer (direct-map reads, buffer writes).

The DAX read path (:class:`DaxFileReader`): ``read()`` copies each file page from the window
(:class:`~eptlab.apps.dax.DaxWindow`, in the kernel's direct map) to the user buffer. The first
access to a window page is an EPT violation that the window's handler serves from the host
cache (a hit) or the disk (a miss), mapping the cache's frame itself.
Every guest access runs on the engine, so the EPT violations are the engine's count.

What the hypervisor sees: on the virtio-blk path an EPT violation marks a guest-physical page
touched for the first time, which happens when the guest allocates memory it has never used,
whatever the data source is. A guest page that was freed and is reused (page cache dropped,
then refilled) is already backed: no exit, unless the guest gave it back (free page reporting,
:func:`report_free_pages`) and the hypervisor dropped its frame. On the DAX path an EPT
violation marks a file page the guest reads for the first time, and the host cache decides
what it costs.

Forensics (:func:`residency`): which host frames hold the same disk block twice -- once in a
page of the guest's page cache and once in the host page cache (compared byte for byte) --,
which host frames behind pages the guest has freed still hold disk blocks (recognised by their
contents: dropping the guest cache frees guest memory, not host memory), and which DAX window
pages are the host cache's own frames.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..arch.access import Access
from ..arch.bits import PAGE_SHIFT, PAGE_SIZE, PageSize
from ..errors import ConfigError, EptlabError
from ..guest import DIRECT_MAP_BASE, GuestKernel, Process
from ..guest.kernel import Region
from ..hv import VCPU, VM, GuestAction, Hypercall, Hypervisor, Run
from ..hv.costs import hv_costs
from ..hv.program import Segment
from ..mmu.config import MmuConfig
from ..traces.model import TraceChunk
from .dax import DaxWindow
from .disk import Disk, disk_model
from .host_cache import HostCosts, HostPageCache
from .host_touch import HostTouch
from .virtio_blk import BlockRequest, DeviceCounters, HostIo, VirtioBlk

MiB = 1 << 20
PATHS = ("virtio-blk", "dax")
HOST_CACHES = ("cold", "warm", "direct")
GUEST_CACHES = ("cold", "warm", "dropped", "dropped-reported")
DAX_HOST_CACHES = ("cold", "warm")  # the window is the host cache's pages: no O_DIRECT
DAX_GUEST_CACHES = ("cold", "warm")  # no guest page cache to drop
EPT_PAGES = {"4k": PageSize.SIZE_4K, "2m": PageSize.SIZE_2M}
_LINES = np.arange(0, PAGE_SIZE, 64, dtype=np.int64)
_2M = PageSize.SIZE_2M.value
GUEST_RESERVE_MIB = 64  # guest memory besides the page cache: kernel image, page tables, buffer


def _kernel_chunk(addresses: list[int], kind: Access) -> TraceChunk:
    """One 8-byte access per 64-byte line of each page, through the direct map."""
    base = np.asarray(addresses, np.int64) + (DIRECT_MAP_BASE - (1 << 64))
    a = (base[:, None] + _LINES[None, :]).reshape(-1)
    return TraceChunk(a, np.full(len(a), int(kind), np.int8), np.full(len(a), 8, np.int32))


class FileReader(ABC):
    """The guest side common to both paths: files laid out on the disk in extents, a user
    buffer of one ``window`` (the size of each ``read()`` call), the read loop."""

    vm: VM
    cache: HostPageCache
    disk: Disk
    window_device: DaxWindow | None = None

    def __init__(
        self,
        kernel: GuestKernel,
        process: Process,
        disk: Disk,
        extents: dict[str, int],
        *,
        window: int = 128 << 10,
    ) -> None:
        if window <= 0 or window % PAGE_SIZE:
            raise ConfigError("readahead_kib", f"{window} bytes is not a multiple of 4 KiB")
        for name, first in extents.items():
            if name not in kernel.files:
                raise ConfigError("extents", f"{name!r} is not a file of the guest")
            pages = -(-kernel.files[name].size // PAGE_SIZE)
            if first < 0 or first + pages > disk.blocks:
                raise ConfigError("extents", f"{name!r} does not fit on the disk at block {first}")
        self.kernel, self.process, self.disk = kernel, process, disk
        self.extents, self.window = extents, window
        self.buffer = kernel.mmap(process, window)
        self.pages_allocated = 0  # guest page-cache pages allocated
        self.pages_read = 0  # file pages copied to the user buffer

    def touch_buffer(self) -> list[Segment]:
        """The user buffer's first writes (demand paging, first touches): done before measuring
        so that only the page cache's pages are new during a read."""
        pages = self.buffer + np.arange(0, self.window, PAGE_SIZE, dtype=np.int64)
        n = len(pages)
        return [Run(TraceChunk(pages, np.ones(n, np.int8), np.full(n, 8, np.int32)))]

    def block_of(self, name: str, index: int) -> int:
        """The disk block holding page ``index`` of file ``name``."""
        return self.extents[name] + index

    def key(self, block: int) -> tuple[int, int]:
        """The host cache's key of disk block ``block``."""
        return (self.disk.image, block)

    def read(self, names: list[str]) -> Iterator[Segment]:
        """The vCPU program of reading ``names`` whole, one ``window`` per read() call."""
        for name in names:
            size = self.kernel.files[name].size
            for offset in range(0, size, self.window):
                length = min(self.window, size - offset)
                self.pages_read += -(-(offset + length) // PAGE_SIZE) - offset // PAGE_SIZE
                yield from self._read_window(name, offset, length)

    @abstractmethod
    def _read_window(self, name: str, offset: int, length: int) -> Iterator[Segment]:
        """The vCPU program of one ``read()`` call: ``length`` bytes of ``name`` at ``offset``."""


class GuestFileReader(FileReader):
    """The virtio-blk path: the guest page cache, its new pages, the driver."""

    def __init__(
        self,
        kernel: GuestKernel,
        process: Process,
        device: VirtioBlk,
        extents: dict[str, int],
        *,
        window: int = 128 << 10,
        init_on_alloc: bool = True,
    ) -> None:
        """``init_on_alloc``: the guest zeroes each new page before use (the default of most
        distribution kernels); without it, the device's write is the page's first touch (the
        device then needs a :class:`~eptlab.apps.host_touch.HostTouch`)."""
        super().__init__(kernel, process, device.disk, extents, window=window)
        if not init_on_alloc and device.host_touch is None:
            raise ConfigError("init_on_alloc", "a guest that does not zero its new pages needs "
                              "a device that may touch them first (host_touch)")
        self.device, self.init_on_alloc = device, init_on_alloc
        self.vm, self.cache = device.vm, device.cache

    def _read_window(self, name: str, offset: int, length: int) -> Iterator[Segment]:
        kernel = self.kernel
        first, end = offset // PAGE_SIZE, -(-(offset + length) // PAGE_SIZE)
        missing = [i for i in range(first, end) if (name, i) not in kernel.page_cache]
        copy, gpas = kernel.read_file(name, offset, length, self.buffer)
        if len(gpas) != len(missing):
            raise EptlabError(f"page cache of {name} changed under the read")
        if gpas:
            self.pages_allocated += len(gpas)
            if self.init_on_alloc:
                yield Run(_kernel_chunk(gpas, Access.WRITE), user=False)  # the zeroing
                yield GuestAction(_zeroing(tuple(gpas)), "zero new pages")
            start = 0  # one request per run of consecutive missing pages
            for k in range(1, len(missing) + 1):
                if k == len(missing) or missing[k] != missing[k - 1] + 1:
                    self._submit(name, missing[start], gpas[start:k])
                    start = k
            yield Hypercall(self.device.notify, (len(missing),))
        yield Run(copy, user=False)  # copy_to_user: page-cache reads, buffer writes

    def _submit(self, name: str, index: int, gpas: list[int]) -> None:
        self.device.submit(BlockRequest(self.block_of(name, index), tuple(gpas)))


class DaxFileReader(FileReader):
    """The DAX path: a DAX file system on the pmem device; ``read()`` copies file data
    straight from the window (through the kernel's direct map) to the user buffer, with no
    guest page cache."""

    def __init__(
        self,
        kernel: GuestKernel,
        process: Process,
        dax: DaxWindow,
        extents: dict[str, int],
        *,
        window: int = 128 << 10,
    ) -> None:
        super().__init__(kernel, process, dax.disk, extents, window=window)
        self.window_device, self.vm, self.cache = dax, dax.vm, dax.cache
        end = -(-(dax.base + dax.size) // _2M) * _2M
        if end > 1 << 39:
            raise ConfigError("dax_base", "the window must sit in the first 512 GiB")
        # the pmem driver's probe: the window enters the kernel's direct map (2 MiB pages);
        # its page tables are made now, so a read's only new guest-physical pages are the window's
        for gpa in range(dax.base & ~(_2M - 1), end, _2M):
            kernel.kernel_tables.map(
                DIRECT_MAP_BASE + gpa, gpa, PageSize.SIZE_2M, global_=True, xd=True
            )
        kernel.kernel_regions.append(
            Region(DIRECT_MAP_BASE + dax.base, dax.size, "direct-map", True, False, False)
        )

    def _read_window(self, name: str, offset: int, length: int) -> Iterator[Segment]:
        first, end = offset // PAGE_SIZE, -(-(offset + length) // PAGE_SIZE)
        window = self.window_device
        assert window is not None
        src = [window.gpa_of(self.block_of(name, i)) for i in range(first, end)]
        dst = self.buffer + (np.arange(first, end, dtype=np.int64) * PAGE_SIZE - offset)
        yield Run(_copy_chunk(src, dst), user=False)  # dax_iomap_rw: window reads, buffer writes


def _copy_chunk(gpas: list[int], dst: npt.NDArray[np.int64]) -> TraceChunk:
    """Per page: the kernel reads the source page through the direct map, then writes the user
    buffer's page (8-byte accesses every 64 bytes), as :meth:`GuestKernel.read_file` does."""
    src = np.asarray(gpas, np.int64) + (DIRECT_MAP_BASE - (1 << 64))
    pairs = np.stack([src[:, None] + _LINES[None, :], dst[:, None] + _LINES[None, :]], axis=1)
    n = len(gpas) * len(_LINES)
    kinds = np.tile(np.repeat(np.array([0, 1], np.int8), len(_LINES)), len(gpas))
    return TraceChunk(pairs.reshape(-1), kinds, np.full(2 * n, 8, np.int32))


def _zeroing(gpas: tuple[int, ...]) -> Callable[[VCPU], None]:
    """The contents side of the zeroing writes (the engine moves no data)."""

    def zero(vcpu: VCPU) -> None:
        for gpa in gpas:
            vcpu.vm.zero_page(gpa)

    return zero


# -- free page reporting ---------------------------------------------------------------------------


def report_free_pages(kernel: GuestKernel, vm: VM) -> int:
    """Free page reporting (virtio-balloon, Linux >= 5.7): the guest reports free blocks of
    2 MiB (``pageblock_order``), the hypervisor discards their host frames (unmaps them from the
    EPT) and invalidates. Returns the 4 KiB pages given back."""
    blocks: dict[int, list[int]] = {}
    for gpa, _ in vm.ept.leaves(0, vm.memory):
        blocks.setdefault(gpa & ~(_2M - 1), []).append(gpa)
    given = 0
    for block, leaves in blocks.items():
        if any(block + o in kernel.frames for o in range(0, _2M, PAGE_SIZE)):
            continue
        for gpa in leaves:
            leaf = vm.ept.unmap(gpa)
            given += leaf.page_size // PAGE_SIZE
    if given:
        vm.invept()
    return given


# -- forensics -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Residency:
    """Where the file data sits in host RAM (4 KiB pages)."""

    guest_cached: int  # guest page-cache pages with a host frame behind them
    duplicated: int  # of which the host cache holds the same block, byte for byte
    stale: int  # host frames behind guest-free pages that hold a disk block
    host_cached: int  # blocks in the host page cache
    shared: int = 0  # DAX window pages whose EPT leaf maps the host cache's own frame


def _mapped_frames(vm: VM) -> Iterator[tuple[int, int]]:
    """(GPA, HPA) of every 4 KiB frame of guest RAM mapped in the VM's EPT."""
    for gpa, leaf in vm.ept.leaves(0, vm.memory):
        hpa = vm.ept.host_address(gpa)
        assert hpa is not None
        for offset in range(0, leaf.page_size, PAGE_SIZE):
            yield gpa + offset, hpa + offset


def residency(reader: FileReader) -> Residency:
    """Count, byte for byte and frame by frame, where the file data is held."""
    kernel, vm, cache, disk = reader.kernel, reader.vm, reader.cache, reader.disk
    guest_cached = duplicated = 0
    for (name, index), gpa in kernel.page_cache.items():
        hpa = vm.ept.host_address(gpa)
        if hpa is None:
            continue
        guest_cached += 1
        duplicated += cache.same_as(reader.key(reader.block_of(name, index)), hpa)
    stale = 0
    memory = vm.hv.host.memory
    for gpa, hpa in _mapped_frames(vm):
        if gpa in kernel.frames:
            continue
        words = memory.peek_frame(hpa >> PAGE_SHIFT)
        stale += words is not None and disk.holds_copy(words) is not None
    shared = 0
    if (dax := reader.window_device) is not None:
        for block in dax.mapped:
            hpa = vm.ept.host_address(dax.gpa_of(block))
            shared += hpa is not None and hpa == cache.peek(reader.key(block))
    return Residency(guest_cached, duplicated, stale, len(cache), shared)


# -- one configuration, end to end -----------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """One configuration. ``path``: ``virtio-blk`` (the guest page cache filled by a block
    device) or ``dax`` (the image mapped into the guest, no guest page cache). Host cache state
    (``cold``, ``warm``, ``direct`` = O_DIRECT, virtio-blk only); guest cache state before the
    measured read (``cold``; ``warm``; ``dropped``: read, then the page cache dropped;
    ``dropped-reported``: the same with free page reporting; DAX: ``cold`` or ``warm``).
    ``init_on_alloc``: the guest zeroes new pages (virtio-blk). ``host_readahead_kib``: what
    the host cache reads ahead on a miss."""

    host_cache: str = "cold"
    guest_cache: str = "cold"
    disk: str = "nvme"
    files: int = 4
    file_mib: int = 16  # all files together
    host_cache_mib: int = 64
    guest_mib: int = 256
    readahead_kib: int = 128
    ept_page: str = "4k"
    seed: int = 0
    path: str = "virtio-blk"
    init_on_alloc: bool = True
    host_readahead_kib: int = 0

    def __post_init__(self) -> None:
        if self.path not in PATHS:
            raise ConfigError("path", f"{self.path!r} is not one of {PATHS}")
        if self.host_cache not in HOST_CACHES:
            raise ConfigError("host_cache", f"{self.host_cache!r} is not one of {HOST_CACHES}")
        if self.guest_cache not in GUEST_CACHES:
            raise ConfigError("guest_cache", f"{self.guest_cache!r} is not one of {GUEST_CACHES}")
        if self.path == "dax" and self.host_cache not in DAX_HOST_CACHES:
            raise ConfigError("host_cache", "a DAX window is the host cache's pages: "
                              f"one of {DAX_HOST_CACHES}")
        if self.path == "dax" and self.guest_cache not in DAX_GUEST_CACHES:
            raise ConfigError("guest_cache", "a DAX guest has no page cache to drop: "
                              f"one of {DAX_GUEST_CACHES}")
        if self.ept_page not in EPT_PAGES:
            raise ConfigError("ept_page", f"{self.ept_page!r} is not one of {list(EPT_PAGES)}")
        disk_model(self.disk)
        if self.files < 1 or self.file_mib < 1:
            raise ConfigError("files/file_mib", "need at least one file and one MiB")
        if (self.file_mib * MiB) % (self.files * PAGE_SIZE):
            raise ConfigError("files", f"{self.file_mib} MiB do not split into {self.files} "
                              "files of whole pages")
        if self.host_cache_mib < 1:
            raise ConfigError("host_cache_mib", "must be at least 1 (use host_cache=direct "
                              "for no host caching)")
        if self.readahead_kib < 4 or self.readahead_kib % 4:
            raise ConfigError("readahead_kib", f"{self.readahead_kib} is not a multiple of 4")
        if self.host_readahead_kib < 0 or self.host_readahead_kib % 4:
            raise ConfigError("host_readahead_kib",
                              f"{self.host_readahead_kib} is not a multiple of 4 >= 0")
        if self.host_readahead_kib // 4 >= self.host_cache_mib * 256:
            raise ConfigError("host_readahead_kib", "reads ahead more than the host cache holds")
        if self.guest_mib % 2:
            raise ConfigError("guest_mib", f"{self.guest_mib} is not a multiple of 2")
        if self.file_mib + GUEST_RESERVE_MIB > self.guest_mib:
            raise ConfigError(
                "guest_mib", f"{self.guest_mib} MiB cannot hold the kernel and its tables "
                f"({GUEST_RESERVE_MIB} MiB) and a page cache of {self.file_mib} MiB"
            )


@dataclass(frozen=True)
class Outcome:
    """The measured read of one :class:`Scenario`."""

    scenario: Scenario
    pages_allocated: int  # guest page-cache pages allocated by the measured read
    pages_read: int  # file pages copied to the user buffer
    ept_violations: int  # engine count, the measured read
    lazy_backings: int  # of which the lazy-backing handler served (a fresh, zeroed frame)
    host_touch_mappings: int  # of which mapped a frame the host had backed (init_on_alloc=0)
    window_violations: int  # of which on the DAX window
    window_pages: int  # distinct window pages the measured read touched for the first time
    guest_cycles: int  # the engine's cycles of the guest's accesses (zeroing + copies)
    io: DeviceCounters  # the path's work during the measured read
    before: Residency  # when the measured read starts
    after: Residency  # when it ends
    host_bytes: int  # host memory in use at the end (VM frames, EPT, host cache)
    guest_bytes: int  # guest-physical memory the guest kernel has allocated at the end
    backing: int  # EPT page size backing guest memory

    @property
    def ept_cycles(self) -> int:
        """Modelled hypervisor cycles of the EPT violations: a lazy backing is an exit, the
        host's fault path, a frame, its zeroing and an EPT edit; mapping a frame the host
        already holds is an exit and an edit; the DAX window's faults are priced as they come
        (:class:`~eptlab.apps.dax.DaxWindow`)."""
        c, h = hv_costs(), HostCosts.of()
        lazy = c.vmexit + h.host_fault + c.frame_alloc + c.copy_cycles(self.backing) + c.ept_edit
        mapped = c.vmexit + c.ept_edit
        return self.lazy_backings * lazy + self.host_touch_mappings * mapped + self.io.fault_cycles

    @property
    def ept_us(self) -> float:
        """:attr:`ept_cycles` as modelled time."""
        return self.ept_cycles / hv_costs().cycles_per_us


class Machine:
    """A booted guest reading from its disk: hypervisor, VM, kernel, the file-data path
    (virtio-blk device or DAX window), reader (the reader's user buffer already touched)."""

    def __init__(self, s: Scenario) -> None:
        self.hv = Hypervisor(mmu=MmuConfig(), seed=s.seed)  # seed: the aged host's placement
        self.vm = self.hv.create_vm("guest", s.guest_mib * MiB, backing=EPT_PAGES[s.ept_page])
        self.kernel = GuestKernel(self.vm, seed=s.seed, frame_policy="recycle")
        process = self.kernel.spawn("reader")
        self.vcpu = self.vm.add_vcpu(cr3=process.cr3)
        self.kernel.switch_to(self.vcpu, process)
        pages = s.file_mib * MiB // PAGE_SIZE // s.files
        slots = 4 * s.files  # files sit at seeded places on a disk four times their size
        rng = np.random.default_rng(s.seed)
        places = sorted(int(x) for x in rng.choice(slots, s.files, replace=False))
        self.disk = disk = Disk(slots * pages, disk_model(s.disk))
        self.cache = cache = HostPageCache(
            self.hv.host, s.host_cache_mib * MiB // PAGE_SIZE, readahead=s.host_readahead_kib // 4
        )
        extents = {}
        for i, slot in enumerate(places):
            name = f"file{i}"
            self.kernel.create_file(name, pages * PAGE_SIZE)
            extents[name] = slot * pages
        self.names = sorted(extents)
        self.host_touch: HostTouch | None = None
        self.device: VirtioBlk | None = None
        self.dax: DaxWindow | None = None
        self.reader: FileReader
        window = s.readahead_kib << 10
        if s.path == "dax":
            self.dax = DaxWindow(self.vm, disk, cache)
            self.reader = DaxFileReader(self.kernel, process, self.dax, extents, window=window)
        else:
            mode: HostIo = "direct" if s.host_cache == "direct" else "buffered"
            self.host_touch = None if s.init_on_alloc else HostTouch(self.vm)
            self.device = VirtioBlk(self.vm, disk, cache, mode, host_touch=self.host_touch)
            self.reader = GuestFileReader(
                self.kernel, process, self.device, extents, window=window,
                init_on_alloc=s.init_on_alloc,
            )
        self.run(self.reader.touch_buffer())

    @property
    def counters(self) -> DeviceCounters:
        """The file-data path's counters."""
        path = self.dax if self.dax is not None else self.device
        assert path is not None
        return path.counters

    def run(self, program: Iterator[Segment] | list[Segment]) -> None:
        self.vcpu.load(program)
        self.hv.run([self.vcpu])
        if self.vcpu.unresolved_faults:
            raise EptlabError(f"guest faults left unresolved: {self.vcpu.unresolved_faults[:3]}")


def play(s: Scenario) -> Outcome:
    """Set the caches up as ``s`` says, then measure the guest reading every file once."""
    g = Machine(s)
    reader, kernel, cache = g.reader, g.kernel, g.cache
    if s.guest_cache != "cold":
        g.run(reader.read(g.names))
    if s.guest_cache.startswith("dropped"):
        kernel.drop_page_cache()
        if s.guest_cache == "dropped-reported":
            report_free_pages(kernel, g.vm)
    if s.host_cache == "cold":
        cache.drop()
    elif s.host_cache == "warm" and s.guest_cache == "cold":
        for name in g.names:
            cache.prewarm(g.disk, reader.extents[name], kernel.files[name].size // PAGE_SIZE)

    before = residency(reader)
    stats0, io0 = g.vcpu.stats, dataclasses.replace(g.counters)
    vm0 = dict(g.vm.counters)
    allocated0, read0 = reader.pages_allocated, reader.pages_read
    touched0 = set(g.dax.touched) if g.dax is not None else set()
    g.run(reader.read(g.names))
    stats = g.vcpu.stats

    def vm_delta(key: str) -> int:
        return g.vm.counters[key] - vm0.get(key, 0)

    return Outcome(
        scenario=s,
        pages_allocated=reader.pages_allocated - allocated0,
        pages_read=reader.pages_read - read0,
        ept_violations=stats.ept_violations - stats0.ept_violations,
        lazy_backings=vm_delta("lazy_backing_exits"),
        host_touch_mappings=vm_delta("host_touch_mappings"),
        window_violations=vm_delta("dax_faults"),
        window_pages=len(set(g.dax.touched) - touched0) if g.dax is not None else 0,
        guest_cycles=stats.cycles - stats0.cycles,
        io=g.counters.minus(io0),
        before=before,
        after=residency(reader),
        host_bytes=g.hv.host.live_bytes,
        guest_bytes=kernel.frames.used_bytes,
        backing=EPT_PAGES[s.ept_page],
    )
