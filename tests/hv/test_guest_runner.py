"""The shared run loop (the handler's action: retry, skip, single-step or stop; values at the HPA
used; timer exits; hypercalls in the stream) and the EPT manager's edits of leaves present or
not."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from eptlab.apps.heap_guest import HeapGuest
from eptlab.arch import Access, ExitReason
from eptlab.arch.exits import EptQual, EptViolation
from eptlab.errors import ConfigError, EptlabError, MappingError
from eptlab.guest import DIRECT_MAP_BASE
from eptlab.hv import VCPU, Exit, ExitAction, Vmcall, exit_names
from eptlab.hv.guest_runner import GuestRunner

DM = DIRECT_MAP_BASE - (1 << 64)


@dataclass
class Recorder:
    """A policy that write-protects one page and lets trapped accesses through one way."""

    guest: HeapGuest
    page: int
    how: ExitAction
    timer_armed: bool = False
    clock: int = 0
    operand: int | None = None
    timer_action: ExitAction = ExitAction.RETRY
    seen: list[tuple[str, int, int | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        vm = self.guest.vm
        vm.ept.split(self.page)
        vm.ept.protect(self.page, 4096, "r-x")
        vm.invept()
        hv = self.guest.hv
        hv.on(ExitReason.EPT_VIOLATION, self.violation)
        hv.on(ExitReason.MONITOR_TRAP_FLAG, self.mtf)
        hv.on(ExitReason.PREEMPTION_TIMER, self.timer)

    def violation(self, exit_: Exit) -> ExitAction | None:
        record = exit_.record
        assert isinstance(record, EptViolation) and record.qualification & EptQual.WRITE
        self.seen.append(("violation", self.clock, self.operand))
        if self.how is ExitAction.SKIP:  # emulate the store
            if self.operand is not None:
                self.guest.vm.write_u64(record.gpa & ~7, self.operand)
        elif self.how is not ExitAction.STOP:
            self.guest.vm.ept.protect(self.page, 4096, "rwx")
        return self.how

    def mtf(self, exit_: Exit) -> ExitAction | None:
        self.seen.append(("mtf", self.clock, None))
        self.guest.vm.ept.protect(self.page, 4096, "r-x")
        self.guest.vm.invept()
        return ExitAction.RETRY

    def timer(self, exit_: Exit) -> ExitAction | None:
        self.seen.append(("timer", self.clock, None))
        return self.timer_action


def stream(page: int, other: int) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
    """write page+0 (=11), read page+8, write other (=22), write page+16 (=33), write page+24
    (no value)."""
    gva = np.array([page, page + 8, other, page + 16, page + 24], np.int64) + DM
    kind = np.array([1, 0, 1, 1, 1], np.int8)
    return gva, kind, {0: 11, 2: 22, 3: 33}


@pytest.mark.parametrize("how", [ExitAction.SKIP, ExitAction.STEP])
def test_trapped_stores_complete_with_their_values(how: ExitAction) -> None:
    guest = HeapGuest(heap_pages=8)
    page = guest.pages[0]
    policy = Recorder(guest, page, how)
    gva, kind, values = stream(page, guest.ring)
    report = GuestRunner(guest.vcpu, policy).run(gva, kind, values=values, period=100)
    assert [guest.read(page + 8 * i) for i in range(4)] == [11, 0, 33, 0]
    assert guest.read(guest.ring) == 22  # an untrapped store: performed by the "hardware"
    violations = [(p, op) for what, p, op in policy.seen if what == "violation"]
    assert violations == [(0, 11), (3, 33), (4, None)]  # the read is not trapped
    if how is ExitAction.SKIP:
        assert set(report.performed_stores) == {2}
        assert report.exits == {ExitReason.EPT_VIOLATION: 3}
    else:  # each stepped access completes, then the MTF exit comes at the same position
        assert set(report.performed_stores) == {0, 2, 3}
        assert [p for what, p, _ in policy.seen if what == "mtf"] == [0, 3, 4]
        assert report.exits == {ExitReason.EPT_VIOLATION: 3, ExitReason.MONITOR_TRAP_FLAG: 3}


def test_timer_exits_and_hypercalls_sit_where_the_stream_puts_them() -> None:
    guest = HeapGuest(heap_pages=8)
    policy = Recorder(guest, guest.pages[1], ExitAction.SKIP, timer_armed=True)
    calls: list[tuple[int, tuple[int, ...]]] = []

    @guest.hv.hypercall(0x55, "probe")
    def probe(vcpu: VCPU, args: tuple[int, ...]) -> int:
        calls.append((policy.clock, args))
        return 0

    n = 10
    gva = np.full(n, DM + guest.ring, np.int64)
    kind = np.zeros(n, np.int8)
    runner = GuestRunner(guest.vcpu, policy)
    report = runner.run(
        gva,
        kind,
        calls={0: Vmcall(0x55, (1,)), 7: Vmcall(0x55, (2,)), n: Vmcall(0x55, (3,))},
        period=4,
    )
    assert calls == [(0, (1,)), (7, (2,)), (n, (3,))]
    assert [p for what, p, _ in policy.seen if what == "timer"] == [4, 8, 10]  # and the end
    assert exit_names(report.exits) == {"VMCALL": 3, "PREEMPTION_TIMER": 3}
    policy.seen.clear()
    runner.run(gva, kind, period=4, final_timer=False)
    assert [p for what, p, _ in policy.seen if what == "timer"] == [4, 8]
    for final, expected in ((True, [4, 8]), (False, [4])):  # the end falls on a period end
        policy.seen.clear()
        runner.run(gva[:8], kind[:8], period=4, final_timer=final)
        assert [p for what, p, _ in policy.seen if what == "timer"] == expected
    with pytest.raises(ConfigError):
        runner.run(gva, kind, period=0)
    with pytest.raises(ConfigError):
        runner.run(gva, kind, calls={n + 1: Vmcall(0x55)})


def test_retry_runs_the_access_again_after_the_handler_fixed_it() -> None:
    guest = HeapGuest(heap_pages=8)
    page = guest.pages[0]
    policy = Recorder(guest, page, ExitAction.RETRY)  # opens the page, then the store reruns
    gva, kind, values = stream(page, guest.ring)
    report = GuestRunner(guest.vcpu, policy).run(gva, kind, values=values, period=100)
    assert [(what, p) for what, p, _ in policy.seen] == [("violation", 0)]  # open from then on
    assert [guest.read(page + 8 * i) for i in range(4)] == [11, 0, 33, 0]
    assert set(report.performed_stores) == {0, 2, 3} and report.accesses == 5


def test_stop_ends_the_run_at_the_access_that_exited() -> None:
    guest = HeapGuest(heap_pages=8)
    page = guest.pages[0]
    policy = Recorder(guest, page, ExitAction.STOP)
    gva, kind, values = stream(page, guest.ring)
    gva, kind = np.concatenate([[DM + guest.ring], gva]), np.concatenate([[0], kind])
    values = {p + 1: v for p, v in values.items()}
    before = guest.vcpu.stats.accesses
    report = GuestRunner(guest.vcpu, policy).run(gva, kind, values=values, period=100)
    assert report.accesses == 1 and report.performed_stores == {}  # the store at 1 did not run
    assert guest.vcpu.stats.accesses - before == 1 and guest.read(page) == 0


def test_an_action_an_exit_does_not_allow_is_an_error() -> None:
    guest = HeapGuest(heap_pages=8)
    policy = Recorder(guest, guest.pages[1], ExitAction.SKIP, timer_armed=True)
    policy.timer_action = ExitAction.SKIP  # a timer exit comes between accesses: nothing to skip
    gva = np.full(4, DM + guest.ring, np.int64)
    with pytest.raises(EptlabError, match="answered SKIP; this exit takes RETRY, STOP"):
        GuestRunner(guest.vcpu, policy).run(gva, np.zeros(4, np.int8), period=2)
    policy.timer_action = ExitAction.STOP
    report = GuestRunner(guest.vcpu, policy).run(gva, np.zeros(4, np.int8), period=2)
    assert report.accesses == 2  # stopped at the first period end


def test_a_leaf_with_every_right_revoked_is_not_present_and_comes_back() -> None:
    guest = HeapGuest(heap_pages=8)
    ept, page = guest.vm.ept, guest.pages[2]
    with pytest.raises(MappingError):  # still inside a 2 MiB leaf: no 4 KiB entry yet
        ept.leaf_slot(page)
    ept.split(page)
    target = ept.host_address(page)
    assert ept.set_leaf_permissions(page, "---")
    assert not ept.set_leaf_permissions(page, "---")  # no change the second time
    assert ept.lookup(page) is None  # bits 2:0 = 0: not present
    guest.vm.invept()
    result = guest.hv.engine.translate(
        DIRECT_MAP_BASE + page, Access.READ, vcpu=guest.vcpu.engine_id
    )
    assert isinstance(result.exit, EptViolation)
    assert not result.exit.qualification & (EptQual.READABLE | EptQual.WRITABLE)
    assert ept.set_entry_permissions(ept.leaf_slot(page), "rwx")
    assert ept.host_address(page) == target
    assert guest.hv.engine.translate(
        DIRECT_MAP_BASE + page, Access.READ, vcpu=guest.vcpu.engine_id
    ).done
