"""A virtio-style block device in the hypervisor: the guest queues read requests (a first disk
block and the guest-physical pages that receive the blocks) and notifies the device with one
exit; the hypervisor serves every queued request from its page cache or from the disk and
writes the data into the guest's pages.

Host I/O modes, as QEMU's ``cache=`` option sets them:
``buffered`` (``cache=writeback``): the image is read through the host page cache; a block
found there is copied into the guest page, a missing one is read from the disk into a new host
cache frame, then copied. ``direct`` (``cache=none``, ``O_DIRECT``): the disk transfers straight
into the guest pages; the host cache is neither consulted nor filled.

By default the guest must have touched each page it hands over (its EPT entry present): the
device writes through the VM's EPT mapping and never backs guest memory itself, so every first
touch of guest-physical memory stays a guest access and an EPT violation. With a
:class:`~eptlab.apps.host_touch.HostTouch` (a guest with ``init_on_alloc=0``, which hands over
pages it never touched) the device's write is the first touch: a host page fault in the VMM's
mapping, and the guest's later first access maps that frame.

The notify is a VMCALL (:data:`VIRTIO_BLK_NOTIFY`); a real virtio-blk notify is a write to a
doorbell (an MMIO access that exits as an EPT misconfiguration, or an ``OUT``, exit reason 30).
Either is one exit per notify, which is all the model needs.

Costs (:mod:`eptlab.hv.costs` and :class:`~eptlab.apps.host_cache.HostCosts`, from the active
cost profile): a notify is a VM exit round trip; each block looked up in the host cache costs a
page-cache lookup; copying a block into the guest is 4 KiB at memcpy speed; a host cache fill
also takes a frame per block (read-ahead ones too); a host-side first touch is a host fault, a
frame and its zeroing; disk time comes from the :class:`~eptlab.apps.disk.DiskModel`. Requests
are served one after the other (queue depth 1).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass
from typing import Literal

from ..arch.bits import PAGE_SHIFT, PAGE_SIZE
from ..errors import ConfigError
from ..hv import VCPU, VM
from ..hv.costs import hv_costs
from .disk import Block, Disk
from .host_cache import HostCosts, HostPageCache
from .host_touch import HostTouch

VIRTIO_BLK_NOTIFY = 0x5642  # "VB"
HostIo = Literal["buffered", "direct"]
HOST_IO: tuple[HostIo, ...] = ("buffered", "direct")


@dataclass(frozen=True)
class BlockRequest:
    """Read blocks ``first``, ``first + 1``, ... into the guest pages ``gpas`` (in order)."""

    first: int
    gpas: tuple[int, ...]


@dataclass
class DeviceCounters:
    """What a file-data path did (the virtio-blk device here, the DAX window likewise)."""

    notifies: int = 0  # exits taken to notify the device
    requests: int = 0  # block requests served (DAX: window faults)
    blocks: int = 0  # blocks delivered to the guest (DAX: window pages mapped)
    cache_hits: int = 0  # blocks found in the host cache
    cache_misses: int = 0  # blocks the host cache did not hold (buffered mode)
    disk_reads: int = 0  # disk read requests issued
    disk_blocks: int = 0  # blocks read from the disk
    readahead_blocks: int = 0  # of which read ahead by the host cache
    disk_us: float = 0.0  # modelled disk time
    copies: int = 0  # 4 KiB blocks the host CPU copied into guest pages
    host_faults: int = 0  # guest blocks the device touched first (backed on the host side)
    cpu_cycles: int = 0  # device work: notify exits, lookups, copies, cache frames, host faults
    fault_cycles: int = 0  # EPT-violation handling done for the path (DAX window faults)

    @property
    def io_us(self) -> float:
        """Modelled time of the I/O path: disk time plus the host CPU work."""
        return self.disk_us + self.cpu_cycles / hv_costs().cycles_per_us

    def minus(self, before: DeviceCounters) -> DeviceCounters:
        return DeviceCounters(
            **{
                f.name: getattr(self, f.name) - getattr(before, f.name)
                for f in dataclasses.fields(self)
            }
        )


class VirtioBlk:
    """One VM's block device backed by ``disk``, with the host's ``cache`` for buffered I/O."""

    def __init__(
        self,
        vm: VM,
        disk: Disk,
        cache: HostPageCache,
        mode: HostIo = "buffered",
        *,
        notify: int = VIRTIO_BLK_NOTIFY,
        host_touch: HostTouch | None = None,
    ) -> None:
        """``host_touch``: let the device write into guest pages the guest never touched
        (their first touch, on the host side); without it such a write is an AddressError."""
        if mode not in HOST_IO:
            raise ConfigError("host_io", f"{mode!r} is not one of {', '.join(HOST_IO)}")
        self.vm, self.disk, self.cache, self.mode = vm, disk, cache, mode
        self.notify, self.host_touch = notify, host_touch
        self.queue: deque[BlockRequest] = deque()
        self.counters = DeviceCounters()
        self.costs, self.host_costs = hv_costs(), HostCosts.of()
        vm.hv.hypercall(notify, "virtio-blk notify")(self._notify)

    def key(self, block: int) -> tuple[int, int]:
        return (self.disk.image, block)

    # -- the guest's side: the virtqueue -----------------------------------------------------------

    def submit(self, request: BlockRequest) -> None:
        """Queue a request (what the guest driver writes into the virtqueue)."""
        if not request.gpas:
            raise ConfigError("request", "a block request needs at least one page")
        self.queue.append(request)

    # -- the hypervisor's side ---------------------------------------------------------------------

    def _notify(self, vcpu: VCPU, args: tuple[int, ...]) -> int:
        self.counters.notifies += 1
        self.counters.cpu_cycles += self.costs.vmexit
        served = 0
        while self.queue:
            self.serve(self.queue.popleft())
            served += 1
        return served

    def serve(self, request: BlockRequest) -> None:
        c = self.counters
        c.requests += 1
        count = len(request.gpas)
        if self.mode == "direct":
            contents = self._disk_read(request.first, count)
            for gpa, words in zip(request.gpas, contents, strict=True):
                self._deliver(gpa, words)  # DMA into the guest page: no copy by the CPU
            return
        run: list[tuple[int, int]] = []  # consecutive missing (block, gpa)
        for i, gpa in enumerate(request.gpas):
            block = request.first + i
            c.cpu_cycles += self.host_costs.page_cache_lookup
            hpa = self.cache.lookup(self.key(block))
            if hpa is None:
                c.cache_misses += 1
                run.append((block, gpa))
                continue
            self._fill_from_disk(run)
            run = []
            c.cache_hits += 1
            self._copy_to_guest(hpa, gpa)
        self._fill_from_disk(run)

    def _fill_from_disk(self, run: list[tuple[int, int]]) -> None:
        """Buffered miss: one disk read for the run (and the host's readahead after it), each
        block into a new cache frame, the asked-for ones then copied into the guest pages."""
        if not run:
            return
        gpas = dict(run)
        fill = self.cache.fill(
            self.disk, run[0][0], len(run), lambda block, hpa: self._copy_to_guest(hpa, gpas[block])
        )
        c = self.counters
        c.disk_reads += 1
        c.disk_blocks += fill.blocks
        c.readahead_blocks += fill.ahead
        c.disk_us += fill.took_us
        c.cpu_cycles += self.costs.frame_alloc * fill.blocks

    def _disk_read(self, first: int, count: int) -> list[Block]:
        contents, took = self.disk.read(first, count)
        self.counters.disk_reads += 1
        self.counters.disk_blocks += count
        self.counters.disk_us += took
        return contents

    def _guest_frame(self, gpa: int) -> int:
        if gpa % PAGE_SIZE:
            raise ConfigError("request", f"guest page {gpa:#x} is not 4 KiB aligned")
        if self.host_touch is None:
            return self.vm.host_address(gpa, back=False) >> PAGE_SHIFT  # AddressError if untouched
        hpa, backed = self.host_touch.frame(gpa)
        if backed:  # a host page fault in the VMM's mapping: a frame, zeroed
            self.counters.host_faults += 1
            self.counters.cpu_cycles += (
                self.host_costs.host_fault
                + self.costs.frame_alloc
                + self.costs.copy_cycles(self.vm.backing)
            )
        return hpa >> PAGE_SHIFT

    def _copy_to_guest(self, hpa: int, gpa: int) -> None:
        self.vm.hv.host.memory.copy_frame(hpa >> PAGE_SHIFT, self._guest_frame(gpa))
        self.counters.cpu_cycles += self.costs.copy_cycles(PAGE_SIZE)
        self.counters.copies += 1
        self.counters.blocks += 1

    def _deliver(self, gpa: int, words: Block) -> None:
        self.vm.hv.host.memory.frame(self._guest_frame(gpa))[:] = words
        self.counters.blocks += 1

    # -- host-side maintenance ---------------------------------------------------------------------

    def prewarm(self, first: int, count: int) -> None:
        """The host reads blocks into its page cache on its own (``vmtouch -t``, a copy of the
        image, another VM on the same base image). Not counted as the guest's I/O."""
        self.cache.prewarm(self.disk, first, count)
