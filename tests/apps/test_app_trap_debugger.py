"""The rotating-trap debugger against a guest heap with injected wild writes: trap-all reports
every bug write its filter does not dismiss, no trapping finds none, sampled runs report exactly
the reportable bug writes that hit a trapped page (never an invented one), INVEPT after revoking
matters, the filter removes every false alarm of the modelled transients, and legitimate writes
leave memory as the guest wrote it."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eptlab.apps.heap_guest import (
    BUG_VALUE,
    EVENT_ALLOC,
    EVENT_FREE,
    EVENT_SLAB,
    HeapGuest,
    encode_event,
    pointer,
)
from eptlab.apps.heap_program import HeapProgram, HeapWorkload, TrapStream
from eptlab.apps.trap_debugger import Ownership, TrapDebugger
from eptlab.apps.trap_score import reportable
from eptlab.arch.exits import ExitReason
from eptlab.errors import ConfigError
from eptlab.experiments.trap_debugger import Config, ConfigRun, TrapDebuggerParams, run_config
from eptlab.guest import DIRECT_MAP_BASE
from eptlab.hv.guest_runner import GuestRunner

PAGES = 128
W = HeapWorkload(
    accesses=20_000,
    warmup=2_000,
    live_objects=300,
    accesses_per_op=20,
    bugs=20,
    writes_per_bug=3.0,
    bug_span=5_000,
    seed=3,
)
P = TrapDebuggerParams(heap_pages=PAGES, seed=3, vcpus=1)
DM = DIRECT_MAP_BASE - (1 << 64)


@pytest.fixture(scope="module")
def program() -> HeapProgram:
    return W.program(HeapGuest(heap_pages=PAGES, seed=3))


def run(
    program: HeapProgram,
    name: str,
    fraction: float = 0.0,
    period: int | None = None,
    mode: str = "write",
    resume: str = "emulate",
    params: TrapDebuggerParams = P,
) -> ConfigRun:
    return run_config(params, program, Config(name, fraction, period, mode, resume))


def trapped_at(debugger: TrapDebugger, position: int) -> frozenset[int]:
    """The sample that was trapped when the access at ``position`` ran."""
    current: frozenset[int] = frozenset()
    for clock, pages in debugger.samples:
        if clock > position:
            break
        current = pages
    return current


def reported(run: ConfigRun) -> dict[int, int]:
    assert run.debugger is not None
    return {a.position: a.gpa for a in run.debugger.reports}


# -- the ground truth ---------------------------------------------------------------------------


def test_bug_writes_and_only_they_hit_memory_nobody_owns(program: HeapProgram) -> None:
    """Replay the allocator's reports at the moment it writes them: every bug write lands in
    memory nobody owns, every other heap write in an owned object or is the allocator linking
    a free chunk."""
    stream = program.layout(notify=True)
    own = Ownership()
    for word in program.boot_events:
        own.apply(word)
    kinds = {"bug": 0, "owned": 0, "link": 0}
    for pos in range(len(stream)):
        gpa = int(stream.gva[pos]) - DM
        if gpa & ~0xFFF == program.ring:
            if gpa != program.ring:  # an event slot (word 0 is the head)
                own.apply(stream.values[pos])
            continue
        if stream.kind[pos] != 1:
            continue
        value = stream.values.get(pos)
        if pos in stream.firings:
            assert not own.owns(gpa)
            kinds["bug"] += 1
        elif own.owns(gpa):
            kinds["owned"] += 1
        else:
            assert own.free_link(gpa, value), pos
            kinds["link"] += 1
    assert kinds["bug"] == len(stream.firings) > W.bugs
    assert kinds["owned"] > kinds["link"] > 0


# -- the extremes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "resume"), [("write", "emulate"), ("write", "mtf"), ("all", "emulate")]
)
def test_trap_all_reports_every_reportable_bug_write(
    program: HeapProgram, mode: str, resume: str
) -> None:
    """Every bug write traps; the debugger reports exactly those the stream-only replay of its
    filter (trap_score.reportable) says it reports, and dismisses the others."""
    r = run(program, "trap-all", 1.0, None, mode, resume)
    s, d = r.score, r.debugger
    assert d is not None and s.bugs_injected == W.bugs and s.bug_writes >= W.bugs
    can = reportable(r.stream, program, allow_null=d.allow_null, ignore_silent=d.ignore_silent)
    assert reported(r) == {p: gpa for p, (_, gpa) in r.stream.firings.items() if p in can}
    firsts = [next((q for q in b if q in can), None) for b in r.stream.bug_positions]
    assert s.bugs_detected == sum(f is not None for f in firsts) > 0
    assert s.bugs_detected + s.bugs_dismissed == s.bugs_injected  # every bug reached the filter
    assert s.time_to_detect == [f - b[0] for f, b in zip(firsts, r.stream.bug_positions,
                                                          strict=True) if f is not None]
    assert s.false_positives == 0
    # the transients are there, and only the filter removes them
    assert s.false_positives_unfiltered > s.false_positives_sync_only > 0
    dismissed_bug_writes = s.bug_writes - len(can)
    allowed = d.counters.metadata_writes + d.counters.silent_writes
    assert allowed == s.false_positives_sync_only + dismissed_bug_writes
    assert r.report.exits[ExitReason.PREEMPTION_TIMER] == 0  # nothing to rotate
    if mode == "all":
        assert d.counters.trapped_reads > 0
    if resume == "mtf":
        assert r.report.exits[ExitReason.MONITOR_TRAP_FLAG] == d.counters.stepped
        assert d.counters.invept == d.counters.stepped + 1  # re-arm after each step + attach


def test_no_trapping_detects_nothing_and_never_exits(program: HeapProgram) -> None:
    none = run(program, "none")
    assert none.debugger is None and none.report.vm_exits == 0
    assert none.score.bugs_detected == 0 and none.score.bugs_injected == W.bugs
    silent = run(program, "sampled", 0.0, 1000)  # reports flow, nothing is trapped
    assert silent.debugger is not None and silent.debugger.sampled == 0
    assert set(silent.report.exits) == {ExitReason.VMCALL}
    assert silent.debugger.reports == silent.debugger.unfiltered == []


# -- sampled runs -------------------------------------------------------------------------------


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**16),
    fraction=st.floats(0.05, 0.6),
    period=st.integers(200, 8_000),
    mode=st.sampled_from(["write", "all"]),
    resume=st.sampled_from(["emulate", "mtf"]),
)
def test_sampled_reports_exactly_the_bug_writes_on_trapped_pages(
    seed: int, fraction: float, period: int, mode: str, resume: str
) -> None:
    workload = HeapWorkload(
        accesses=6_000, warmup=500, live_objects=150, accesses_per_op=15, bugs=12, seed=seed
    )
    params = TrapDebuggerParams(heap_pages=64, seed=seed, vcpus=1)
    prog = workload.program(HeapGuest(heap_pages=64, seed=seed))
    r = run(prog, "sampled", fraction, period, mode, resume, params)
    d = r.debugger
    assert d is not None
    can = reportable(r.stream, prog, allow_null=d.allow_null, ignore_silent=d.ignore_silent)
    expected = {
        p: gpa
        for p, (_, gpa) in r.stream.firings.items()
        if gpa & ~0xFFF in trapped_at(d, p) and p in can
    }
    assert reported(r) == expected  # no invented bug, no trapped bug write missed
    assert r.score.false_positives == 0
    assert r.score.bugs_detected == len({r.stream.firings[p][0] for p in expected})
    assert all(len(pages) == d.sampled for _, pages in d.samples)
    assert len(d.samples) == 1 + len(r.stream) // period - (len(r.stream) % period == 0)


def test_a_revoked_page_still_cached_writable_lets_a_wild_write_through_without_invept(
    program: HeapProgram,
) -> None:
    """Write an owned object on page P (its writable translation is cached), trap P, then write
    garbage into a free chunk on P: with INVEPT the write exits and is reported; without, the
    processor uses the stale translation and the bug goes unseen into memory."""
    own = Ownership()
    for word in program.boot_events:
        own.apply(word)
    page, live, free = next(
        (p, obj, chunk)
        for p, size in own.slab_class.items()
        for obj in range(p, p + 4096, size)
        for chunk in range(p, p + 4096, size)
        if obj in own.live_small and chunk in own.free_chunks
    )
    outcomes = {}
    for invept in (True, False):
        guest = HeapGuest(heap_pages=PAGES, seed=3)
        guest.apply_boot(program)
        debugger = TrapDebugger(guest.vm, guest.pages, guest.ring, fraction=0.0, invept=invept)
        debugger.attach(program.boot_events)
        runner = GuestRunner(guest.vcpu, debugger)
        one = np.array([DM + live + 8], np.int64)
        runner.run(one, np.ones(1, np.int8), values={0: 0x1234})  # cached, writable
        debugger.trap({page})  # the rotation picks P
        wild = np.array([DM + free + 8], np.int64)
        bad = BUG_VALUE | 0x5A5A
        report = runner.run(wild, np.ones(1, np.int8), values={0: bad})
        outcomes[invept] = (report.vm_exits, [a.gpa for a in debugger.reports])
        assert guest.read(free + 8) == bad  # reported or not, the debugger does not stop it
        assert guest.read(live + 8) == 0x1234
    assert outcomes[True] == (1, [free + 8])
    assert outcomes[False] == (0, [])


# -- the filter ------------------------------------------------------------------------------


def test_ownership_map_and_allow_list() -> None:
    page, big = 0x40_0000, 0x50_0000
    own = Ownership()
    for word in (
        encode_event(EVENT_SLAB, page, 256),  # 16 free objects
        encode_event(EVENT_ALLOC, page, 256),
        encode_event(EVENT_ALLOC, page + 256, 256),
        encode_event(EVENT_FREE, page, 256),
        encode_event(EVENT_ALLOC, big, 2 * 4096),  # a large object (its guard page follows)
    ):
        own.apply(word)
    assert not own.owns(page) and own.owns(page + 256) and own.owns(page + 511)
    assert not own.owns(page + 512)  # free since the slab was made
    assert own.owns(big) and own.owns(big + 8191) and not own.owns(big + 8192)
    assert own.free_link(page, 0)  # the end of a free list
    assert not own.free_link(page, 0, allow_null=False)  # unless NULL is not allowed
    assert own.free_link(page, pointer(page + 512))  # a link to a free chunk of its size
    assert not own.free_link(page, BUG_VALUE | 7)  # garbage in a link word: a bug
    assert not own.free_link(page + 8, 0)  # not the link word
    assert not own.free_link(page + 256, 0)  # a live object
    assert not own.free_link(page, pointer(page + 256))  # a pointer to a live object
    own.apply(encode_event(EVENT_FREE, big, 2 * 4096))
    assert not own.owns(big) and own.free_link(big, 0)
    assert not own.free_link(big, pointer(page + 512))  # a free chunk of another size


def test_a_flush_per_event_leaves_only_the_allocator_metadata_alarms(
    program: HeapProgram,
) -> None:
    batched = run(program, "trap-all", 1.0).score
    one_by_one = TrapDebuggerParams(heap_pages=PAGES, seed=3, batch=1, vcpus=1)
    eager = run(program, "trap-all", 1.0, params=one_by_one)
    assert batched.false_positives_unfiltered > batched.false_positives_sync_only
    assert eager.score.false_positives_unfiltered == eager.score.false_positives_sync_only > 0
    assert eager.score.false_positives == batched.false_positives == 0
    assert eager.score.bugs_detected == batched.bugs_detected > W.bugs // 2
    assert eager.report.exits[ExitReason.VMCALL] == program.events > batched.bugs_injected


# -- memory contents ---------------------------------------------------------------------------


def last_values(stream: TrapStream, ring: int) -> dict[int, int]:
    """What each stored-to word should hold: the last value the guest stored there."""
    out = {}
    for position in sorted(stream.values):
        gpa = int(stream.gva[position]) - DM
        if gpa & ~0xFFF != ring:
            out[gpa] = stream.values[position]
    return out


def test_legitimate_writes_complete_with_the_right_contents(program: HeapProgram) -> None:
    runs = [
        run(program, "none"),
        run(program, "trap-all", 1.0, None, "write", "emulate"),
        run(program, "trap-all", 1.0, None, "write", "mtf"),
        run(program, "sampled", 0.3, 700, "all", "emulate"),
    ]
    memories = []
    for r in runs:
        if r.debugger is not None:
            r.debugger.trap(())  # every right back: "---" leaves are not present to the VM
        expected = last_values(r.stream, r.guest.ring)
        memory = {gpa: r.guest.read(gpa) for gpa in expected}
        assert memory == expected
        assert {start: r.guest.read(start) for start in program.live} == program.live
        memories.append(memory)
    assert all(m == memories[0] for m in memories)
    assert len(memories[0]) > 100  # headers, links and bug writes: the test has teeth


def test_bad_arguments_of_the_debugger_and_its_guest() -> None:
    guest = HeapGuest(heap_pages=8)
    with pytest.raises(ConfigError):
        TrapDebugger(guest.vm, guest.pages, guest.ring, fraction=1.5)
    with pytest.raises(ConfigError):
        TrapDebugger(guest.vm, guest.pages, guest.ring, fraction=0.1, mode="read")
    with pytest.raises(ConfigError):
        TrapDebugger(guest.vm, guest.pages, guest.ring, fraction=0.1, resume="pray")
    debugger = TrapDebugger(guest.vm, guest.pages, guest.ring, fraction=0.5)
    debugger.attach()
    with pytest.raises(ConfigError):
        debugger.attach()
    with pytest.raises(ConfigError):
        debugger.trap({guest.ring})
    with pytest.raises(ConfigError):
        HeapWorkload(bugs=-1)
    with pytest.raises(ConfigError):
        HeapWorkload(write_share=2.0)
    with pytest.raises(ConfigError):
        HeapGuest(heap_pages=4)


def test_score_counts_every_alarm_that_is_not_a_bug_write() -> None:
    """An alarm at a bug write's position but another address is a false positive, not lost."""
    from types import SimpleNamespace

    import numpy as np

    from eptlab.apps.trap_debugger import Alarm
    from eptlab.apps.trap_score import score

    stream = TrapStream(
        gva=np.zeros(30, np.int64), kind=np.zeros(30, np.int8), values={}, calls={},
        firings={10: (0, 0x5000), 20: (1, 0x6000)}, bug_positions=[[10], [20]],
        cpu=np.zeros(30, np.int8), bug_ip=[0x111, 0x222],
    )
    alarms = [Alarm(10, 0x5000, None, ip=0x111), Alarm(20, 0x7000, None), Alarm(25, 0x8000, None)]
    fake = SimpleNamespace(reports=alarms, unfiltered=alarms, sync_only=alarms, read_reports=[])
    s = score(stream, fake)  # type: ignore[arg-type]
    assert (s.bugs_detected, s.false_positives, s.time_to_detect) == (1, 2, [0])
    assert (s.bug_reports, s.context_matches, s.report_sites) == (1, 1, 2)
