"""The hypervisor layer: the exit loop, handlers, lazy backing, EPT manager, shootdown, PML,
hypercalls and the scheduler."""

from __future__ import annotations

import numpy as np
import pytest

from eptlab.arch import Access, EptViolation, ExitReason, PageSize
from eptlab.arch.ept import Ept, MemoryType
from eptlab.errors import ConfigError, EptlabError, MappingError
from eptlab.hv import GuestAction, Hypercall, Hypervisor, Run, UnhandledExit
from eptlab.hv.exits import Exit, ExitAction, Vmcall, exit_names
from eptlab.tables import GuestPageTables
from eptlab.traces.model import TraceChunk

GVA = 0x7F00_0000_0000
MiB = 1 << 20


def chunk(addresses: list[int] | np.ndarray, kind: int = 0) -> TraceChunk:
    a = np.asarray(addresses, np.int64)
    return TraceChunk(a, np.full(len(a), kind, np.int8), np.full(len(a), 8, np.int32))


def guest_with_mapping(hv: Hypervisor, pages: int = 16, **vm_args: object):  # type: ignore[no-untyped-def]
    """A VM whose guest maps GVA.. to GPA 2 MiB.. (page tables at low GPAs), lazily backed."""
    vm = hv.create_vm("vm", 64 * MiB, **vm_args)  # type: ignore[arg-type]
    if not vm.lazy:
        vm.ept.map_range(0, 2 * MiB)  # page tables backed up front; data left unbacked
    next_table = iter(range(0x1000, 0x200000, 0x1000))
    tables = GuestPageTables(vm, lambda: next(next_table), levels=4, maxphyaddr=46)
    tables.map_range(GVA, 2 * MiB, pages * 4096, user=True)
    vcpu = vm.add_vcpu(cr3=tables.root)
    return vm, tables, vcpu


def test_lazy_backing_first_touch_exits_once_per_page() -> None:
    hv = Hypervisor()
    vm, _, vcpu = guest_with_mapping(hv)
    vcpu.load([Run(chunk(GVA + np.arange(0, 16 * 4096, 512)))])
    action = None
    while (exit_ := vcpu.run(action)) is not None:
        action = hv.handle(exit_)
    assert vm.counters["lazy_backing_exits"] == 16  # one EPT violation per data page
    assert vcpu.stats.accesses == 128
    for page in range(16):
        assert vm.ept.lookup(2 * MiB + page * 4096) is not None


def test_unhandled_exit_shows_the_record() -> None:
    hv = Hypervisor()
    vm, tables, vcpu = guest_with_mapping(hv, lazy=False)
    vcpu.load([Run(chunk([GVA]))])
    exit_ = vcpu.run()
    assert exit_ is not None and exit_.reason == ExitReason.EPT_VIOLATION
    with pytest.raises(UnhandledExit, match="EptViolation"):
        hv.handle(exit_)


def test_application_handler_runs_before_the_default() -> None:
    hv = Hypervisor()
    vm, _, vcpu = guest_with_mapping(hv)
    seen: list[int] = []

    def spy(exit_: Exit) -> ExitAction | None:
        assert isinstance(exit_.record, EptViolation)
        seen.append(exit_.record.gpa)
        return None  # not mine: let the default back it

    hv.on(ExitReason.EPT_VIOLATION, spy)
    vcpu.load([Run(chunk([GVA, GVA + 4096]))])
    action = None
    while (exit_ := vcpu.run(action)) is not None:
        action = hv.handle(exit_)
    assert seen == [2 * MiB, 2 * MiB + 4096]
    assert hv.exits[ExitReason.EPT_VIOLATION] == 2


def test_hypercalls_dispatch_by_number() -> None:
    hv = Hypervisor()
    vm, _, vcpu = guest_with_mapping(hv)

    @hv.hypercall(7, "add")
    def add(_vcpu, args):  # type: ignore[no-untyped-def]
        return sum(args)

    vcpu.load([Run(chunk([GVA])), Hypercall(7, (1, 2, 3)), Hypercall(99)])
    exits = []
    action = None
    while (exit_ := vcpu.run(action)) is not None:
        exits.append(exit_.reason)
        if isinstance(exit_.record, Vmcall) and exit_.record.number == 99:
            with pytest.raises(UnhandledExit):
                hv.handle(exit_)
            action = ExitAction.SKIP  # nobody took it: go past it
            continue
        action = hv.handle(exit_)
    assert hv.hypercall_results == [("add", 7, 6)]
    assert exits.count(ExitReason.VMCALL) == 2
    with pytest.raises(Exception, match="already"):
        hv.hypercall(7, "again")(add)


