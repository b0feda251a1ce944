"""Scoring the rotating-trap debugger (:mod:`eptlab.apps.trap_debugger`) against the ground
truth the heap program keeps aside (:mod:`eptlab.apps.heap_program`): detected bugs, false
positives in each view, the filter's false negatives per value class, the alarms' context, and
the read-after-free reports."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..arch.bits import PAGE_SIZE
from ..guest import DIRECT_MAP_BASE
from .heap_guest import U64
from .heap_program import VALUE_CLASSES, HeapProgram, TrapStream
from .trap_debugger import Alarm, Ownership, TrapDebugger


@dataclass
class Score:
    """The debugger's alarms matched with the ground truth (see :func:`score`)."""

    bugs_injected: int
    bug_writes: int
    bugs_detected: int
    bugs_detected_unfiltered: int
    time_to_detect: list[int] = field(default_factory=list)  # accesses, per detected bug
    false_positives: int = 0
    false_positives_sync_only: int = 0
    false_positives_unfiltered: int = 0
    bugs_judged: int = 0  # bugs with a write that trapped and reached the filter
    bugs_dismissed: int = 0  # of which none was reported: the filter's false negatives
    bug_writes_judged: int = 0
    bug_writes_dismissed: int = 0
    bug_reports: int = 0  # reports at bug writes
    context_matches: int = 0  # of which the alarm's ip and vCPU are the bug's
    report_sites: int = 0  # distinct instruction pointers among the reports
    false_positive_sites: int = 0  # distinct instruction pointers among the false positives
    read_bugs_injected: int = 0
    read_bugs_detected: int = 0
    read_false_positives: int = 0

    @property
    def detection_rate(self) -> float:
        return self.bugs_detected / self.bugs_injected if self.bugs_injected else 0.0

    @property
    def mean_time_to_detect(self) -> float | None:
        return float(np.mean(self.time_to_detect)) if self.time_to_detect else None


def _bug_of(firings: dict[int, tuple[int, int]], alarm: Alarm) -> int | None:
    """The bug whose access this alarm is (same position and address), else None."""
    hit = firings.get(alarm.position)
    return hit[0] if hit is not None and hit[1] == alarm.gpa else None


def score(stream: TrapStream, debugger: TrapDebugger | None) -> Score:
    """Match the debugger's alarms with the bug accesses (the ground truth): a bug is detected
    when one of its accesses is reported; an alarm at any other position (or at a bug's
    position with another address, which would be a debugger defect) is a false positive."""
    bugs = len(stream.bug_positions)
    writes = len(stream.firings)
    reads = len(stream.read_positions)
    if debugger is None:
        return Score(bugs, writes, 0, 0, read_bugs_injected=reads)

    def detected(alarms: list[Alarm], firings: dict[int, tuple[int, int]]) -> dict[int, int]:
        first: dict[int, int] = {}
        for a in alarms:
            bug = _bug_of(firings, a)
            if bug is not None:
                first.setdefault(bug, a.position)
        return first

    def false(alarms: list[Alarm], firings: dict[int, tuple[int, int]]) -> list[Alarm]:
        return [a for a in alarms if _bug_of(firings, a) is None]

    found = detected(debugger.reports, stream.firings)
    judged_writes = [a for a in debugger.sync_only if _bug_of(stream.firings, a) is not None]
    judged = {_bug_of(stream.firings, a) for a in judged_writes}
    delays = [found[b] - stream.bug_positions[b][0] for b in sorted(found)]
    at_bugs = [a for a in debugger.reports if _bug_of(stream.firings, a) is not None]
    matches = sum(
        1
        for a in at_bugs
        if a.ip == stream.bug_ip[stream.firings[a.position][0]]
        and a.vcpu == int(stream.cpu[a.position])
    )
    wrong = false(debugger.reports, stream.firings)
    return Score(
        bugs,
        writes,
        len(found),
        len(detected(debugger.unfiltered, stream.firings)),
        delays,
        len(wrong),
        len(false(debugger.sync_only, stream.firings)),
        len(false(debugger.unfiltered, stream.firings)),
        bugs_judged=len(judged),
        bugs_dismissed=len(judged - set(found)),
        bug_writes_judged=len(judged_writes),
        bug_writes_dismissed=len(judged_writes) - len(at_bugs),
        bug_reports=len(at_bugs),
        context_matches=matches,
        report_sites=len({a.ip for a in debugger.reports}),
        false_positive_sites=len({a.ip for a in wrong}),
        read_bugs_injected=reads,
        read_bugs_detected=len(detected(debugger.read_reports, stream.read_firings)),
        read_false_positives=len(false(debugger.read_reports, stream.read_firings)),
    )


