"""A DAX window: the disk image mapped straight into the guest-physical address space, each of
its pages one of the host page cache's own frames (virtio-pmem backed by an image file;
virtiofs DAX maps file ranges into its window the same way).

The VMM maps the image file ``MAP_SHARED`` and gives the range to KVM as a memory slot above
guest RAM; the guest's pmem driver maps it into the kernel's direct map and a DAX file system
(``-o dax``) reads file data from it, with no guest page cache. The EPT entries of the window are
made lazily: the guest's first access to a window page is an EPT violation (SDM Vol. 3C
§29.3.3), and the hypervisor's fault path faults the file page into the VMM's mapping. A host
page-cache hit maps the frame the cache holds; a miss first reads the block from the disk into a
new cache frame (with the host cache's readahead), then maps it. So, unlike the virtio-blk path,
how many violations the guest takes is the number of window pages it touches, and what each
costs depends on the host cache.

The EPT leaf maps the cache's frame (one more reference on it) read-only: Linux write-protects
clean pages of shared file mappings (write-notify), so a read fault is mapped without write
access. Writes to the window are not modelled. Host reclaim of a mapped block unmaps it from the
EPT (the MMU notifier) and invalidates, so the guest's next access faults again;
``drop_caches`` leaves mapped blocks alone.

Costs (from the active cost profile): each window fault is a VM exit round trip, the host's
fault path, a page-cache lookup and an EPT edit; a miss adds a frame per block it reads
(read-ahead ones too) and the disk's time.
"""

from __future__ import annotations

from ..arch.bits import PAGE_SHIFT, PAGE_SIZE, PageSize
from ..arch.exits import EptViolation, ExitReason
from ..errors import ConfigError
from ..hv import VM, Exit, ExitAction
from ..hv.costs import hv_costs
from ..hv.vm import NOT_PRESENT
from .disk import Disk
from .host_cache import HostCosts, HostPageCache, Key
from .virtio_blk import DeviceCounters

_1G = PageSize.SIZE_1G.value


class DaxWindow:
    """The image ``disk`` mapped at guest-physical ``base`` (default: the first 1 GiB boundary
    above guest RAM) of ``vm``, backed by the host's ``cache``."""

    def __init__(self, vm: VM, disk: Disk, cache: HostPageCache, *, base: int | None = None):
        self.vm, self.disk, self.cache = vm, disk, cache
        self.base = -(-vm.memory // _1G) * _1G if base is None else base
        self.size = disk.blocks * PAGE_SIZE
        if self.base % PAGE_SIZE or self.base < vm.memory:
            raise ConfigError("dax_base", f"{self.base:#x} is not a page above guest RAM")
        if self.base + self.size > 1 << vm.hv.features.maxphyaddr:
            raise ConfigError("dax_base", "the window does not fit below MAXPHYADDR")
        self.counters = DeviceCounters()
        self.mapped: dict[int, int] = {}  # block -> HPA of the cache frame the EPT maps
        self.touched: list[int] = []  # blocks in the order the guest first touched them
        self.costs, self.host_costs = hv_costs(), HostCosts.of()
        cache.on_evict.append(self._evicted)
        cache.mapped = self.maps
        vm.hv.on(ExitReason.EPT_VIOLATION, self.handle)

    def gpa_of(self, block: int) -> int:
        """The guest-physical address of block ``block`` in the window."""
        if not 0 <= block < self.disk.blocks:
            raise ConfigError("block", f"{block} is outside the disk ({self.disk.blocks} blocks)")
        return self.base + block * PAGE_SIZE

    def key(self, block: int) -> Key:
        """The host cache's key of block ``block``."""
        return (self.disk.image, block)

    def maps(self, key: Key) -> bool:
        """Whether the window maps the cached block ``key`` (``drop_caches`` keeps it)."""
        return key[0] == self.disk.image and key[1] in self.mapped

    def handle(self, exit_: Exit) -> ExitAction | None:
        """EPT-violation handler for the window: fault the block into the host cache (a hit, or
        a disk read) and map the cache's frame."""
        record = exit_.record
        if not isinstance(record, EptViolation) or exit_.vcpu.vm is not self.vm:
            return None
        gpa = record.gpa
        if not self.base <= gpa < self.base + self.size or record.qualification & NOT_PRESENT:
            return None  # not the window, or a permission fault (a write: not modelled)
        block = (gpa - self.base) >> PAGE_SHIFT
        c, key = self.counters, self.key(block)
        c.requests += 1
        c.fault_cycles += (
            self.costs.vmexit
            + self.host_costs.host_fault
            + self.host_costs.page_cache_lookup
            + self.costs.ept_edit
        )
        hpa = self.cache.lookup(key)
        if hpa is None:
            c.cache_misses += 1
            fill = self.cache.fill(self.disk, block, 1, lambda _block, _hpa: None)
            c.disk_reads += 1
            c.disk_blocks += fill.blocks
            c.readahead_blocks += fill.ahead
            c.disk_us += fill.took_us
            c.fault_cycles += self.costs.frame_alloc * fill.blocks
            hpa = self.cache.peek(key)
            assert hpa is not None
        else:
            c.cache_hits += 1
        self.vm.ept.map(self.gpa_of(block), PageSize.SIZE_4K, hpa=hpa, perms="r-x")
        self.mapped[block] = hpa
        self.touched.append(block)
        c.blocks += 1
        self.vm.counters["dax_faults"] += 1
        return ExitAction.RETRY  # the access runs again, now mapped

    def _evicted(self, key: Key, hpa: int) -> None:
        """Host reclaim of a mapped block: unmap it from the EPT and invalidate."""
        if not self.maps(key):
            return
        del self.mapped[key[1]]
        self.vm.ept.unmap(self.gpa_of(key[1]))
        self.vm.invept()
        self.vm.counters["dax_unmaps"] += 1