def test_split_and_merge_keep_translations() -> None:
    hv = Hypervisor()
    vm = hv.create_vm("vm", 64 * MiB, lazy=False)
    hpa = vm.ept.map(4 * MiB, PageSize.SIZE_2M)
    hv.host.memory.write_u64(hpa + 0x5008, 42)
    table = vm.ept.split(4 * MiB)
    leaf = vm.ept.lookup(4 * MiB + 0x5008)
    assert leaf is not None and leaf.level == 1 and leaf.target == hpa + 0x5008
    assert hv.host.refs(hpa + 0x5000) == 1
    vm.ept.protect(4 * MiB + 0x5000, 4096, "r-x")
    assert not vm.ept.merge(4 * MiB, PageSize.SIZE_2M)  # attributes differ
    vm.ept.protect(4 * MiB + 0x5000, 4096, "rwx")
    assert vm.ept.merge(4 * MiB, PageSize.SIZE_2M)
    leaf = vm.ept.lookup(4 * MiB + 0x5008)
    assert leaf is not None and leaf.level == 2 and leaf.target == hpa + 0x5008
    assert hv.host.refs(hpa) == 1 and hv.host.refs(table) == 0
    assert hv.host.memory.read_u64(hpa + 0x5008) == 42
    with pytest.raises(MappingError):
        vm.ept.split(0x123000)  # not mapped


def test_protect_splits_only_what_it_must() -> None:
    hv = Hypervisor()
    vm = hv.create_vm("vm", 64 * MiB, lazy=False)
    vm.ept.map(2 * MiB, PageSize.SIZE_2M)
    changed = vm.ept.protect(2 * MiB + 8192, 8192, "r--")
    assert changed == 2
    perms = [vm.ept.lookup(2 * MiB + i * 4096).value & 7 for i in range(5)]  # type: ignore[union-attr]
    assert perms == [7, 7, 1, 1, 7]


def test_memory_type_change() -> None:
    hv = Hypervisor()
    vm = hv.create_vm("vm", 64 * MiB, lazy=False)
    vm.ept.map(0)
    vm.ept.set_memory_type(0, MemoryType.UC)
    leaf = vm.ept.lookup(0)
    assert leaf is not None and (leaf.value >> 3) & 7 == MemoryType.UC


def test_shootdown_reaches_every_vcpu() -> None:
    hv = Hypervisor()
    vm, tables, v0 = guest_with_mapping(hv)
    v1 = vm.add_vcpu(cr3=tables.root)
    for v in (v0, v1):
        v.load([Run(chunk([GVA]))])
    hv.run()
    old = vm.ept.host_address(2 * MiB)
    new = hv.host.alloc()
    vm.ept.tables.map(2 * MiB, new, replace=True)
    for v in (v0, v1):
        assert int(hv.engine.translate(GVA, Access.READ, vcpu=v.engine_id).hpa[0]) == old  # type: ignore[index]
    assert vm.shootdown(initiator=v0) == 1
    for v in (v0, v1):
        assert int(hv.engine.translate(GVA, Access.READ, vcpu=v.engine_id).hpa[0]) == new  # type: ignore[index]
    assert vm.counters["ipis"] == 1


def test_pml_log_full_exit_and_drain() -> None:
    hv = Hypervisor()
    vm, _, vcpu = guest_with_mapping(hv, pages=600, pml=True)
    vcpu.load([Run(chunk(GVA + np.arange(600) * 4096, kind=Access.WRITE))])
    action = None
    while (exit_ := vcpu.run(action)) is not None:
        action = hv.handle(exit_)
    assert vm.counters["pml_full_exits"] >= 1
    vm.drain_pml(vcpu)
    data_pages = {2 * MiB + i * 4096 for i in range(600)}
    assert data_pages <= vm.dirty_log  # every written page was logged
    assert vcpu.vmcs.pml_index == 511
    with pytest.raises(ConfigError):
        hv.create_vm("nopml", 64 * MiB).enable_pml()


def test_scheduler_is_deterministic_and_preempts_where_told() -> None:
    def order(seed: int, preempt: dict[int, set[int]] | None = None) -> list[int]:
        hv = Hypervisor()
        vm, tables, v0 = guest_with_mapping(hv)
        v1 = vm.add_vcpu(cr3=tables.root)
        v0.load([Run(chunk(GVA + np.arange(2000) * 8))])
        v1.load([Run(chunk(GVA + 4096 + np.arange(2000) * 8))])
        return hv.run(seed=seed, quantum=(50, 300), preempt_at=preempt).order

    assert order(1) == order(1)
    assert order(1) != order(2)
    forced = order(3, {0: {10}})
    first_switch = next(i for i, lane in enumerate(forced) if lane != forced[0])
    if forced[0] == 0:
        assert first_switch == 10  # vCPU 0 was preempted right before its 10th access


def test_guest_actions_run_in_program_order() -> None:
    hv = Hypervisor()
    vm, _, vcpu = guest_with_mapping(hv)
    log: list[str] = []
    vcpu.load(
        [
            GuestAction(lambda v: log.append("a")),
            Run(chunk([GVA])),
            GuestAction(lambda v: log.append(f"b{v.stats.accesses}")),
        ]
    )
    action = None
    while (exit_ := vcpu.run(action)) is not None:
        action = hv.handle(exit_)
    assert log == ["a", "b1"]