@dataclass(frozen=True)
class FilterOutcome:
    """What one filter does to the writes of one value class that reached it (sync done)."""

    value_class: str
    bugs: int  # bugs of this class injected
    bugs_judged: int  # of which at least one write reached the filter
    bugs_dismissed: int  # of which no write was reported: the filter's false negatives
    bug_writes_judged: int
    bug_writes_dismissed: int
    false_positives: int  # benign writes of this value class reported
    false_positive_sites: int  # distinct instruction pointers among them


def filter_outcomes(
    stream: TrapStream, debugger: TrapDebugger, *, allow_null: bool, ignore_silent: bool
) -> list[FilterOutcome]:
    """Per value class (:data:`VALUE_CLASSES`), what a filter with these rules makes of the
    writes this run's debugger judged: bugs by their injected class, benign writes by the class
    the synced map gave their value. The rules only see judged writes, so one run answers for
    every filter."""
    judged: dict[int, int] = {}
    dismissed_writes: dict[int, int] = {}
    reported: set[int] = set()
    benign: dict[str, set[int]] = {cls: set() for cls in VALUE_CLASSES}  # positions
    sites: dict[str, set[int]] = {cls: set() for cls in VALUE_CLASSES}
    for a in debugger.sync_only:
        gone = a.dismissed(allow_null=allow_null, ignore_silent=ignore_silent)
        bug = _bug_of(stream.firings, a)
        if bug is None:
            if not gone:
                benign[a.value_class].add(a.position)
                sites[a.value_class].add(a.ip)
            continue
        judged[bug] = judged.get(bug, 0) + 1
        dismissed_writes[bug] = dismissed_writes.get(bug, 0) + gone
        if not gone:
            reported.add(bug)
    out = []
    for cls in VALUE_CLASSES:
        mine = [b for b, c in enumerate(stream.bug_class) if c == cls]
        seen = [b for b in mine if b in judged]
        out.append(
            FilterOutcome(
                cls,
                len(mine),
                len(seen),
                sum(1 for b in seen if b not in reported),
                sum(judged[b] for b in seen),
                sum(dismissed_writes[b] for b in seen),
                len(benign[cls]),
                len(sites[cls]),
            )
        )
    return out


def reportable(
    stream: TrapStream,
    program: HeapProgram,
    *,
    allow_null: bool,
    ignore_silent: bool,
) -> set[int]:
    """The positions of the bug writes a filter with these rules reports when they trap,
    worked out from the stream alone: the ownership map of the events written before each one
    (what a sync reads from the ring) and the word's content then (the boot stores, then every
    store before it). The sampling theory counts only these writes."""
    own = Ownership()
    for word in program.boot_events:
        own.apply(word)
    memory = dict(program.boot_stores)
    ring = (program.ring + DIRECT_MAP_BASE) & U64
    out: set[int] = set()
    for pos in sorted(stream.values):
        gva = int(stream.gva[pos]) & U64
        value = stream.values[pos]
        if gva & ~(PAGE_SIZE - 1) == ring:
            if gva != ring:  # an event slot (word 0 is the head)
                own.apply(value)
            continue
        gpa = (gva - DIRECT_MAP_BASE) & U64
        if pos in stream.firings:
            judged = Alarm(
                pos, gpa, value, before=memory.get(gpa, 0),
                link=value != 0 and own.free_link(gpa, value),
                null_link=value == 0 and own.free_link(gpa, value),
            )
            if not own.owns(gpa) and not judged.dismissed(
                allow_null=allow_null, ignore_silent=ignore_silent
            ):
                out.add(pos)
        memory[gpa] = value
    return out
