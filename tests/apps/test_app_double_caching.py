"""Double caching: the disk model, the host page cache, the virtio-style device, the guest's
read path with its first touches, free page reporting, and the residency forensics."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any, cast

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eptlab.apps.dax import DaxWindow
from eptlab.apps.disk import Disk, DiskModel, block_contents, disk_model
from eptlab.apps.double_caching import (
    GuestFileReader,
    Machine,
    Scenario,
    play,
    report_free_pages,
    residency,
)
from eptlab.apps.host_cache import HostCosts, HostPageCache
from eptlab.apps.host_touch import HostTouch
from eptlab.apps.virtio_blk import VIRTIO_BLK_NOTIFY, BlockRequest, HostIo, VirtioBlk
from eptlab.arch import PageSize
from eptlab.arch.bits import PAGE_SHIFT, PAGE_SIZE
from eptlab.arch.ept import parse_permissions
from eptlab.arch.exits import EptQual, EptViolation
from eptlab.errors import AddressError, ConfigError
from eptlab.hv import VCPU, VM, Exit, Hypervisor, Vmcall
from eptlab.hv.costs import hv_costs
from eptlab.hv.host import HostMemory
from eptlab.hv.hypervisor import UnhandledExit
from eptlab.memory import FrameAllocator
from eptlab.memory.layout import layout_scope

MiB = 1 << 20


# -- the disk --------------------------------------------------------------------------------------


def test_block_contents_are_deterministic_distinct_and_recognised() -> None:
    disk = Disk(64, disk_model("nvme"), image=3)
    a, b = disk.contents(5), disk.contents(6)
    assert np.array_equal(a, block_contents(3, 5)) and not np.array_equal(a, b)
    assert not np.array_equal(a, block_contents(4, 5))  # another image, other bytes
    assert disk.holds_copy(a) == 5 and disk.holds_copy(b) == 6
    changed = a.copy()
    changed[300] ^= np.uint64(1)
    assert disk.holds_copy(changed) is None  # one bit off: not a copy
    assert disk.holds_copy(np.zeros(512, np.uint64)) is None
    assert Disk(64, disk_model("nvme"), image=4).holds_copy(a) is None


def test_disk_latency_seeks_only_when_a_request_does_not_continue_the_last() -> None:
    hdd = disk_model("hdd")
    disk = Disk(1024, hdd)
    _, first = disk.read(100, 8)
    _, follow = disk.read(108, 8)
    _, jump = disk.read(0, 8)
    assert first == pytest.approx(hdd.read_us(8, sequential=False))
    assert follow == pytest.approx(hdd.read_us(8, sequential=True))
    assert jump - follow == pytest.approx(hdd.seek_us)
    assert disk.counters.reads == 3 and disk.counters.blocks == 24
    assert disk.counters.busy_us == pytest.approx(first + follow + jump)
    # bigger transfers take longer; an NVMe request is far cheaper than an HDD seek
    assert hdd.read_us(32, sequential=True) > hdd.read_us(8, sequential=True)
    assert disk_model("nvme").read_us(1, sequential=False) < hdd.seek_us


def test_disk_bad_input() -> None:
    with pytest.raises(ConfigError, match="disk"):
        disk_model("floppy")
    with pytest.raises(ConfigError):
        DiskModel("broken", request_us=1, seek_us=0, mib_per_s=0)
    disk = Disk(16, disk_model("ssd"))
    with pytest.raises(AddressError):
        disk.read(10, 7)
    with pytest.raises(ConfigError):
        Disk(0, disk_model("ssd"))


# -- the host page cache ---------------------------------------------------------------------------


@settings(max_examples=60)
@given(
    capacity=st.integers(1, 6),
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 9)), max_size=80),
)
def test_host_cache_is_an_lru_living_in_host_frames(
    capacity: int, ops: list[tuple[bool, int]]
) -> None:
    host = HostMemory(1 << 30)
    cache = HostPageCache(host, capacity)
    model: OrderedDict[int, None] = OrderedDict()  # the reference LRU, oldest first
    hits = misses = 0
    for insert, block in ops:
        key = (1, block)
        if insert:
            hpa = cache.insert(key, block_contents(1, block))
            model[block] = None
            model.move_to_end(block)
            while len(model) > capacity:
                model.popitem(last=False)
            assert np.array_equal(host.memory.frame(hpa >> PAGE_SHIFT), block_contents(1, block))
        else:
            found = cache.lookup(key)
            if block in model:
                hits += 1
                model.move_to_end(block)
                assert found is not None
            else:
                misses += 1
                assert found is None
        assert cache.keys() == [(1, b) for b in model]
        assert len(cache) <= capacity
        assert host.live_bytes == len(cache) * PAGE_SIZE  # one frame per cached block
    assert (cache.hits, cache.misses) == (hits, misses)
    assert cache.drop() == len(model)
    assert host.live_bytes == 0 and len(cache) == 0


def test_host_cache_peek_leaves_the_order_and_compares_bytes() -> None:
    host = HostMemory(1 << 30)
    cache = HostPageCache(host, 2)
    a = cache.insert((1, 0), block_contents(1, 0))
    cache.insert((1, 1), block_contents(1, 1))
    assert cache.peek((1, 0)) == a and cache.hits == 0
    cache.insert((1, 2), block_contents(1, 2))  # evicts (1, 0): peek did not refresh it
    assert (1, 0) not in cache and cache.evictions == 1
    other = host.alloc()
    host.memory.frame(other >> PAGE_SHIFT)[:] = block_contents(1, 1)
    assert cache.same_as((1, 1), other) and not cache.same_as((1, 2), other)
    assert not cache.same_as((1, 0), other)
    with pytest.raises(ConfigError):
        HostPageCache(host, 0)


# -- the device ------------------------------------------------------------------------------------


def device(mode: HostIo, capacity: int = 64) -> tuple[Hypervisor, VM, VirtioBlk]:
    hv = Hypervisor()
    vm = hv.create_vm("guest", 16 * MiB)
    disk = Disk(256, disk_model("nvme"))
    return hv, vm, VirtioBlk(vm, disk, HostPageCache(hv.host, capacity), mode)


def guest_block(vm: VM, gpa: int) -> int | None:
    hpa = vm.ept.host_address(gpa)
    assert hpa is not None
    words = vm.hv.host.memory.peek_frame(hpa >> PAGE_SHIFT)
    return None if words is None else Disk(256, disk_model("nvme")).holds_copy(words)


def test_buffered_reads_fill_the_host_cache_and_then_hit_it() -> None:
    hv, vm, dev = device("buffered")
    gpas = tuple(range(0x10000, 0x10000 + 8 * PAGE_SIZE, PAGE_SIZE))
    for gpa in gpas:
        vm.back(gpa)  # the guest touched them
    vcpu = vm.add_vcpu()
    dev.submit(BlockRequest(40, gpas[:4]))
    dev.submit(BlockRequest(100, gpas[4:]))
    hv.handle(Exit(vcpu, Vmcall(VIRTIO_BLK_NOTIFY, (2,))))
    assert [guest_block(vm, g) for g in gpas] == [40, 41, 42, 43, 100, 101, 102, 103]
    c = dev.counters
    assert (c.notifies, c.requests, c.disk_reads, c.cache_misses, c.cache_hits) == (1, 2, 2, 8, 0)
    assert len(dev.cache) == 8 and not dev.queue
    # blocks 41..43 are cached, 44 is not: three hits, one disk read for the missing block
    dev.serve(BlockRequest(41, gpas[:4]))
    assert [guest_block(vm, g) for g in gpas[:4]] == [41, 42, 43, 44]
    assert (c.cache_hits, c.cache_misses, c.disk_reads) == (3, 9, 3)


def test_direct_io_bypasses_the_host_cache() -> None:
    hv, vm, dev = device("direct")
    gpas = (0x20000, 0x21000)
    for gpa in gpas:
        vm.back(gpa)
    for _ in range(2):
        dev.serve(BlockRequest(7, gpas))
    assert [guest_block(vm, g) for g in gpas] == [7, 8]
    assert len(dev.cache) == 0 and dev.counters.disk_reads == 2
    assert dev.counters.cache_hits == dev.counters.cache_misses == 0


def test_the_device_never_backs_guest_memory() -> None:
    hv, vm, dev = device("buffered")
    with pytest.raises(AddressError):
        dev.serve(BlockRequest(0, (0x30000,)))
    assert vm.ept.lookup(0x30000) is None  # an untouched page stays the guest's first touch
    with pytest.raises(ConfigError):
        VirtioBlk(vm, dev.disk, dev.cache, cast(HostIo, "writeback"), notify=0x77)
    with pytest.raises(ConfigError):
        dev.submit(BlockRequest(0, ()))


# -- the guest allocator recycles freed pages ------------------------------------------------------


def test_recycle_policy_reuses_the_most_recently_freed_page_first() -> None:
    recycling, sequential = FrameAllocator(1 << 24, policy="recycle"), FrameAllocator(1 << 24)
    for frames in (recycling, sequential):
        pages = [frames.alloc() for _ in range(4)]
        frames.free(pages[1])
        frames.free(pages[2])
        assert frames.alloc() == (pages[2] if frames is recycling else 4 * PAGE_SIZE)
    assert recycling.alloc() == PAGE_SIZE
    big = recycling.alloc(PageSize.SIZE_2M)
    assert big % (2 * MiB) == 0


@settings(max_examples=40)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 50)), max_size=60))
def test_recycle_policy_never_hands_out_a_block_twice(ops: list[tuple[bool, int]]) -> None:
    frames = FrameAllocator(1 << 24, policy="recycle")
    held: list[int] = []
    for alloc, pick in ops:
        if alloc or not held:
            address = frames.alloc(PageSize.SIZE_2M if pick == 0 else PageSize.SIZE_4K)
            size = 2 * MiB if pick == 0 else PAGE_SIZE
            for other in held:
                other_size = frames.blocks[other]
                assert address + size <= other or other + other_size <= address
            held.append(address)
        else:
            frames.free(held.pop(pick % len(held)))
    assert frames.used_bytes == sum(frames.blocks.values())


# -- the guest's read path -------------------------------------------------------------------------

def small(**changes: Any) -> Scenario:
    """2 MiB in two files, a guest of 96 MiB, a host cache of 8 MiB."""
    return dataclasses.replace(
        Scenario(files=2, file_mib=2, guest_mib=96, host_cache_mib=8), **changes
    )


def test_a_read_puts_the_right_blocks_in_the_guest_page_cache() -> None:
    m = Machine(small())
    m.run(m.reader.read(m.names))
    pages = 2 * MiB // PAGE_SIZE
    assert len(m.kernel.page_cache) == pages and m.reader.pages_allocated == pages
    for (name, index), gpa in m.kernel.page_cache.items():
        assert guest_block_of(m, gpa) == m.reader.block_of(name, index)
    # one notify per read() window that missed; requests cover every page once
    c = m.counters
    assert c.notifies == 2 * MiB // (128 << 10) and c.blocks == pages
    r = residency(m.reader)
    assert r.guest_cached == r.duplicated == r.host_cached == pages and r.stale == 0


def guest_block_of(m: Machine, gpa: int) -> int | None:
    hpa = m.vm.ept.host_address(gpa)
    assert hpa is not None
    words = m.hv.host.memory.peek_frame(hpa >> PAGE_SHIFT)
    return None if words is None else m.disk.holds_copy(words)


def test_free_page_reporting_gives_back_only_whole_free_2m_blocks() -> None:
    m = Machine(small())
    m.run(m.reader.read(m.names))
    gpas = sorted(m.kernel.page_cache.values())
    live = m.hv.host.live_bytes
    m.kernel.drop_page_cache()
    assert m.hv.host.live_bytes == live  # the guest freed memory; the host did not get it
    given = report_free_pages(m.kernel, m.vm)
    assert given > 0 and m.hv.host.live_bytes == live - given * PAGE_SIZE
    for gpa in gpas:
        block = gpa & ~(2 * MiB - 1)
        whole_free = all(block + o not in m.kernel.frames for o in range(0, 2 * MiB, PAGE_SIZE))
        assert (m.vm.ept.lookup(gpa) is None) == whole_free
    assert residency(m.reader).stale == len(gpas) - given


def test_ept_violations_are_the_engines_count_of_first_touches() -> None:
    o = play(small(host_cache="warm"))
    assert o.ept_violations == o.lazy_backings == o.pages_allocated == 2 * MiB // PAGE_SIZE
    with layout_scope("contiguous"):  # the page cache's pages fill whole 2 MiB regions
        two_m = play(small(host_cache="warm", ept_page="2m"))
    # 2 MiB backing: one violation per 2 MiB region first touched, not per page
    assert 0 < two_m.ept_violations <= two_m.pages_allocated // 512 + 1
    assert two_m.io == o.io  # the same I/O either way


def test_a_small_host_cache_keeps_only_what_fits() -> None:
    o = play(small(host_cache="warm", host_cache_mib=1))
    assert o.after.host_cached == MiB // PAGE_SIZE
    assert o.after.duplicated <= o.after.host_cached
    assert o.io.disk_reads > 0  # sequential reads larger than the LRU flush it


@pytest.mark.parametrize(
    "field, value",
    [
        ("host_cache", "lukewarm"),
        ("guest_cache", "frozen"),
        ("disk", "tape"),
        ("ept_page", "1g"),
        ("files", 0),
        ("file_mib", 0),
        ("host_cache_mib", 0),
        ("readahead_kib", 6),
        ("guest_mib", 16),
    ],
)
def test_impossible_scenarios_are_config_errors(field: str, value: Any) -> None:
    with pytest.raises(ConfigError):
        dataclasses.replace(Scenario(), **{field: value})
    with pytest.raises(ConfigError, match="files"):
        Scenario(files=3, file_mib=1)  # 256 pages do not split in 3


def test_reader_rejects_files_off_the_disk() -> None:
    m = Machine(small())
    assert m.device is not None
    m.kernel.create_file("big", 8 * MiB)
    with pytest.raises(ConfigError, match="does not fit"):
        GuestFileReader(m.kernel, m.reader.process, m.device, {"big": m.device.disk.blocks - 1})
    with pytest.raises(ConfigError, match="not a file"):
        GuestFileReader(m.kernel, m.reader.process, m.device, {"nothing": 0})


# -- the DAX window --------------------------------------------------------------------------------


def window(capacity: int = 64, readahead: int = 0) -> tuple[VM, DaxWindow, VCPU]:
    hv = Hypervisor()
    vm = hv.create_vm("guest", 16 * MiB)
    cache = HostPageCache(hv.host, capacity, readahead=readahead)
    dax = DaxWindow(vm, Disk(256, disk_model("nvme")), cache)
    return vm, dax, vm.add_vcpu()


def first_read(vm: VM, vcpu: VCPU, gpa: int) -> None:
    """What the engine reports at a read of a window page the EPT does not map."""
    vm.hv.handle(Exit(vcpu, EptViolation(gpa, None, int(EptQual.READ))))


def test_a_window_fault_maps_the_host_cache_frame_a_miss_reads_the_disk_a_hit_does_not() -> None:
    vm, dax, vcpu = window()
    assert dax.base >= vm.memory and dax.base % (1 << 30) == 0
    dax.cache.prewarm(dax.disk, 7, 1)
    reads = dax.disk.counters.reads
    first_read(vm, vcpu, dax.gpa_of(5) + 0x123)  # a miss
    first_read(vm, vcpu, dax.gpa_of(7))  # a hit
    c = dax.counters
    assert (c.requests, c.cache_misses, c.cache_hits, c.disk_reads) == (2, 1, 1, 1)
    assert dax.disk.counters.reads == reads + 1  # the hit cost no disk read
    costs = hv_costs()
    assert c.fault_cycles == 2 * (
        costs.vmexit + HostCosts.of().host_fault + HostCosts.of().page_cache_lookup
        + costs.ept_edit
    ) + costs.frame_alloc  # the miss took one cache frame
    for block in (5, 7):
        hpa = vm.ept.host_address(dax.gpa_of(block))
        assert hpa is not None and hpa == dax.cache.peek(dax.key(block))  # the cache's frame
        assert vm.hv.host.refs(hpa) == 2  # the cache's reference and the EPT leaf's
        words = vm.hv.host.memory.peek_frame(hpa >> PAGE_SHIFT)
        assert words is not None and dax.disk.holds_copy(words) == block
        leaf = vm.ept.lookup(dax.gpa_of(block))
        assert leaf is not None and leaf.value & 0b111 == parse_permissions("r-x")  # read-only
    assert vm.ept.lookup(dax.gpa_of(6)) is None  # untouched pages stay unmapped
    with pytest.raises(UnhandledExit):  # guest RAM above the VM: nobody's
        first_read(vm, vcpu, dax.base - PAGE_SIZE)


def test_reclaim_unmaps_a_window_page_and_drop_caches_keeps_mapped_ones() -> None:
    vm, dax, vcpu = window(capacity=2)
    for block in (1, 2, 3):  # the third evicts block 1, which the window maps
        first_read(vm, vcpu, dax.gpa_of(block))
    assert vm.ept.lookup(dax.gpa_of(1)) is None and set(dax.mapped) == {2, 3}
    assert vm.counters["dax_unmaps"] == 1
    first_read(vm, vcpu, dax.gpa_of(1))  # the guest's next access faults again
    assert dax.counters.cache_misses == 4
    dax.cache.prewarm(dax.disk, 100, 1)  # evicts 2; block 100 is not mapped
    assert dax.cache.drop() == 1 and len(dax.cache) == 1  # only the unmapped block went
    assert set(dax.mapped) == {1}


def test_host_readahead_reads_the_following_blocks_it_does_not_hold() -> None:
    vm, dax, vcpu = window(readahead=4)
    dax.cache.prewarm(dax.disk, 13, 1)
    first_read(vm, vcpu, dax.gpa_of(10))  # reads 10, 11, 12 and stops at the cached 13
    first_read(vm, vcpu, dax.gpa_of(11))
    c = dax.counters
    assert (c.disk_reads, c.disk_blocks, c.readahead_blocks, c.cache_hits) == (1, 3, 2, 1)
    vm2, end, vcpu2 = window(readahead=8)
    first_read(vm2, vcpu2, end.gpa_of(252))  # stops at the disk's end
    assert end.counters.disk_blocks == 4


def test_dax_violations_are_the_distinct_file_pages_first_touched() -> None:
    m = Machine(small(path="dax"))
    pages = MiB // PAGE_SIZE  # one file
    v0 = m.vcpu.stats.ept_violations
    m.run(m.reader.read(m.names[:1]))
    v1 = m.vcpu.stats.ept_violations
    m.run(m.reader.read(m.names))  # file 0 again (mapped: no exit), then file 1
    v2 = m.vcpu.stats.ept_violations
    assert v1 - v0 == pages and v2 - v1 == pages
    assert m.dax is not None and len(m.dax.touched) == len(set(m.dax.touched)) == 2 * pages
    assert m.kernel.page_cache == {} and m.reader.pages_read == 3 * pages
    r = residency(m.reader)
    assert r.shared == r.host_cached == 2 * pages and r.duplicated == r.guest_cached == 0


@pytest.mark.parametrize("host", ["cold", "warm"])
def test_dax_path_takes_one_violation_per_page_and_the_host_cache_decides_the_disk(
    host: str,
) -> None:
    o = play(small(path="dax", host_cache=host))
    pages = 2 * MiB // PAGE_SIZE
    assert o.ept_violations == o.window_violations == o.window_pages == pages
    assert o.lazy_backings == o.pages_allocated == 0  # no guest page cache, no new guest pages
    assert o.io.notifies == 0 and o.io.copies == 0
    if host == "cold":
        assert o.io.cache_misses == o.io.disk_reads == pages and o.io.cache_hits == 0
    else:
        assert o.io.cache_hits == pages and o.io.disk_reads == o.io.cache_misses == 0
    assert o.after.shared == pages and o.after.duplicated == 0


def test_a_dax_guest_that_read_the_files_keeps_them_when_the_host_drops_its_cache() -> None:
    o = play(small(path="dax", host_cache="cold", guest_cache="warm"))
    assert o.ept_violations == 0 and o.io.disk_reads == 0  # mapped pages are not dropped
    assert o.before.host_cached == 2 * MiB // PAGE_SIZE


@pytest.mark.parametrize("host", ["cold", "warm", "direct"])
def test_virtio_violations_are_the_new_page_cache_pages_whatever_the_host_cache(
    host: str,
) -> None:
    for guest in ("cold", "dropped"):
        o = play(small(host_cache=host, guest_cache=guest))
        new = 2 * MiB // PAGE_SIZE if guest == "cold" else 0  # dropped: recycled, backed pages
        assert o.pages_allocated == 2 * MiB // PAGE_SIZE
        assert o.ept_violations == o.lazy_backings == new and o.window_violations == 0


def expected_reads(pages: int, window: int, ahead: int) -> int:
    """Disk reads of a cold, sequential read of one file: a ``window``-page read() misses from
    what the host holds to its end, and that miss reads ``ahead`` pages more."""
    held = reads = 0
    for start in range(0, pages, window):
        end = min(start + window, pages)
        if held < end:
            reads += 1
            held = end + ahead
    return reads


@pytest.mark.parametrize("ahead_kib", [16, 128, 160])
@pytest.mark.parametrize("path", ["virtio-blk", "dax"])
def test_host_readahead_cuts_disk_reads_by_the_expected_count(path: str, ahead_kib: int) -> None:
    one = {"files": 1, "file_mib": 1, "path": path}  # one file: nothing else to read ahead into
    without = play(small(**one))
    with_ra = play(small(**one, host_readahead_kib=ahead_kib))
    pages, window = MiB // PAGE_SIZE, 1 if path == "dax" else 128 // 4
    saved = expected_reads(pages, window, 0) - expected_reads(pages, window, ahead_kib // 4)
    assert without.io.disk_reads - with_ra.io.disk_reads == saved
    # readahead shorter than the guest's own request saves no read on virtio-blk
    assert (saved > 0) == (ahead_kib // 4 >= window)
    assert with_ra.ept_violations == without.ept_violations  # the EPT does not read ahead
    assert with_ra.io.readahead_blocks > 0 and without.io.readahead_blocks == 0


# -- init_on_alloc=0: the device's write is the first touch ----------------------------------------


def test_a_host_touch_maps_the_hosts_frame_at_the_guests_first_access() -> None:
    hv = Hypervisor()
    vm = hv.create_vm("guest", 16 * MiB)
    touch, vcpu = HostTouch(vm), vm.add_vcpu()
    hpa, backed = touch.frame(0x5000 + 8)
    assert backed and touch.frame(0x5000)[1] is False and vm.ept.lookup(0x5000) is None
    live, tables = hv.host.live_bytes, len(vm.ept.tables.tables)
    first_read(vm, vcpu, 0x5000)
    assert vm.ept.host_address(0x5000) == hpa - 8
    new_tables = len(vm.ept.tables.tables) - tables
    assert hv.host.live_bytes == live + new_tables * PAGE_SIZE  # no new data frame
    assert hv.host.refs(hpa) == 1 and touch.mapped == touch.first_touches == [0x5000]
    assert vm.counters["lazy_backing_exits"] == 0
    with pytest.raises(AddressError):
        touch.frame(vm.memory)


@pytest.mark.parametrize("host", ["cold", "direct"])
def test_init_on_alloc_0_moves_the_first_touch_to_the_device_write(host: str) -> None:
    m = Machine(small(init_on_alloc=False, host_cache=host))
    assert m.host_touch is not None and m.device is not None
    lazy0, v0 = m.vm.counters["lazy_backing_exits"], m.vcpu.stats.ept_violations
    m.run(m.reader.read(m.names))
    gpas = set(m.kernel.page_cache.values())
    assert len(gpas) == m.reader.pages_allocated == 2 * MiB // PAGE_SIZE
    # every new page was touched first by the device (DMA with O_DIRECT), then mapped at the
    # guest's first read of it: same count of violations, none of them backing a page
    assert set(m.host_touch.first_touches) == set(m.host_touch.mapped) == gpas
    assert m.device.counters.host_faults == len(gpas) and not m.host_touch.pending
    assert m.vcpu.stats.ept_violations - v0 == len(gpas)
    assert m.vm.counters["lazy_backing_exits"] == lazy0
    for (name, index), gpa in m.kernel.page_cache.items():
        assert guest_block_of(m, gpa) == m.reader.block_of(name, index)
    on = play(small(host_cache=host))
    off = play(small(host_cache=host, init_on_alloc=False))
    assert off.ept_violations == on.ept_violations and off.ept_cycles < on.ept_cycles
    assert off.guest_cycles < on.guest_cycles  # the guest no longer zeroes the pages


def test_new_scenarios_refuse_impossible_combinations() -> None:
    for bad in (
        {"path": "nfs"},
        {"path": "dax", "host_cache": "direct"},
        {"path": "dax", "guest_cache": "dropped"},
        {"host_readahead_kib": 6},
        {"host_readahead_kib": 1 << 20},
    ):
        with pytest.raises(ConfigError):
            dataclasses.replace(Scenario(), **bad)
    m = Machine(small())
    assert m.device is not None
    with pytest.raises(ConfigError, match="init_on_alloc"):
        GuestFileReader(m.kernel, m.reader.process, m.device, {}, init_on_alloc=False)
