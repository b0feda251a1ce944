"""The guest OS model on the hypervisor: demand paging, processes, ASLR, kernel image, page
cache."""

from __future__ import annotations

import numpy as np
import pytest

from eptlab.arch import Access, PageSize
from eptlab.guest import DIRECT_MAP_BASE, AslrConfig, GuestKernel
from eptlab.hv import GuestAction, Hypervisor, Run
from eptlab.traces.model import TraceChunk

MiB = 1 << 20


def chunk(addresses: np.ndarray | list[int], kind: int = 0) -> TraceChunk:
    a = np.asarray(addresses, np.int64)
    return TraceChunk(a, np.full(len(a), kind, np.int8), np.full(len(a), 8, np.int32))


def boot(seed: int = 0, **kernel_args: object) -> tuple[Hypervisor, GuestKernel]:
    hv = Hypervisor()
    vm = hv.create_vm("guest", 512 * MiB)
    return hv, GuestKernel(vm, seed=seed, **kernel_args)  # type: ignore[arg-type]


def run_all(hv: Hypervisor) -> None:
    hv.run()


def test_demand_paging_maps_each_touched_page_once() -> None:
    hv, kernel = boot()
    proc = kernel.spawn("app")
    vcpu = kernel.vm.add_vcpu(cr3=proc.cr3)
    kernel.switch_to(vcpu, proc)
    buf = kernel.mmap(proc, 64 * 4096)
    vcpu.load([Run(chunk(buf + np.arange(0, 64 * 4096, 256), Access.WRITE))])
    run_all(hv)
    assert kernel.counters["demand_faults"] == 64
    assert vcpu.stats.writes == 64 * 16 and not vcpu.unresolved_faults
    assert kernel.vm.counters["lazy_backing_exits"] >= 64  # each new guest frame: an EPT exit


def test_segfault_outside_regions_and_user_access_to_kernel() -> None:
    hv, kernel = boot()
    proc = kernel.spawn()
    vcpu = kernel.vm.add_vcpu(cr3=proc.cr3)
    kernel.switch_to(vcpu, proc)
    code = kernel.kernel_region("code").start
    vcpu.load([Run(chunk([0x1000, code - (1 << 64)]))])
    run_all(hv)
    assert len(vcpu.unresolved_faults) == 2
    assert kernel.counters["segfaults"] == 1  # the unmapped address
    assert kernel.counters["protection_faults"] == 1  # user access to a present kernel page


def test_kernel_image_permissions() -> None:
    hv, kernel = boot()
    code, rodata, data = (kernel.kernel_region(k) for k in ("code", "rodata", "data"))
    tables = kernel.kernel_tables
    for region, writable, nx in ((code, False, False), (rodata, False, True), (data, True, True)):
        leaf = tables.lookup(region.start)
        assert leaf is not None and leaf.page_size == PageSize.SIZE_2M
        assert bool(leaf.value & 2) == writable and bool(leaf.value >> 63) == nx
        assert leaf.value & 0x100  # global


def test_processes_share_the_kernel_half_and_switch_with_cr3() -> None:
    hv, kernel = boot()
    a, b = kernel.spawn("a"), kernel.spawn("b")
    assert a.cr3 != b.cr3
    assert kernel.vm.words(a.cr3, 512)[256:].tolist() == kernel.vm.words(b.cr3, 512)[256:].tolist()
    vcpu = kernel.vm.add_vcpu(cr3=a.cr3)
    kernel.switch_to(vcpu, a)
    ha, hb = kernel.mmap(a, 4096), kernel.mmap(b, 4096)
    vcpu.load(
        [
            Run(chunk([ha], Access.WRITE)),
            GuestAction(lambda v: kernel.switch_to(v, b)),
            Run(chunk([hb], Access.WRITE)),
        ]
    )
    run_all(hv)
    assert not vcpu.unresolved_faults and vcpu.guest.cr3 == b.cr3
    assert a.tables.lookup(ha) is not None and b.tables.lookup(ha) is None


def test_aslr_entropy_follows_the_configuration() -> None:
    bases = {boot(seed=s)[1].spawn().bases["mmap"] for s in range(40)}
    assert len(bases) == 40  # 28 bits: no repeats in 40 draws
    fixed = {
        boot(seed=s, aslr=AslrConfig(mmap_bits=0, kernel_bits=0))[1].spawn().bases["mmap"]
        for s in range(5)
    }
    assert len(fixed) == 1
    kernels = {boot(seed=s)[1].kernel_base for s in range(60)}
    assert all(k % (2 * MiB) == 0 for k in kernels) and len(kernels) > 40  # 512 slots
    two_bits = {boot(seed=s, aslr=AslrConfig(kernel_bits=2))[1].kernel_base for s in range(60)}
    assert len(two_bits) == 4


def test_page_cache_reads_allocate_once() -> None:
    hv, kernel = boot()
    proc = kernel.spawn()
    vcpu = kernel.vm.add_vcpu(cr3=proc.cr3)
    kernel.switch_to(vcpu, proc)
    kernel.create_file("data.bin", 64 * 4096)
    buf = kernel.mmap(proc, 64 * 4096)
    first, missed = kernel.read_file("data.bin", 0, 64 * 4096, buf)
    again, missed_again = kernel.read_file("data.bin", 0, 64 * 4096, buf)
    assert len(missed) == 64 and missed_again == []
    assert kernel.counters["page_cache_hits"] == 64
    vcpu.load([Run(first, user=False), Run(again, user=False)])
    run_all(hv)
    assert not vcpu.unresolved_faults
    assert vcpu.stats.accesses == 2 * 2 * 64 * 64
    assert kernel.drop_page_cache() == 64
    _, missed = kernel.read_file("data.bin", 0, 4096, buf)
    assert len(missed) == 1
    with pytest.raises(Exception, match="outside"):
        kernel.read_file("data.bin", 0, 65 * 4096, buf)
    assert DIRECT_MAP_BASE >> 63  # kernel half