def test_ept_write_protect_then_handler_restores() -> None:
    """A write to a read-only EPT page exits; a handler that makes it writable and runs INVEPT
    lets the guest resume and finish."""
    hv = Hypervisor()
    vm, _, vcpu = guest_with_mapping(hv)
    vcpu.load([Run(chunk([GVA])), Run(chunk([GVA], kind=Access.WRITE))])
    vm.back(2 * MiB)
    vm.ept.protect(2 * MiB, 4096, "r-x")
    fixed: list[int] = []

    def unprotect(exit_: Exit) -> ExitAction | None:
        record = exit_.record
        if isinstance(record, EptViolation) and record.qualification & 2:
            vm.ept.protect(record.gpa & ~0xFFF, 4096, "rwx")
            vm.invept([exit_.vcpu])
            fixed.append(record.gpa)
            return ExitAction.RETRY
        return None

    hv.on(ExitReason.EPT_VIOLATION, unprotect)
    action = None
    while (exit_ := vcpu.run(action)) is not None:
        action = hv.handle(exit_)
    assert fixed == [2 * MiB] and vcpu.stats.writes == 1
    leaf = vm.ept.lookup(2 * MiB)
    assert leaf is not None and leaf.value & Ept.W


def _write_protected(hv: Hypervisor, answer: ExitAction):  # type: ignore[no-untyped-def]
    """A vCPU that reads GVA, writes it (trapped: the page is read-only), then reads GVA+8;
    the write's handler answers ``answer``."""
    vm, _, vcpu = guest_with_mapping(hv)
    vm.back(2 * MiB)
    vm.ept.protect(2 * MiB, 4096, "r-x")
    seen: list[int] = []

    def trap(exit_: Exit) -> ExitAction | None:
        record = exit_.record
        if not (isinstance(record, EptViolation) and record.qualification & 2):
            return None
        seen.append(record.gpa)
        return answer

    hv.on(ExitReason.EPT_VIOLATION, trap)
    vcpu.load([Run(chunk([GVA])), Run(chunk([GVA], kind=Access.WRITE)), Run(chunk([GVA + 8]))])
    return vcpu, seen


def test_skip_goes_past_the_access_and_stop_ends_the_run() -> None:
    hv = Hypervisor()
    vcpu, seen = _write_protected(hv, ExitAction.SKIP)
    hv.run([vcpu])
    assert seen == [2 * MiB] and vcpu.stats.accesses == 2 and vcpu.stats.writes == 0
    assert hv.exits == {ExitReason.EPT_VIOLATION: 1}
    assert exit_names(hv.exits) == {"EPT_VIOLATION": 1}

    hv = Hypervisor()
    vcpu, seen = _write_protected(hv, ExitAction.STOP)
    hv.run([vcpu])
    assert seen == [2 * MiB] and vcpu.stats.accesses == 1  # the read after it never ran


def test_each_exit_must_be_answered_with_an_action_the_loop_can_do() -> None:
    hv = Hypervisor()
    vcpu, _ = _write_protected(hv, ExitAction.STEP)
    with pytest.raises(EptlabError, match="answer"):
        vcpu.run(ExitAction.RETRY)  # no exit to answer yet
    exit_ = vcpu.run()
    assert exit_ is not None
    with pytest.raises(EptlabError, match="answer"):
        vcpu.run()  # the exit was not answered: it still waits
    exit_ = vcpu.run(ExitAction.RETRY)  # the access that exited runs again: the same exit
    assert exit_ is not None and exit_.reason == ExitReason.EPT_VIOLATION
    with pytest.raises(EptlabError, match="does not single-step"):
        vcpu.run(hv.handle(exit_))
    with pytest.raises(EptlabError, match="can only RETRY"):
        hv.handle(exit_, expect=ExitAction.RETRY)
    with pytest.raises(EptlabError, match="can only be retried"):
        vcpu.write_u64(GVA, 1)  # a single access outside a program: STEP is refused too


def test_a_hypercall_is_complete_once_handled() -> None:
    hv = Hypervisor()
    vm, _, vcpu = guest_with_mapping(hv)
    hv.hypercall(7, "seven")(lambda _vcpu, args: 7)
    vcpu.load([Hypercall(7), Run(chunk([GVA]))])
    exit_ = vcpu.run()
    assert exit_ is not None and hv.handle(exit_) is ExitAction.SKIP
    with pytest.raises(EptlabError, match="complete"):
        vcpu.run(ExitAction.RETRY)


def test_split_to_4k_splits_a_large_leaf_down_and_counts_the_splits() -> None:
    from eptlab.arch.bits import PageSize
    from eptlab.hv import Hypervisor

    hv = Hypervisor(host_memory=1 << 32, layout="contiguous")
    vm = hv.create_vm("g", 1 << 30, backing=PageSize.SIZE_1G)
    gpa = (5 << 21) + 7 * 4096
    vm.back(gpa)
    before = vm.ept.lookup(gpa)
    assert before is not None and before.level == 3
    leaf, splits = vm.ept.split_to_4k(gpa)
    assert (leaf.level, splits) == (1, 2)
    assert leaf.target == before.target  # the same host frame, now by a 4 KiB leaf
    assert vm.ept.split_to_4k(gpa)[1] == 0
