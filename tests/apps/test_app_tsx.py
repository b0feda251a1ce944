"""Lock elision on the RTM model: committed sections equal a serial execution, the retry policy,
pre-touching, the fallback path, IPIs, and dirty logging."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eptlab.apps.scenario import populate
from eptlab.apps.tsx import (
    LOCK_BUSY,
    RetryPolicy,
    Section,
    TsxRunner,
    install_timer_tick,
)
from eptlab.apps.tsx_scenarios import Scenario, play
from eptlab.arch.bits import PAGE_SIZE
from eptlab.arch.exits import ExitReason
from eptlab.errors import ConfigError
from eptlab.guest import GuestKernel, KernelImage
from eptlab.hv import Hypervisor
from eptlab.hv.dirty_log import PmlLog, WriteProtectLog
from eptlab.mmu.peek import peek_hpa
from eptlab.mmu.rtm import (
    XABORT_CAPACITY,
    XABORT_CONFLICT,
    XABORT_EXPLICIT,
    XABORT_RETRY,
    Op,
    TxStream,
)

MiB = 1 << 20
U64 = (1 << 64) - 1
WORDS = 12


def word_offset(k: int) -> int:
    """Word k: on page k % 3, line (k // 3) % 2, word k // 6 of the line (words share lines)."""
    return (k % 3) * PAGE_SIZE + ((k // 3) % 2) * 64 + (k // 6) * 8


op_strategy = st.tuples(
    st.sampled_from([Op.READ, Op.WRITE, Op.ADD]),
    st.integers(0, WORDS - 1),
    st.integers(1, 1 << 40),
)
program_strategy = st.lists(
    st.lists(op_strategy, min_size=1, max_size=6), min_size=1, max_size=4
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    programs=st.lists(program_strategy, min_size=1, max_size=3),
    retries=st.integers(0, 3),
    timer=st.sampled_from([None, 5, 17]),
    quantum=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    lazy=st.booleans(),
)
def test_committed_and_fallback_sections_equal_a_serial_execution(
    programs: list[list[list[tuple[Op, int, int]]]],
    retries: int,
    timer: int | None,
    quantum: int,
    seed: int,
    lazy: bool,
) -> None:
    hv = Hypervisor()
    vm = hv.create_vm("guest", 64 * MiB)
    install_timer_tick(hv)
    kernel = GuestKernel(vm, seed=seed, image=KernelImage(2 * MiB, 2 * MiB, 2 * MiB))
    process = kernel.spawn("app")
    vcpus = [vm.add_vcpu(cr3=process.cr3) for _ in programs]
    for vcpu in vcpus:
        kernel.switch_to(vcpu, process)
    lock = populate(kernel, process, PAGE_SIZE)
    vm.back(lock.gpa)
    region = populate(kernel, process, 3 * PAGE_SIZE)
    if not lazy:  # else the first touch of each page is an EPT violation, often mid-transaction
        vm.ept.map_range(region.gpa, 2 * MiB)
    sections = [
        [
            Section(TxStream.of([(op, region.gva + word_offset(k), v) for op, k, v in body]))
            for body in program
        ]
        for program in programs
    ]
    runner = TsxRunner(
        hv,
        vcpus,
        lock=lock.gva,
        policy=RetryPolicy(retries),
        seed=seed,
        quantum=(1, quantum),
        timer_period=timer,
        record=True,
    )
    stats = runner.run(sections)

    total = sum(len(p) for p in programs)
    assert stats.sections == total == stats.commits + stats.fallbacks
    done = sorted(stats.completions, key=lambda c: c.sequence)
    assert sorted((c.lane, c.section) for c in done) == sorted(
        (lane, k) for lane, p in enumerate(programs) for k in range(len(p))
    )
    memory: dict[int, int] = {}
    for c in done:  # the serial execution, in commit order
        for index, (op, k, v) in enumerate(programs[c.lane][c.section]):
            if op == Op.READ:
                assert c.reads[index] == memory.get(k, 0), (c, index)
            elif op == Op.WRITE:
                memory[k] = v
            else:
                memory[k] = (memory.get(k, 0) + v) & U64
    guest, vmcs = vcpus[0].guest, vcpus[0].vmcs
    for k in range(WORDS):
        hpa = peek_hpa(hv.host.memory, guest, vmcs, 46, region.gva + word_offset(k))
        actual = 0 if hpa is None else hv.host.memory.read_u64(hpa)
        assert actual == memory.get(k, 0)
    assert stats.aborts == stats.attempts - stats.commits


def test_retry_policy() -> None:
    p = RetryPolicy(max_retries=2)
    assert p.decide(0, 1) == "retry" and p.decide(0, 2) == "retry"
    assert p.decide(0, 3) == "fallback"
    assert p.decide(XABORT_CONFLICT | XABORT_RETRY, 1) == "retry"
    assert p.decide(XABORT_CAPACITY, 1) == "fallback"
    assert RetryPolicy(2, retry_capacity=True).decide(XABORT_CAPACITY, 1) == "retry"
    busy = XABORT_EXPLICIT | LOCK_BUSY << 24
    assert p.decide(busy, 1) == "wait" and p.decide(busy, 3) == "fallback"
    assert p.decide(XABORT_EXPLICIT | 3 << 24, 1) == "retry"
    glibc = RetryPolicy(max_retries=2, honor_retry_bit=True)
    assert glibc.decide(0, 1) == "fallback"  # an exit left EAX = 0
    assert glibc.decide(XABORT_CONFLICT | XABORT_RETRY, 1) == "retry"
    with pytest.raises(ConfigError):
        RetryPolicy(-1)


def test_pretouch_touches_each_page_once_and_writes_where_the_body_writes() -> None:
    base = 0x7000_0000_0000
    body = TxStream.of(
        [
            (Op.READ, base + 8),
            (Op.ADD, base + PAGE_SIZE + 72, 1),
            (Op.READ, base + PAGE_SIZE + 8),
            (Op.READ, base + 16),
            (Op.WRITE, base + 5 * PAGE_SIZE + 4, 9),
        ]
    )
    touch = Section(body).pretouch
    assert sorted(touch.gva.tolist()) == [base + 8, base + PAGE_SIZE + 72, base + 5 * PAGE_SIZE]
    kinds = dict(zip(touch.gva.tolist(), touch.op.tolist(), strict=True))
    assert kinds[base + 8] == Op.READ
    assert kinds[base + PAGE_SIZE + 72] == Op.ADD and kinds[base + 5 * PAGE_SIZE] == Op.ADD
    assert not touch.value.any()  # add 0: the touch changes no data
    with pytest.raises(ConfigError):
        Section(TxStream.marker(Op.XBEGIN))


def test_the_fallback_takes_the_guest_faults_a_transaction_cannot() -> None:
    o = play(Scenario("guest-pf", sections=30, region_pages=64, max_retries=2))
    st_ = o.stats
    assert st_.sections == 30 and st_.unresolved_faults == 0
    assert set(st_.aborts_by_cause) == {"guest_fault"}
    assert st_.ept_violations_in_tx == 0  # the #PF comes first and is suppressed
    assert st_.fallbacks > 0 and st_.guest_faults > 0  # delivered on the fallback path only
    assert st_.aborts >= 3 * st_.fallbacks  # every retry faults again: the page stays unmapped


def test_a_shootdown_interrupts_the_other_vcpus_transactions() -> None:
    o = play(Scenario("cow", vcpus=2, sections=40, region_pages=64, seed=2))
    assert o.stats.aborts_by_cause["ipi"] > 0
    assert o.stats.exits[ExitReason.EXTERNAL_INTERRUPT] > 0
    assert o.stats.sections == 80


def test_scenarios_refuse_impossible_combinations() -> None:
    with pytest.raises(ConfigError):
        Scenario("cow", "prefetch")
    with pytest.raises(ConfigError):
        Scenario("nope")
    with pytest.raises(ConfigError):
        Scenario("capacity", capacity_lines=20, region_pages=8)
    with pytest.raises(ConfigError):
        Scenario("lazy", reads=0, writes=0)


# -- dirty logging -------------------------------------------------------------------------------


def _guest(pml: bool = False) -> tuple[Hypervisor, GuestKernel, int, int]:
    hv = Hypervisor()
    vm = hv.create_vm("guest", 64 * MiB, pml=pml)
    kernel = GuestKernel(vm, seed=1, image=KernelImage(2 * MiB, 2 * MiB, 2 * MiB))
    process = kernel.spawn("app")
    vcpu = vm.add_vcpu(cr3=process.cr3)
    kernel.switch_to(vcpu, process)
    region = populate(kernel, process, 8 * PAGE_SIZE)
    vm.ept.map_range(region.gpa, 2 * MiB)
    return hv, kernel, region.gva, region.gpa


def test_write_protect_log_exits_once_per_page_per_round() -> None:
    hv, _, gva, gpa = _guest()
    vm = hv.vms[0]
    vcpu = vm.vcpus[0]
    log = WriteProtectLog(vm)
    log.start(gpa, 8 * PAGE_SIZE)
    vcpu.read_u64(gva + 3 * PAGE_SIZE)
    vcpu.write_u64(gva, 1)
    vcpu.write_u64(gva + 8, 2)
    vcpu.write_u64(gva + 2 * PAGE_SIZE, 3)
    assert log.counters["write_faults"] == 2
    assert log.collect() == {gpa, gpa + 2 * PAGE_SIZE}
    vcpu.write_u64(gva, 4)
    assert log.counters["write_faults"] == 3 and log.collect() == {gpa}
    assert vcpu.read_u64(gva) == 4 and vcpu.read_u64(gva + 2 * PAGE_SIZE) == 3


def test_pml_log_collects_the_pages_written_and_rearms_them() -> None:
    hv, _, gva, gpa = _guest(pml=True)
    vm = hv.vms[0]
    vcpu = vm.vcpus[0]
    log = PmlLog(vm)
    log.start(gpa, 8 * PAGE_SIZE)
    region = set(range(gpa, gpa + 8 * PAGE_SIZE, PAGE_SIZE))
    for page in (1, 4, 4, 6):
        vcpu.write_u64(gva + page * PAGE_SIZE, page)
    assert log.collect() & region == {gpa + PAGE_SIZE, gpa + 4 * PAGE_SIZE, gpa + 6 * PAGE_SIZE}
    vcpu.write_u64(gva + 4 * PAGE_SIZE, 9)
    assert log.collect() & region == {gpa + 4 * PAGE_SIZE}
    with pytest.raises(ConfigError):
        PmlLog(_guest()[0].vms[0])


def test_sections_run_with_the_dirty_logger_see_their_own_counts() -> None:
    o = play(Scenario("wp-dirty", sections=60, region_pages=64, round_every=20))
    st_ = o.stats
    assert st_.rounds == 3 and st_.sections == 60
    assert st_.aborts_by_cause["ept_violation"] == st_.ept_violations_in_tx > 0
    # every add of every section landed exactly once: the region holds sections x writes
    total = 0
    guest, vmcs = o.vcpus[0].guest, o.vcpus[0].vmcs
    for line in range(64 * 64):
        hpa = peek_hpa(o.hv.host.memory, guest, vmcs, 46, o.region + 64 * line)
        if hpa is not None:
            total += o.hv.host.memory.read_u64(hpa)
    assert total == 60 * o.scenario.writes
    assert np.isfinite(st_.retries_to_commit)


@pytest.mark.parametrize("kind", ["cow", "wp-dirty", "pml-dirty", "conflict", "lazy"])
def test_every_scenario_on_three_vcpus_equals_a_serial_execution(kind: str) -> None:
    """Replaying committed and fallback sections in commit order reproduces every value read and
    the final memory, with copy-on-write, both dirty loggers (rounds overlapping other vCPUs'
    transactions), conflicts and lazy backing."""
    from eptlab.apps.tsx_scenarios import Scenario, make_sections, play
    from eptlab.mmu.peek import peek_hpa
    from eptlab.mmu.rtm import Op

    extra: dict[str, Any] = {"round_every": 7} if "dirty" in kind else {}
    if kind == "conflict":
        extra = {"hot_lines": 8}
    scenario = Scenario(
        kind, vcpus=3, sections=30, region_pages=16, reads=4, writes=4, seed=1, record=True,
        **extra,
    )
    outcome = play(scenario)
    programs = [make_sections(scenario, outcome.region, k) for k in range(3)]
    memory: dict[int, int] = {}
    mismatched_reads = 0
    for done in sorted(outcome.stats.completions, key=lambda c: c.sequence):
        body = programs[done.lane][done.section].body
        for i in range(len(body)):
            op, word, value = int(body.op[i]), int(body.gva[i]) & ~7, int(body.value[i])
            if op == Op.READ:
                mismatched_reads += done.reads.get(i) != memory.get(word, 0)
            elif op == Op.ADD:
                memory[word] = (memory.get(word, 0) + value) & ((1 << 64) - 1)
    assert len(outcome.stats.completions) == 3 * 30
    assert memory and mismatched_reads == 0
    host = outcome.hv.host.memory
    vcpu = outcome.vcpus[0]
    for word, value in memory.items():
        hpa = peek_hpa(host, vcpu.guest, vcpu.vmcs, outcome.hv.features.maxphyaddr, word)
        assert hpa is not None and host.read_u64(hpa) == value
