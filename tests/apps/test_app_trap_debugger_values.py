"""The trap-debugger with realistic bug values, alarm context and read-after-free checks: a
NULL use-after-free is a false negative of a filter that allows NULL, a same-value store is a
silent false negative, an alarm names the bug's instruction and vCPU, and mode raf reports a
read of a freed object and not a read of a live one."""

from __future__ import annotations

import numpy as np
import pytest

from eptlab.apps.heap_guest import HeapGuest, program_site
from eptlab.apps.heap_program import HeapProgram, HeapWorkload, parse_mix
from eptlab.apps.trap_debugger import Ownership, TrapDebugger
from eptlab.apps.trap_score import filter_outcomes
from eptlab.errors import ConfigError
from eptlab.experiments.trap_debugger import Config, ConfigRun, TrapDebuggerParams, run_config
from eptlab.guest import DIRECT_MAP_BASE
from eptlab.hv.guest_runner import GuestRunner

PAGES = 64
DM = DIRECT_MAP_BASE - (1 << 64)


def workload(**changes: object) -> HeapWorkload:
    base: dict[str, object] = dict(
        accesses=8_000, warmup=500, live_objects=150, accesses_per_op=15, bugs=16,
        writes_per_bug=3.0, bug_span=3_000, seed=5,
    )
    base.update(changes)
    return HeapWorkload(**base)  # type: ignore[arg-type]


def trap_all(w: HeapWorkload, mode: str = "write", **params: object) -> ConfigRun:
    p = TrapDebuggerParams(heap_pages=PAGES, seed=w.seed, vcpus=w.vcpus, **params)  # type: ignore[arg-type]
    program = w.program(HeapGuest(heap_pages=PAGES, seed=w.seed, vcpus=w.vcpus))
    return run_config(p, program, Config("trap-all", 1.0, None, mode, "emulate"))


def detected_bugs(r: ConfigRun) -> set[int]:
    assert r.debugger is not None
    return {r.stream.firings[a.position][0] for a in r.debugger.reports
            if a.position in r.stream.firings}


def booted(program: HeapProgram, **kw: object) -> tuple[HeapGuest, TrapDebugger, Ownership]:
    guest = HeapGuest(heap_pages=PAGES, seed=program.workload.seed,
                      vcpus=program.workload.vcpus)
    guest.apply_boot(program)
    debugger = TrapDebugger(guest.vm, guest.pages, guest.ring, fraction=0.0, **kw)  # type: ignore[arg-type]
    debugger.attach(program.boot_events)
    own = Ownership()
    for word in program.boot_events:
        own.apply(word)
    return guest, debugger, own


def live_and_free(own: Ownership) -> tuple[int, int, int]:
    """A slab page holding a live object and a free chunk: (page, live, free)."""
    return next(
        (p, obj, chunk)
        for p, size in own.slab_class.items()
        for obj in range(p, p + 4096, size)
        for chunk in range(p, p + 4096, size)
        if obj in own.live_small and chunk in own.free_chunks
    )


def test_null_use_after_free_is_a_false_negative_when_the_filter_allows_null() -> None:
    """Every use-after-free here stores NULL into word 0 of the freed chunk: the allocator's
    end-of-list link to the allow-list. Allowing NULL dismisses them all (false negatives);
    refusing NULL reports them, and the allocator's own NULL links become false positives."""
    w = workload(bug_values=("null",), bug_field0=1.0)
    allowing = trap_all(w, allow_null=True, ignore_silent=False)
    bugs = w.program(HeapGuest(heap_pages=PAGES, seed=5)).bugs
    uaf = {b.index for b in bugs if b.kind == "use-after-free"}
    assert uaf, "the seed must place use-after-free bugs"
    assert not uaf & detected_bugs(allowing)
    d = allowing.debugger
    assert d is not None and allowing.score.false_positives == 0
    null = next(o for o in filter_outcomes(allowing.stream, d, allow_null=True,
                                           ignore_silent=False) if o.value_class == "null")
    assert null.bugs_dismissed >= len(uaf) and allowing.score.bugs_dismissed >= len(uaf)
    refusing = trap_all(w, allow_null=False, ignore_silent=False)
    assert uaf <= detected_bugs(refusing)
    assert refusing.score.false_positives > 0  # the allocator's end-of-list links
    assert refusing.debugger is not None
    wrong = [a for a in refusing.debugger.reports if a.position not in refusing.stream.firings]
    assert {a.value for a in wrong} == {0}  # NULL links (class "same" where the word held 0)


def test_same_value_store_is_a_silent_false_negative() -> None:
    w = workload(bug_values=("same",))
    silent = trap_all(w, ignore_silent=True)
    d = silent.debugger
    assert d is not None
    judged = [a for a in d.sync_only if a.position in silent.stream.firings]
    assert len(judged) == silent.score.bug_writes > 0  # every bug write reached the filter
    assert all(a.value == a.before for a in judged)  # each stores what the word holds
    assert silent.score.bugs_detected == 0
    assert silent.score.bugs_dismissed == silent.score.bugs_injected == w.bugs
    assert d.counters.silent_writes >= len(judged) - d.counters.metadata_writes
    loud = trap_all(w, ignore_silent=False)
    assert loud.score.bugs_detected > 0  # the same writes, reported without the silent rule


