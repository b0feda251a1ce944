"""The RTM model: abort status bits, capacity, conflicts, nesting, exits and faults inside
transactions, commit/discard of stores, and the side-effect-free walk it relies on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eptlab.apps.scenario import populate
from eptlab.arch.access import Access
from eptlab.arch.bits import PAGE_SIZE
from eptlab.arch.ept import Ept
from eptlab.arch.exits import GENERAL_PROTECTION_VECTOR, EptViolation
from eptlab.errors import ConfigError
from eptlab.guest import GuestKernel, KernelImage
from eptlab.hv import VCPU, VM, Exit, Hypervisor
from eptlab.mmu.peek import peek_hpa
from eptlab.mmu.rtm import (
    XABORT_CAPACITY,
    XABORT_CONFLICT,
    XABORT_DEBUG,
    XABORT_EXPLICIT,
    XABORT_NESTED,
    XABORT_RETRY,
    AbortCause,
    Op,
    RtmConfig,
    TxState,
    TxStream,
    abort_status,
    conflicts_with,
    first_capacity_overflow,
    xabort_code,
)
from eptlab.mmu.rtm_machine import (
    AbortEvent,
    CommitEvent,
    DeadlineEvent,
    DoneEvent,
    Event,
    ExitEvent,
    FaultEvent,
    RtmMachine,
)

MiB = 1 << 20


@dataclass
class World:
    hv: Hypervisor
    vm: VM
    kernel: GuestKernel
    vcpus: list[VCPU]
    region: int  # GVA of a backed 1 MiB region
    region_gpa: int
    lazy: int  # GVA of a mapped but unbacked 1 MiB region
    unmapped: int  # GVA of an mmap'd region the guest has not mapped yet
    machine: RtmMachine

    def word(self, gva: int) -> int:
        hpa = peek_hpa(self.hv.host.memory, self.vcpus[0].guest, self.vcpus[0].vmcs, 46, gva)
        assert hpa is not None
        return self.hv.host.memory.read_u64(hpa & ~7)


def world(vcpus: int = 2, *, ept_ad: bool = False, config: RtmConfig | None = None) -> World:
    hv = Hypervisor()
    vm = hv.create_vm("guest", 64 * MiB, ept_ad=ept_ad)
    kernel = GuestKernel(vm, seed=3, image=KernelImage(2 * MiB, 2 * MiB, 2 * MiB))
    process = kernel.spawn("app")
    cpus = [vm.add_vcpu(cr3=process.cr3) for _ in range(vcpus)]
    for cpu in cpus:
        kernel.switch_to(cpu, process)
    region = populate(kernel, process, MiB)
    vm.ept.map_range(region.gpa, 2 * MiB)
    lazy = populate(kernel, process, MiB)
    unmapped = kernel.mmap(process, MiB)
    machine = RtmMachine(hv.engine, config, seed=1, record_reads=True)
    for cpu in cpus:
        machine.add_lane(cpu.engine_id, user=True)
    return World(hv, vm, kernel, cpus, region.gva, region.gpa, lazy.gva, unmapped, machine)


def drain(w: World) -> list[Event]:
    """Run to the end, handing exits to the hypervisor and faults to the guest kernel."""
    events = []
    while (event := w.machine.run()) is not None:
        events.append(event)
        if isinstance(event, ExitEvent):
            w.hv.handle(Exit(w.vcpus[event.lane], event.exit))
        elif isinstance(event, FaultEvent) and not w.kernel.handle_fault(
            w.vcpus[event.lane], event.fault
        ):
            w.machine.skip(event.lane)
    return events


def aborts(events: list[Event]) -> list[AbortEvent]:
    return [e for e in events if isinstance(e, AbortEvent)]


def tx(*body: tuple[Op, int, int] | tuple[Op, int] | tuple[Op]) -> TxStream:
    return TxStream.of([(Op.XBEGIN,), *body, (Op.XEND,)])


# -- status bits --------------------------------------------------------------------------------


def test_abort_status_bits_follow_the_sdm_table() -> None:
    assert abort_status(AbortCause.XABORT, 1, 0xA5) == XABORT_EXPLICIT | 0xA5 << 24
    assert xabort_code(abort_status(AbortCause.XABORT, 1, 0x1FF)) == 0xFF  # an imm8
    assert not abort_status(AbortCause.XABORT, 1, 7) & XABORT_RETRY  # clear when bit 0 is set
    assert abort_status(AbortCause.CONFLICT, 1) == XABORT_CONFLICT | XABORT_RETRY
    assert abort_status(AbortCause.CAPACITY, 1) == XABORT_CAPACITY
    assert abort_status(AbortCause.DEBUG, 1) == XABORT_DEBUG
    for cause in (AbortCause.EPT_VIOLATION, AbortCause.PML_FULL, AbortCause.TIMER,
                  AbortCause.IPI, AbortCause.GUEST_FAULT):
        assert abort_status(cause, 1) == 0
        assert abort_status(cause, 2) == XABORT_NESTED
    assert (XABORT_EXPLICIT, XABORT_RETRY, XABORT_CONFLICT, XABORT_CAPACITY, XABORT_DEBUG,
            XABORT_NESTED) == (1, 2, 4, 8, 16, 32)


def test_configuration_is_checked() -> None:
    with pytest.raises(ConfigError):
        RtmConfig(write_sets=48)
    with pytest.raises(ConfigError):
        TxStream(np.zeros(2, np.int8), np.zeros(1, np.int64), np.zeros(2, np.int64))
    with pytest.raises(ConfigError):
        TxStream.of([(Op.READ,)]) + TxStream(np.array([9], np.int8), np.zeros(1, np.int64),
                                             np.zeros(1, np.int64))


# -- commit and abort -----------------------------------------------------------------------------


def test_commit_makes_the_stores_visible_and_reads_see_the_transactions_own_stores() -> None:
    w = world(1)
    g = w.region
    events = drain_loaded(w, 0, tx((Op.ADD, g, 5), (Op.READ, g), (Op.WRITE, g + 8, 7)))
    commits = [e for e in events if isinstance(e, CommitEvent)]
    assert len(commits) == 1 and commits[0].reads == ((2, 5),)  # its own buffered add
    assert (w.word(g), w.word(g + 8)) == (5, 7)


def drain_loaded(w: World, lane: int, stream: TxStream) -> list[Event]:
    w.machine.load(lane, stream)
    return drain(w)


def test_an_exit_inside_a_transaction_aborts_it_discards_its_stores_and_is_still_handled() -> None:
    w = world(1)
    g = w.region
    w.machine.load(0, tx((Op.WRITE, g, 99), (Op.READ, w.lazy + 3 * PAGE_SIZE), (Op.WRITE, g, 5)))
    event = w.machine.run()
    assert isinstance(event, ExitEvent) and isinstance(event.exit, EptViolation)
    assert event.abort is not None
    assert event.abort.status == 0  # no EAX bit describes an exit (SDM: EAX can be 0)
    assert event.abort.cause is AbortCause.EPT_VIOLATION
    assert (event.abort.begin, event.abort.at, event.abort.discarded_words) == (0, 2, 1)
    assert w.word(g) == 0  # the transactional store never became visible
    assert w.machine.run() is None  # parked at the abort path
    w.hv.handle(Exit(w.vcpus[0], event.exit))  # the hypervisor backs the page
    assert w.vm.ept.lookup(event.exit.gpa) is not None
    events = drain_loaded(w, 0, event.abort.stream)  # the retry
    assert any(isinstance(e, CommitEvent) for e in events) and w.word(g) == 5


def test_a_guest_page_fault_inside_a_transaction_is_suppressed() -> None:
    w = world(1)
    g = w.unmapped + 5 * PAGE_SIZE
    before = w.kernel.counters["demand_faults"]
    w.machine.load(0, tx((Op.WRITE, w.region, 1), (Op.WRITE, g, 2)))
    event = w.machine.run()
    assert isinstance(event, AbortEvent) and event.abort.cause is AbortCause.GUEST_FAULT
    assert event.abort.status == 0 and event.abort.fault is not None
    assert w.kernel.counters["demand_faults"] == before  # the guest kernel never saw it
    assert w.word(w.region) == 0
    # the same stores without a transaction: the fault is delivered and resolved
    events = drain_loaded(w, 0, TxStream.of([(Op.WRITE, w.region, 1), (Op.WRITE, g, 2)]))
    assert any(isinstance(e, FaultEvent) for e in events)
    assert w.kernel.counters["demand_faults"] == before + 1
    assert (w.word(w.region), w.word(g)) == (1, 2)


def test_xabort_puts_imm8_in_bits_31_24_and_is_a_nop_outside_a_transaction() -> None:
    w = world(1)
    events = drain_loaded(w, 0, tx((Op.WRITE, w.region, 4), (Op.XABORT, 0, 0x42)))
    (a,) = aborts(events)
    assert a.abort.status == XABORT_EXPLICIT | 0x42 << 24 and xabort_code(a.abort.status) == 0x42
    assert w.word(w.region) == 0
    events = drain_loaded(w, 0, TxStream.of([(Op.XABORT, 0, 1), (Op.WRITE, w.region, 3)]))
    assert not aborts(events) and w.word(w.region) == 3


def test_test_abort_aborts_only_when_the_word_is_set() -> None:
    w = world(1)
    lock, data = w.region + 4096, w.region
    body = tx((Op.TEST_ABORT, lock, 0xFF), (Op.WRITE, data, 1))
    assert not aborts(drain_loaded(w, 0, body)) and w.word(data) == 1
    drain_loaded(w, 0, TxStream.of([(Op.WRITE, lock, 1)]))
    (a,) = aborts(drain_loaded(w, 0, tx((Op.TEST_ABORT, lock, 0xFF), (Op.WRITE, data, 2))))
    assert xabort_code(a.abort.status) == 0xFF and a.abort.at == 1 and w.word(data) == 1


def test_nesting_commits_at_the_outermost_xend_and_aborts_to_the_outermost_xbegin() -> None:
    w = world(1)
    g = w.region
    nested = TxStream.of([(Op.WRITE, g, 1), (Op.XBEGIN,), (Op.WRITE, g + 8, 2), (Op.XBEGIN,),
                          (Op.WRITE, g + 16, 3), (Op.XEND,), (Op.XEND,), (Op.XEND,)])
    events = drain_loaded(w, 0, TxStream.marker(Op.XBEGIN) + nested)
    assert [type(e) for e in events] == [CommitEvent, DoneEvent]
    assert (w.word(g), w.word(g + 8), w.word(g + 16)) == (1, 2, 3)
    inner_abort = TxStream.of([(Op.XBEGIN,), (Op.WRITE, g, 7), (Op.XBEGIN,), (Op.XABORT, 0, 9)])
    (a,) = aborts(drain_loaded(w, 0, TxStream.of([(Op.READ, g)]) + inner_abort))
    assert a.abort.status == XABORT_EXPLICIT | XABORT_NESTED | 9 << 24
    assert a.abort.begin == 1 and w.word(g) == 1
    deep = TxStream.concat([TxStream.marker(Op.XBEGIN)] * 8)
    (a,) = aborts(drain_loaded(w, 0, deep))
    assert a.abort.cause is AbortCause.NESTING and a.abort.at == 7
    assert a.abort.status & XABORT_NESTED


def test_xend_outside_a_transaction_is_a_general_protection_fault() -> None:
    w = world(1)
    w.machine.load(0, TxStream.marker(Op.XEND))
    event = w.machine.run()
    assert isinstance(event, FaultEvent) and event.fault.vector == GENERAL_PROTECTION_VECTOR


# -- capacity ------------------------------------------------------------------------------------


def test_write_set_beyond_the_ways_of_one_l1_set_aborts_with_capacity() -> None:
    w = world(1)
    cfg = w.machine.config
    assert (cfg.write_sets, cfg.write_ways) == (64, 12)  # 48 KiB, 12-way L1D
    same_set = [(Op.WRITE, w.region + i * PAGE_SIZE + 128, 1) for i in range(13)]
    events = drain_loaded(w, 0, tx(*same_set[:12]))
    assert any(isinstance(e, CommitEvent) for e in events)
    (a,) = aborts(drain_loaded(w, 0, tx(*[(op, g, 2) for op, g, _ in same_set])))
    assert a.abort.cause is AbortCause.CAPACITY and a.abort.status == XABORT_CAPACITY
    assert a.abort.at == 13  # the 13th distinct line of the set (after the XBEGIN)
    assert w.word(w.region + 128) == 1  # the aborted transaction's stores are gone
    # the same number of lines spread over sets fits; rewriting a line costs no way
    spread = [(Op.WRITE, w.region + 64 * i, 1) for i in range(13)] * 2
    assert any(isinstance(e, CommitEvent) for e in drain_loaded(w, 0, tx(*spread)))


def test_read_set_capacity() -> None:
    w = world(1, config=RtmConfig(read_lines=16))
    reads = [(Op.READ, w.region + 64 * i) for i in range(17)]
    assert any(isinstance(e, CommitEvent) for e in drain_loaded(w, 0, tx(*reads[:16])))
    (a,) = aborts(drain_loaded(w, 0, tx(*reads)))
    assert a.abort.cause is AbortCause.CAPACITY and a.abort.at == 17


# -- conflicts -------------------------------------------------------------------------------------


def test_a_write_to_a_line_another_transaction_read_aborts_that_transaction() -> None:
    w = world(2)
    g = w.region
    w.machine.load(0, TxStream.of([(Op.XBEGIN,), (Op.READ, g + 8), (Op.WRITE, g + 4096, 5)]))
    assert w.machine.run() is None  # lane 0 waits inside its transaction (no XEND yet)
    events = drain_loaded(w, 1, TxStream.of([(Op.WRITE, g, 1)]))  # same line, other word
    (a,) = aborts(events)
    assert a.lane == 0 and a.abort.cause is AbortCause.CONFLICT
    assert a.abort.status == XABORT_CONFLICT | XABORT_RETRY
    assert w.word(g) == 1 and w.word(g + 4096) == 0  # requester wins; the victim's store is gone


def test_any_access_to_a_line_in_another_write_set_aborts_it_and_sees_old_memory() -> None:
    w = world(2)
    g = w.region
    w.machine.load(0, TxStream.of([(Op.XBEGIN,), (Op.WRITE, g, 5)]))
    assert w.machine.run() is None
    events = drain_loaded(w, 1, TxStream.of([(Op.READ, g)]))
    (a,) = aborts(events)
    assert a.lane == 0
    done = [e for e in events if isinstance(e, DoneEvent)]
    assert done[0].reads == ((0, 0),)  # the buffered 5 was never visible
    # reads of a line another transaction only read do not conflict
    w.machine.load(0, TxStream.of([(Op.XBEGIN,), (Op.READ, g)]))
    assert w.machine.run() is None
    assert not aborts(drain_loaded(w, 1, TxStream.of([(Op.READ, g)])))
    assert w.machine.lanes[0].state.active  # stalled inside its transaction
    w.machine.extend(0, TxStream.of([(Op.WRITE, g + 8, 6), (Op.XEND,)]))
    assert isinstance(w.machine.run(), CommitEvent) and w.word(g + 8) == 6


# -- what is not rolled back -----------------------------------------------------------------------


def test_ept_dirty_flags_set_by_an_aborted_transaction_stay() -> None:
    w = world(1, ept_ad=True)
    g = w.region + 7 * PAGE_SIZE
    leaf = w.vm.ept.lookup(w.region_gpa + 7 * PAGE_SIZE)
    assert leaf is not None
    assert not w.hv.host.memory.read_u64(leaf.entry_address) & Ept.D
    (a,) = aborts(drain_loaded(w, 0, tx((Op.WRITE, g, 3), (Op.XABORT, 0, 1))))
    assert w.hv.host.memory.read_u64(leaf.entry_address) & Ept.D  # set, and it stays set
    assert w.word(g) == 0


# -- timers and interrupts -------------------------------------------------------------------------


def test_a_deadline_stops_the_lane_after_exactly_that_many_accesses() -> None:
    w = world(1)
    body = [(Op.READ, w.region + 64 * i) for i in range(50)]
    w.machine.set_deadline(0, 20)
    w.machine.load(0, tx(*body))
    event = w.machine.run()
    assert isinstance(event, DeadlineEvent) and w.machine.lanes[0].executed == 20
    abort = w.machine.interrupt(0, AbortCause.TIMER)
    assert abort is not None and abort.status == 0 and abort.at == 21
    assert w.machine.lanes[0].wasted == 20
    assert w.machine.interrupt(0, AbortCause.TIMER) is None  # nothing left to abort


# -- the walk the model relies on ------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, (MiB // 8) - 1), min_size=1, max_size=40))
def test_peek_agrees_with_the_engine(words: list[int]) -> None:
    w = _peek_world()
    gvas = [w.region + 8 * k for k in words]
    for gva in gvas:
        result = w.hv.engine.translate(gva, Access.READ, vcpu=w.vcpus[0].engine_id)
        assert result.hpa is not None
        hpa = peek_hpa(w.hv.host.memory, w.vcpus[0].guest, w.vcpus[0].vmcs, 46, gva)
        assert hpa == int(result.hpa[0])
    assert peek_hpa(w.hv.host.memory, w.vcpus[0].guest, w.vcpus[0].vmcs, 46, w.unmapped) is None
    assert peek_hpa(w.hv.host.memory, w.vcpus[0].guest, w.vcpus[0].vmcs, 46, w.lazy) is None


_cached: list[World] = []


def _peek_world() -> World:
    if not _cached:
        _cached.append(world(1))
    return _cached[0]


# -- the vectorized set logic against a one-access-at-a-time reference -----------------------------


accesses = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 40), st.sampled_from(["r", "w", "rw", "f"])),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(pre=st.lists(st.tuples(st.integers(0, 40), st.booleans()), max_size=10), run=accesses)
def test_capacity_and_conflicts_match_a_sequential_reference(
    pre: list[tuple[int, bool]], run: list[tuple[int, int, str]]
) -> None:
    cfg = RtmConfig(write_sets=4, write_ways=2, read_lines=6)
    state = TxState(cfg)
    state.start(0)
    lines_of = [line * 3 for line in range(41)]  # spread over the 4 sets
    for line, written in pre[:5]:
        r = np.array([lines_of[line]], np.int64)
        if written and state.per_set[lines_of[line] & 3] < 2:
            state.track(r[:0], r)
        elif not written and len(state.read) < 6:
            state.track(r, r[:0])
    owner = np.array([o for o, _, _ in run], np.int32)
    lines = np.array([lines_of[x] for _, x, _ in run], np.int64)
    is_read = np.array(["r" in k for _, _, k in run], bool)
    is_write = np.array(["w" in k for _, _, k in run], bool)

    # conflicts with lane 0's transaction (its own accesses grow its sets)
    read, write = set(state.read), set(state.write)
    expected = []
    for o, line, r, w in zip(owner, lines.tolist(), is_read, is_write, strict=True):
        if o == 0:
            expected.append(False)
            if r:
                read.add(line)
            if w:
                write.add(line)
        else:
            expected.append(line in write or (bool(w) and line in read | write))
    got = conflicts_with(state, 0, owner, lines, is_read, is_write)
    assert got.tolist() == expected

    # capacity of lane 0's own accesses
    mine = owner == 0
    read, write = set(state.read), set(state.write)
    per = state.per_set.copy()
    first = int(mine.sum())
    for k, (line, r, w) in enumerate(zip(lines[mine].tolist(), is_read[mine], is_write[mine],
                                         strict=True)):
        new_w, new_r = w and line not in write, r and line not in read
        if (new_w and per[line & 3] + 1 > 2) or (new_r and len(read) + 1 > 6):
            first = k
            break
        if new_w:
            write.add(line)
            per[line & 3] += 1
        if new_r:
            read.add(line)
    assert first_capacity_overflow(state, lines[mine], is_read[mine], is_write[mine]) == first
