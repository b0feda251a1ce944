"""Double caching, seen from the EPT: a guest reads files from a virtual disk through its page
cache while the host caches the same disk image in its own page cache.

The guest's read path (:class:`GuestFileReader`), one readahead window at a time:
    1. ``read(fd, buf, window)`` looks each file page up in the guest page cache
       (:meth:`GuestKernel.read_file`); a miss allocates a guest-physical page for it.
    2. The guest zeroes each newly allocated page (``init_on_alloc=1``, the default of most
       distribution kernels): its first touch of that guest-physical page. When the host has
       never backed the page, the access takes an EPT violation (SDM Vol. 3C §29.3.3) and the
       hypervisor's lazy-backing handler gives it a host frame.
    3. The driver queues one virtio block request per run of consecutive missing pages and
       notifies the device (one exit); the hypervisor serves them from its page cache or the
       disk (:class:`~eptlab.apps.virtio_blk.VirtioBlk`) and writes the data into the pages.
    4. The kernel copies the pages to the user buffer (direct-map reads, buffer writes).
Every guest access runs on the engine, so the EPT violations are the engine's count.

What the hypervisor sees: an EPT violation marks a guest-physical page touched for the first
time, which happens when the guest allocates memory it has never used, whatever the data
source is. A guest page that was freed and is reused (page cache dropped, then refilled) is
already backed: no exit, unless the guest gave it back (free page reporting,
:func:`report_free_pages`) and the hypervisor dropped its frame.

Forensics (:func:`residency`): which host frames hold the same disk block twice -- once in a
page of the guest's page cache and once in the host page cache (compared byte for byte) -- and
which host frames behind pages the guest has freed still hold disk blocks (recognised by their
contents: dropping the guest cache frees guest memory, not host memory).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from ..arch.access import Access
from ..arch.bits import PAGE_SHIFT, PAGE_SIZE, PageSize
from ..errors import ConfigError, EptlabError
from ..guest import DIRECT_MAP_BASE, GuestKernel, Process
from ..hv import VCPU, VM, GuestAction, Hypercall, Hypervisor, Run
from ..hv.costs import hv_costs
from ..hv.program import Segment
from ..mmu.config import MmuConfig
from ..traces.model import TraceChunk
from .disk import Disk, disk_model
from .host_cache import HostPageCache
from .virtio_blk import BlockRequest, DeviceCounters, HostIo, VirtioBlk

MiB = 1 << 20
HOST_CACHES = ("cold", "warm", "direct")
GUEST_CACHES = ("cold", "warm", "dropped", "dropped-reported")
EPT_PAGES = {"4k": PageSize.SIZE_4K, "2m": PageSize.SIZE_2M}
_LINES = np.arange(0, PAGE_SIZE, 64, dtype=np.int64)
_2M = PageSize.SIZE_2M.value
GUEST_RESERVE_MIB = 64  # guest memory besides the page cache: kernel image, page tables, buffer


def _kernel_chunk(addresses: list[int], kind: Access) -> TraceChunk:
    """One 8-byte access per 64-byte line of each page, through the direct map."""
    base = np.asarray(addresses, np.int64) + (DIRECT_MAP_BASE - (1 << 64))
    a = (base[:, None] + _LINES[None, :]).reshape(-1)
    return TraceChunk(a, np.full(len(a), int(kind), np.int8), np.full(len(a), 8, np.int32))


class GuestFileReader:
    """The guest side: files laid out on the disk in extents, the read path, the driver."""

    def __init__(
        self,
        kernel: GuestKernel,
        process: Process,
        device: VirtioBlk,
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
            if first < 0 or first + pages > device.disk.blocks:
                raise ConfigError("extents", f"{name!r} does not fit on the disk at block {first}")
        self.kernel, self.process, self.device = kernel, process, device
        self.extents, self.window = extents, window
        self.buffer = kernel.mmap(process, window)
        self.pages_allocated = 0

    def touch_buffer(self) -> list[Segment]:
        """The user buffer's first writes (demand paging, first touches): done before measuring
        so that only the page cache's pages are new during a read."""
        pages = self.buffer + np.arange(0, self.window, PAGE_SIZE, dtype=np.int64)
        n = len(pages)
        return [Run(TraceChunk(pages, np.ones(n, np.int8), np.full(n, 8, np.int32)))]

    def block_of(self, name: str, index: int) -> int:
        return self.extents[name] + index

    def read(self, names: list[str]) -> Iterator[Segment]:
        """The vCPU program of reading ``names`` whole, one ``window`` per read() call."""
        for name in names:
            size = self.kernel.files[name].size
            for offset in range(0, size, self.window):
                yield from self._read_window(name, offset, min(self.window, size - offset))

    def _read_window(self, name: str, offset: int, length: int) -> Iterator[Segment]:
        kernel = self.kernel
        first, end = offset // PAGE_SIZE, -(-(offset + length) // PAGE_SIZE)
        missing = [i for i in range(first, end) if (name, i) not in kernel.page_cache]
        copy, gpas = kernel.read_file(name, offset, length, self.buffer)
        if len(gpas) != len(missing):
            raise EptlabError(f"page cache of {name} changed under the read")
        if gpas:
            self.pages_allocated += len(gpas)
            yield Run(_kernel_chunk(gpas, Access.WRITE), user=False)  # init_on_alloc zeroing
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


