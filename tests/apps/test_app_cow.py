"""Copy-on-write snapshots and fork: isolation with real contents, reference counts, 2 MiB."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from eptlab.apps.cow import CopyOnWrite
from eptlab.arch import PageSize
from eptlab.hv import VM, Hypervisor
from eptlab.mmu.config import CacheConfig, MmuConfig
from eptlab.tables import GuestPageTables

GVA = 0x7F00_0000_0000
MiB = 1 << 20
PAGES = 32


def booted(backing: PageSize = PageSize.SIZE_4K) -> tuple[Hypervisor, VM]:
    """A fully backed VM whose guest maps PAGES pages at GVA (GPA 4 MiB..)."""
    hv = Hypervisor(mmu=MmuConfig(cache=CacheConfig.disabled()))  # TLBs on, no data caches
    vm = hv.create_vm("parent", 16 * MiB, lazy=False, backing=backing)
    vm.ept.map_range(0, 16 * MiB, backing)
    tables = iter(range(0x1000, 0x200000, 0x1000))
    pt = GuestPageTables(vm, lambda: next(tables))
    pt.map_range(GVA, 4 * MiB, PAGES * 4096)
    vm.add_vcpu(cr3=pt.root)
    return hv, vm


@settings(max_examples=25)
@given(
    clones=st.integers(1, 3),
    writes=st.lists(st.tuples(st.integers(0, 3), st.integers(0, PAGES - 1),
                              st.integers(1, 2**63)), max_size=30),
)
def test_no_write_is_visible_elsewhere(clones: int, writes: list[tuple[int, int, int]]) -> None:
    hv, parent = booted()
    cow = CopyOnWrite(hv)
    cpu = parent.vcpus[0]
    for page in range(PAGES):
        cpu.write_u64(GVA + page * 4096, 1000 + page)
    snap = cow.snapshot(parent)
    vms = [parent, *cow.fork(parent, clones)]
    model = [{p: 1000 + p for p in range(PAGES)} for _ in vms]
    for who, page, value in writes:
        who %= len(vms)
        vms[who].vcpus[0].write_u64(GVA + page * 4096, value)
        model[who][page] = value
        for vm, expected in zip(vms, model, strict=True):
            assert vm.vcpus[0].read_u64(GVA + page * 4096) == expected[page]
    for vm, expected in zip(vms, model, strict=True):
        assert [vm.vcpus[0].read_u64(GVA + p * 4096) for p in range(PAGES)] == [
            expected[p] for p in range(PAGES)]
    cow.restore(snap)
    assert [cpu.read_u64(GVA + p * 4096) for p in range(PAGES)] == [1000 + p for p in range(PAGES)]


def test_fork_shares_until_written_and_destroy_frees_only_private_frames() -> None:
    hv, parent = booted()
    cow = CopyOnWrite(hv)
    parent.vcpus[0].read_u64(GVA)  # warm: guest A flags set before the fork
    live = hv.host.live_bytes
    (clone,) = cow.fork(parent, 1)
    tables = PAGE_TABLE_PAGES(clone)
    assert hv.host.live_bytes == live + tables * 4096  # a fork costs only EPT tables
    for page in range(5):
        clone.vcpus[0].write_u64(GVA + page * 4096, page)
    copied = cow.counters.per_vm[clone.name]
    assert copied >= 5  # 5 data pages (+ guest page-table pages whose D/A bits it set)
    freed = cow.destroy(clone)
    assert freed == copied + tables
    assert hv.host.live_bytes == live
    # the parent is now the only owner: its first write reclaims without copying
    before = cow.counters.pages_copied
    parent.vcpus[0].write_u64(GVA, 7)
    assert cow.counters.pages_copied == before and cow.counters.reclaimed >= 1


def PAGE_TABLE_PAGES(vm: VM) -> int:  # noqa: N802
    return len(vm.ept.tables.tables)


def test_2m_copy_copies_the_whole_page_and_split_copies_one() -> None:
    results = {}
    for granularity in ("2m-copy", "2m-split"):
        hv, parent = booted(PageSize.SIZE_2M)
        cow = CopyOnWrite(hv, granularity)
        parent.vcpus[0].read_u64(GVA)
        (clone,) = cow.fork(parent, 1)
        clone.vcpus[0].write_u64(GVA + 3 * 4096, 99)
        assert parent.vcpus[0].read_u64(GVA + 3 * 4096) != 99
        assert clone.vcpus[0].read_u64(GVA + 3 * 4096) == 99
        results[granularity] = (cow.counters.pages_copied, cow.counters.splits)
    copy_pages, copy_splits = results["2m-copy"]
    split_pages, split_splits = results["2m-split"]
    assert copy_pages % 512 == 0 and copy_pages >= 512 and copy_splits == 0
    assert split_pages < 512 and split_splits >= 1


def test_cow_fork_experiment_shape(tmp_path: object) -> None:
    from pathlib import Path

    from eptlab.experiments import runner

    result = runner.run(
        "cow-fork",
        {"guest_mibs": "16", "clones": "2", "write_fraction": "0.02", "seeds": "1",
         "parent_fraction": "0.01", "lazy_guest_mib": "16", "working_sets": "8,600",
         "reset_guest_mib": "16", "dirty_sets": "3,700", "resets": "2"},
        Path(str(tmp_path)),
        show_progress=False,
    )
    table = result.table
    t = table[table.study == "fork"].set_index("granularity")
    assert set(t.index) == {"4k", "2m-copy", "2m-split"}
    for g in t.index:
        assert t.loc[g, "fork_cycles"] < t.loc[g, "full_copy_cycles"] / 10
        assert t.loc[g, "host_mib_used"] < t.loc[g, "host_mib_full_copy"]
        assert t.loc[g, "pages_copied"] >= t.loc[g, "pages_written"]
        # after an eager fork every parent page is read-only: each first write faults (with
        # 2m-copy once per 2 MiB page: the copy makes the whole of it writable)
        assert 0 < t.loc[g, "parent_exits"] <= t.loc[g, "parent_pages_written"]
        if g != "2m-copy":
            assert t.loc[g, "parent_exits"] == t.loc[g, "parent_pages_written"]
    # copying whole 2 MiB pages costs far more copies than splitting first
    assert t.loc["2m-copy", "pages_copied"] > 20 * t.loc["2m-split", "pages_copied"]
    assert t.loc["2m-split", "splits"] > 0 and t.loc["2m-copy", "splits"] == 0
    assert "fork_ms" not in table.columns and "sim_seconds" not in table.columns

    lazy = table[table.study == "lazy"]
    for ws, rows in lazy.groupby("working_set"):
        r = rows.set_index("fork_mode")
        assert r.loc["lazy", "fork_cycles"] < r.loc["eager", "fork_cycles"]
        assert r.loc["lazy", "clone_exits"] >= ws  # one fill per page touched (+ guest tables)
        assert r.loc["eager", "clone_exits"] == r.loc["eager", "pages_written"]  # writes only
        for mode in ("eager", "lazy"):
            assert r.loc[mode, "pages_copied"] == r.loc[mode, "pages_written"]
            assert r.loc[mode, "parent_exits"] == r.loc[mode, "parent_pages_written"]
        assert ws <= r.loc["lazy", "pages_mapped"] < r.loc["eager", "pages_mapped"]

    reset = table[table.study == "reset"]
    assert reset.restored_exact.astype(bool).all()
    for _, r in reset.iterrows():
        if r.tracking == "wp":
            assert r.pages_found == r.pages_restored == r.dirty_pages == r.run_exits
        else:  # PML: writes run free, the 512-entry log exits when full
            assert r.pages_found >= r.dirty_pages and r.run_exits == r.pages_found // 512
        assert r.resets_per_s > 0 and r.loop_cycles < r.refork_eager_cycles
    for stem in ("cow-fork", "cow-fork-lazy", "cow-fork-reset"):
        assert (Path(str(tmp_path)) / f"{stem}.png").exists()