def test_alarm_context_is_the_bugs_ip_and_vcpu() -> None:
    w = workload(bug_values=("garbage",), vcpus=2)
    r = trap_all(w)
    d = r.debugger
    assert d is not None and r.score.bugs_detected == w.bugs
    at_bugs = [a for a in d.reports if a.position in r.stream.firings]
    assert len(at_bugs) == r.score.bug_writes == r.score.context_matches
    for a in at_bugs:
        bug = r.stream.firings[a.position][0]
        assert a.ip == r.stream.bug_ip[bug] == int(r.stream.ip[a.position]) & ((1 << 64) - 1)
        assert a.vcpu == int(r.stream.cpu[a.position])
    assert {a.vcpu for a in at_bugs} == {0, 1}
    text = r.guest.text
    sites = {text + program_site(k) for k in range(64)}
    assert {a.ip for a in at_bugs} <= sites and len({a.ip for a in at_bugs}) > 1


def test_run_loop_delivers_an_exit_on_the_accessing_vcpu_with_its_rip() -> None:
    program = workload(vcpus=2).program(HeapGuest(heap_pages=PAGES, seed=5, vcpus=2))
    guest, debugger, own = booted(program)
    page, live, free = live_and_free(own)
    debugger.trap({page})
    gva = np.array([DM + free + 8, DM + free + 16, DM + live, DM + live + 8], np.int64)
    ips = np.array([0x1111, 0x2222, 0x3333, 0x4444], np.int64)
    kinds = np.array([1, 1, 0, 0], np.int8)  # two trapped stores, two reads (not trapped)
    before = [v.stats.cycles for v in guest.vcpus]
    report = GuestRunner(guest.vcpu, debugger, vcpus=guest.vcpus).run(
        gva, kinds, values={0: 5, 1: 6}, cpu=np.array([1, 0, 1, 0]), ip=ips
    )
    assert [(a.gpa, a.ip, a.vcpu) for a in debugger.reports] == [
        (free + 8, 0x1111, 1), (free + 16, 0x2222, 0)
    ]
    spent = [v.stats.cycles - b for v, b in zip(guest.vcpus, before, strict=True)]
    assert min(spent) > 0 and report.engine_cycles == sum(spent)  # both vCPUs' cycles
    with pytest.raises(ConfigError):
        GuestRunner(guest.vcpu, debugger, vcpus=guest.vcpus).run(
            gva, kinds, cpu=np.array([0, 2, 0, 0])
        )


@pytest.mark.parametrize("mode", ["raf", "write", "all"])
def test_read_after_free_mode_reports_a_freed_read_not_a_live_one(mode: str) -> None:
    program = workload().program(HeapGuest(heap_pages=PAGES, seed=5))
    guest, debugger, own = booted(program, mode=mode)
    page, live, free = live_and_free(own)
    debugger.trap({page})
    reads = np.array([DM + live + 8, DM + free + 8, DM + free], np.int64)
    report = GuestRunner(guest.vcpu, debugger).run(reads, np.zeros(3, np.int8))
    if mode == "raf":
        assert [a.gpa for a in debugger.read_reports] == [free + 8]
        assert debugger.counters.link_reads == 1  # word 0: the allocator's own load
    else:
        assert debugger.read_reports == []
    assert report.vm_exits == (0 if mode == "write" else 3)


def test_read_after_free_bugs_found_by_trap_all_raf() -> None:
    w = workload(bugs=4, read_bugs=10, bug_field0=0.3)
    r = trap_all(w, mode="raf")
    program = w.program(HeapGuest(heap_pages=PAGES, seed=5))
    readers = [b for b in program.bugs if b.read]
    off_link = [b for b in readers if any(gpa != b.target for _, gpa, _, _ in b.writes)]
    assert len(readers) == r.score.read_bugs_injected == 10
    assert 0 < len(off_link) < len(readers)  # both kinds, so the count can be wrong
    assert r.score.read_bugs_detected == len(off_link)  # word-0 loads look like the allocator's
    assert r.score.read_false_positives == 0
    write_only = trap_all(w, mode="write")
    assert write_only.score.read_bugs_detected == 0


def test_bug_value_mix() -> None:
    assert parse_mix(("null:1", "same:3")) == {"null": 0.25, "same": 0.75}
    for bad in (("bogus",), ("null:x",), ("null:-1",), ("null:0",), ("null:1", "null:2")):
        with pytest.raises(ConfigError):
            parse_mix(bad)
    w = workload(bug_values=("small:1", "live:1"), bugs=30)
    program = w.program(HeapGuest(heap_pages=PAGES, seed=5))
    classes = {b.value_class for b in program.bugs}
    assert classes == {"small", "live"}
    values = {v for b in program.bugs if b.value_class == "small" for _, _, v, _ in b.writes}
    assert values and all(0 < v < 1024 for v in values)
    live = [v for b in program.bugs if b.value_class == "live" for _, _, v, _ in b.writes]
    assert live and all(v >= DIRECT_MAP_BASE for v in live)  # pointers into the direct map