def _mapped_frames(vm: VM) -> Iterator[tuple[int, int]]:
    """(GPA, HPA) of every 4 KiB frame mapped in the VM's EPT."""
    for gpa, leaf in vm.ept.leaves(0, vm.memory):
        hpa = vm.ept.host_address(gpa)
        assert hpa is not None
        for offset in range(0, leaf.page_size, PAGE_SIZE):
            yield gpa + offset, hpa + offset


def residency(reader: GuestFileReader) -> Residency:
    kernel, device = reader.kernel, reader.device
    vm, cache, disk = device.vm, device.cache, device.disk
    guest_cached = duplicated = 0
    for (name, index), gpa in kernel.page_cache.items():
        hpa = vm.ept.host_address(gpa)
        if hpa is None:
            continue
        guest_cached += 1
        duplicated += cache.same_as(device.key(reader.block_of(name, index)), hpa)
    stale = 0
    memory = vm.hv.host.memory
    for gpa, hpa in _mapped_frames(vm):
        if gpa in kernel.frames:
            continue
        words = memory.peek_frame(hpa >> PAGE_SHIFT)
        stale += words is not None and disk.holds_copy(words) is not None
    return Residency(guest_cached, duplicated, stale, len(cache))


# -- one configuration, end to end -----------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """One configuration: host cache state (``cold``, ``warm``, ``direct`` = O_DIRECT), guest
    cache state before the measured read (``cold``; ``warm``; ``dropped``: read, then the page
    cache dropped; ``dropped-reported``: the same with free page reporting)."""

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

    def __post_init__(self) -> None:
        if self.host_cache not in HOST_CACHES:
            raise ConfigError("host_cache", f"{self.host_cache!r} is not one of {HOST_CACHES}")
        if self.guest_cache not in GUEST_CACHES:
            raise ConfigError("guest_cache", f"{self.guest_cache!r} is not one of {GUEST_CACHES}")
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
    ept_violations: int  # engine count, the measured read
    lazy_backings: int  # of which the hypervisor's lazy-backing handler served
    guest_cycles: int  # the engine's cycles of the guest's accesses (zeroing + copies)
    io: DeviceCounters  # the device's work during the measured read
    before: Residency  # when the measured read starts
    after: Residency  # when it ends
    host_bytes: int  # host memory in use at the end (VM frames, EPT, host cache)
    backing: int  # EPT page size backing guest memory

    @property
    def ept_us(self) -> float:
        """Modelled hypervisor time of the EPT violations: exit, frame, zeroing, entry."""
        c = hv_costs()
        per = c.vmexit + c.frame_alloc + c.copy_cycles(self.backing)
        return self.ept_violations * (per + c.ept_edit) / c.cycles_per_us


class Machine:
    """A booted guest reading from its disk: hypervisor, VM, kernel, device, reader (the
    reader's user buffer already touched)."""

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
        disk = Disk(slots * pages, disk_model(s.disk))
        cache = HostPageCache(self.hv.host, s.host_cache_mib * MiB // PAGE_SIZE)
        mode: HostIo = "direct" if s.host_cache == "direct" else "buffered"
        self.device = VirtioBlk(self.vm, disk, cache, mode)
        extents = {}
        for i, slot in enumerate(places):
            name = f"file{i}"
            self.kernel.create_file(name, pages * PAGE_SIZE)
            extents[name] = slot * pages
        self.names = sorted(extents)
        self.reader = GuestFileReader(
            self.kernel, process, self.device, extents, window=s.readahead_kib << 10
        )
        self.run(self.reader.touch_buffer())

    def run(self, program: Iterator[Segment] | list[Segment]) -> None:
        self.vcpu.load(program)
        self.hv.run([self.vcpu])
        if self.vcpu.unresolved_faults:
            raise EptlabError(f"guest faults left unresolved: {self.vcpu.unresolved_faults[:3]}")


def play(s: Scenario) -> Outcome:
    """Set the caches up as ``s`` says, then measure the guest reading every file once."""
    g = Machine(s)
    device, reader, kernel = g.device, g.reader, g.kernel
    if s.guest_cache != "cold":
        g.run(reader.read(g.names))
    if s.guest_cache.startswith("dropped"):
        kernel.drop_page_cache()
        if s.guest_cache == "dropped-reported":
            report_free_pages(kernel, g.vm)
    if s.host_cache == "cold":
        device.cache.drop()
    elif s.host_cache == "warm" and s.guest_cache == "cold":
        for name in g.names:
            device.prewarm(reader.extents[name], kernel.files[name].size // PAGE_SIZE)

    before = residency(reader)
    stats0, io0 = g.vcpu.stats, dataclasses.replace(device.counters)
    backed0, allocated0 = g.vm.counters["lazy_backing_exits"], reader.pages_allocated
    g.run(reader.read(g.names))
    stats = g.vcpu.stats
    return Outcome(
        scenario=s,
        pages_allocated=reader.pages_allocated - allocated0,
        ept_violations=stats.ept_violations - stats0.ept_violations,
        lazy_backings=g.vm.counters["lazy_backing_exits"] - backed0,
        guest_cycles=stats.cycles - stats0.cycles,
        io=device.counters.minus(io0),
        before=before,
        after=residency(reader),
        host_bytes=g.hv.host.live_bytes,
        backing=EPT_PAGES[s.ept_page],
    )

