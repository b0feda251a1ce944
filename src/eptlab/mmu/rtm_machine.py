"""The RTM machine: transactional instruction streams of several logical processors, run through
the fast engine with the RTM model of :mod:`eptlab.mmu.rtm` around it.

Each *lane* is one logical processor (an engine vCPU) with a :class:`~eptlab.mmu.rtm.TxStream`
and a position in it. :meth:`RtmMachine.run` executes the lanes until something needs software:

* boundary entries (XBEGIN, XEND, XABORT, TEST_ABORT) run one at a time in Python;
* the plain accesses between them run through :meth:`Engine.run` as one interleaved chunk (a
  seeded quantum of each runnable lane, as the hv scheduler does; a lone lane runs up to its
  next boundary). Before the chunk runs, every access's physical line is found by a
  side-effect-free walk (:mod:`eptlab.mmu.peek`), the first conflict or capacity overflow is
  located (vectorized) and the chunk is cut there, so the engine performs exactly the accesses
  that happen before the event -- the engine's own side effects (A/D flags, PML entries, TLB and
  cache fills) are never produced by accesses that would not have run. After the run, the
  engine's recorded HPAs are checked against the walk (a mismatch would mean a stale
  translation, which this model cannot place, and raises).

What :meth:`RtmMachine.run` returns (an *event*):

``ExitEvent``
    The engine stopped at a VM exit. If the lane was in a transaction it is aborted first
    (``abort``), and the exit is still for the hypervisor to handle. Without an abort the lane
    retries the same access after the handling.
``FaultEvent``
    A guest fault outside a transaction: the guest OS handles it (then the access is retried)
    or the caller gives it up with :meth:`RtmMachine.skip`. Inside a transaction a fault is
    suppressed and becomes an ``AbortEvent`` (SDM Vol. 1 §16.3.8.2).
``AbortEvent``
    A transaction aborted without an exit (conflict, capacity, XABORT, nesting, suppressed
    fault, :meth:`interrupt`).
``CommitEvent`` / ``DoneEvent`` / ``DeadlineEvent``
    The outermost XEND committed; a lane reached the end of its stream (outside a
    transaction: a lane whose stream ends inside one stalls there, its transaction open, until
    :meth:`RtmMachine.extend` gives it more); a lane performed the number of accesses set with
    :meth:`set_deadline` (a timer).

After an abort the lane is *parked* at its abort path: it runs nothing until the caller (the
guest's abort handler: retry, fallback) loads a stream. Transactional stores go to the lane's
write buffer (keyed by the HPA of the 8-byte word) and reach memory at commit; non-transactional
stores and ADDs go to memory as they are performed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from ..arch.exits import (
    GENERAL_PROTECTION_VECTOR,
    EptMisconfig,
    EptViolation,
    GuestFault,
    PmlFull,
    VmExit,
)
from ..errors import ConfigError, EptlabError
from .engine import Accesses, Engine
from .peek import Peeker
from .rtm import (
    LINE_SHIFT,
    U64,
    AbortCause,
    Op,
    RtmConfig,
    TxState,
    TxStream,
    abort_status,
    conflicts_with,
    first_capacity_overflow,
)

I64 = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]


@dataclass
class Lane:
    """One logical processor as the machine runs it."""

    index: int
    vcpu: int  # engine vCPU id
    user: bool
    state: TxState
    stream: TxStream | None = None
    pos: int = 0
    executed: int = 0  # accesses performed, transactional or not, committed or not
    deadline: int | None = None  # stop when ``executed`` reaches it
    tx_accesses: int = 0  # accesses performed in the current transaction
    wasted: int = 0  # accesses performed by transactions that aborted
    cycles: int = 0  # engine cycles (translation + data) of the accesses performed
    tx_cycles: int = 0  # of which in the current transaction
    wasted_cycles: int = 0  # of which by transactions that aborted
    reads: list[tuple[int, int]] = field(default_factory=list)  # (stream index, value)
    read_mark: int = 0


@dataclass(frozen=True)
class Abort:
    """An abort as the model saw it. ``status`` is what the guest finds in EAX; ``begin`` is the
    stream index of the outermost XBEGIN, ``at`` the index of the entry that was executing."""

    lane: int
    cause: AbortCause
    status: int
    begin: int
    at: int
    stream: TxStream
    discarded_words: int
    exit: VmExit | None = None
    fault: GuestFault | None = None


@dataclass(frozen=True)
class ExitEvent:
    """A lane took a VM exit (and the abort it caused, when it was inside a transaction)."""
    lane: int
    exit: VmExit
    abort: Abort | None


@dataclass(frozen=True)
class FaultEvent:
    """A lane's access raised a guest fault outside a transaction."""
    lane: int
    fault: GuestFault
    at: int


@dataclass(frozen=True)
class AbortEvent:
    """A transaction aborted (the abort carries its lane, cause and EAX status)."""
    abort: Abort

    @property
    def lane(self) -> int:
        """The lane whose transaction aborted."""
        return self.abort.lane


@dataclass(frozen=True)
class CommitEvent:
    """A transaction committed."""
    lane: int
    begin: int
    end: int
    sequence: int  # global order of commits and completed streams
    reads: tuple[tuple[int, int], ...]  # (stream index, value), when reads are recorded


@dataclass(frozen=True)
class DoneEvent:
    """A lane ran its stream to the end."""
    lane: int
    stream: TxStream
    sequence: int
    reads: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class DeadlineEvent:
    """A lane reached its preemption deadline (the VMX-preemption timer)."""
    lane: int


Event = ExitEvent | FaultEvent | AbortEvent | CommitEvent | DoneEvent | DeadlineEvent


def exit_cause(exit_: VmExit) -> AbortCause:
    """The abort cause a VM exit inside a transaction is reported as."""
    if isinstance(exit_, EptViolation):
        return AbortCause.EPT_VIOLATION
    if isinstance(exit_, EptMisconfig):
        return AbortCause.EPT_MISCONFIG
    if isinstance(exit_, PmlFull):
        return AbortCause.PML_FULL
    raise EptlabError(f"no abort cause for {exit_}")  # pragma: no cover


class RtmMachine:
    """Logical processors with RTM, on top of one :class:`Engine`."""

    def __init__(
        self,
        engine: Engine,
        config: RtmConfig | None = None,
        *,
        seed: int = 0,
        quantum: tuple[int, int] = (8, 64),
        record_reads: bool = False,
    ) -> None:
        if quantum[0] < 1 or quantum[1] < quantum[0]:
            raise ConfigError("quantum", f"{quantum} is not a range of positive lengths")
        l1 = engine.config.cache.l1
        self.engine = engine
        self.config = config or (RtmConfig.from_l1(l1) if l1.sets else RtmConfig())
        self.rng = np.random.default_rng(seed)
        self.quantum = quantum
        self.record_reads = record_reads
        self.lanes: list[Lane] = []
        self.sequence = 0
        self.chunks = 0
        self._pending: deque[Event] = deque()
        self._pages: dict[int, int] = {}  # (GVA page << 6 | vcpu) -> HPA page (-1: unmapped)
        self._peeker = Peeker(engine.memory, engine.features.maxphyaddr)

    # -- lanes --------------------------------------------------------------------------------

    def add_lane(self, vcpu: int, *, user: bool = False) -> Lane:
        """Add a lane (a hardware thread) running on engine vCPU ``vcpu``."""
        if vcpu >= 64:
            raise ConfigError("vcpu", "the RTM machine handles engine vCPU ids 0..63")
        lane = Lane(len(self.lanes), vcpu, user, TxState(self.config))
        self.lanes.append(lane)
        return lane

    def load(self, lane: int, stream: TxStream, pos: int = 0) -> None:
        """What the lane executes next (its abort path, a retry, a fallback, the next job)."""
        target = self.lanes[lane]
        if target.state.active:
            raise EptlabError(f"lane {lane} is inside a transaction; it cannot jump elsewhere")
        if not 0 <= pos <= len(stream):
            raise ConfigError("pos", f"{pos} is outside the stream")
        target.stream, target.pos = stream, pos
        target.reads.clear()

    def extend(self, lane: int, stream: TxStream) -> None:
        """Append to what the lane runs (allowed inside a transaction: a lane whose stream
        ends inside one stalls there, holding its transaction open, until extended)."""
        target = self.lanes[lane]
        if target.stream is None:
            raise EptlabError(f"lane {lane} is parked; load a stream first")
        target.stream = TxStream.concat([target.stream, stream])

    def park(self, lane: int) -> None:
        """Stop the lane (it runs nothing until the next :meth:`load`)."""
        target = self.lanes[lane]
        if target.state.active:
            raise EptlabError(f"lane {lane} is inside a transaction")
        target.stream = None

    def skip(self, lane: int) -> None:
        """Give up the access the lane faulted on (the guest could not resolve the fault)."""
        self.lanes[lane].pos += 1

    def set_deadline(self, lane: int, accesses: int | None) -> None:
        """Stop the lane with a :class:`DeadlineEvent` once it has performed ``accesses``
        accesses in total (a timer, counted in accesses); None cancels."""
        self.lanes[lane].deadline = accesses

    def interrupt(self, lane: int, cause: AbortCause) -> Abort | None:
        """Something outside the engine (a timer or an IPI VM exit) hit the lane: a transaction
        in progress aborts (the caller handles the exit itself). Returns the abort, if any."""
        target = self.lanes[lane]
        if not target.state.active:
            return None
        return self._abort(target, cause)

    def forget_translations(self) -> None:
        """Drop the cached walks (the machine does it itself after every exit and fault it
        returns; call it after changing mappings at any other time)."""
        self._pages.clear()
        self._peeker.forget()

    # -- running ------------------------------------------------------------------------------

    def run(self) -> Event | None:
        """Run the lanes until the next event (see the module docstring); None once no lane
        has anything left to run."""
        while True:
            if self._pending:
                return self._pending.popleft()
            for lane in self.lanes:
                event = self._settle(lane)
                if event is not None:
                    return event
            parts = self._quanta()
            if not parts:
                return None
            event = self._execute(parts)
            if event is not None:
                return event

    def _settle(self, lane: Lane) -> Event | None:
        """Deadlines, stream ends and boundary entries of one lane, up to its next access."""
        while lane.stream is not None:
            if lane.deadline is not None and lane.executed >= lane.deadline:
                lane.deadline = None
                return DeadlineEvent(lane.index)
            stream = lane.stream
            if lane.pos >= len(stream):
                if lane.state.active:
                    return None  # stalled inside its transaction until :meth:`extend`
                lane.stream = None
                self.sequence += 1
                return DoneEvent(lane.index, stream, self.sequence, tuple(lane.reads))
            op = int(stream.op[lane.pos])
            if op <= Op.ADD:
                return None
            event = self._boundary(lane, stream, op)
            if event is not None:
                return event
        return None

    def _boundary(self, lane: Lane, stream: TxStream, op: int) -> Event | None:
        state = lane.state
        if op == Op.XBEGIN:  # SDM Vol. 2 XBEGIN
            if not state.active:
                state.start(lane.pos)
                lane.tx_accesses = 0
                lane.tx_cycles = 0
                lane.read_mark = len(lane.reads)
            elif state.depth >= self.config.max_nesting:
                return AbortEvent(self._abort(lane, AbortCause.NESTING))
            else:
                state.depth += 1
            lane.pos += 1
            return None
        if op == Op.XEND:  # SDM Vol. 2 XEND
            if not state.active:
                return FaultEvent(lane.index, GuestFault(GENERAL_PROTECTION_VECTOR, 0, 0), lane.pos)
            if state.depth > 1:
                state.depth -= 1
                lane.pos += 1
                return None
            memory = self.engine.memory
            for word, value in state.buffer.items():
                memory.write_u64(word, value)
            begin = state.begin
            reads = tuple(lane.reads[lane.read_mark :])
            state.reset()
            lane.pos += 1
            self.sequence += 1
            return CommitEvent(lane.index, begin, lane.pos - 1, self.sequence, reads)
        if op == Op.XABORT:  # SDM Vol. 2 XABORT: a NOP outside a transaction
            if not state.active:
                lane.pos += 1
                return None
            imm8 = int(stream.value[lane.pos]) & 0xFF
            return AbortEvent(self._abort(lane, AbortCause.XABORT, imm8=imm8))
        # TEST_ABORT: a load on its own, then maybe an XABORT (see _execute)
        return self._execute([(lane, lane.pos, lane.pos + 1)])

    def _abort(
        self,
        lane: Lane,
        cause: AbortCause,
        *,
        imm8: int = 0,
        exit_: VmExit | None = None,
        fault: GuestFault | None = None,
    ) -> Abort:
        """Abort processing (SDM Vol. 2 XABORT): discard the stores, set EAX, go to the abort
        path (the lane is parked until its handler loads something)."""
        state = lane.state
        assert lane.stream is not None
        abort = Abort(
            lane.index,
            cause,
            abort_status(cause, state.depth, imm8),
            state.begin,
            lane.pos,
            lane.stream,
            len(state.buffer),
            exit_,
            fault,
        )
        lane.wasted += lane.tx_accesses
        lane.tx_accesses = 0
        lane.wasted_cycles += lane.tx_cycles
        lane.tx_cycles = 0
        del lane.reads[lane.read_mark :]
        state.reset()
        lane.stream = None
        return abort

    def _quanta(self) -> list[tuple[Lane, int, int]]:
        runnable = [
            lane
            for lane in self.lanes
            if lane.stream is not None and lane.pos < len(lane.stream)
        ]
        parts = []
        alone = len(runnable) == 1
        order = runnable if alone else [runnable[i] for i in self.rng.permutation(len(runnable))]
        for lane in order:
            assert lane.stream is not None
            stop = int(lane.stream.next_boundary[lane.pos])
            if not alone:
                q = int(self.rng.integers(self.quantum[0], self.quantum[1] + 1))
                stop = min(stop, lane.pos + q)
            if lane.deadline is not None:
                stop = min(stop, lane.pos + max(0, lane.deadline - lane.executed))
            if stop > lane.pos:
                parts.append((lane, lane.pos, stop))
        return parts

    # -- one interleaved chunk ----------------------------------------------------------------

    def _lines(self, vcpus: npt.NDArray[np.int32], gva: I64) -> I64:
        """Physical line of each access by a side-effect-free walk (-1: not mapped now)."""
        keys = ((gva >> 12) << 6) | vcpus.astype(np.int64)
        uniq, inverse = np.unique(keys, return_inverse=True)
        pages = np.empty(len(uniq), np.int64)
        for i, key in enumerate(uniq.tolist()):
            page = self._pages.get(key)
            if page is None:
                guest, vmcs = self.engine.vcpu_state(key & 63)
                hpa = self._peeker.hpa(guest, vmcs, (key >> 6) << 12)
                page = -1 if hpa is None else hpa >> 12
                self._pages[key] = page
            pages[i] = page
        hpa_pages = pages[inverse.ravel()]
        lines = (hpa_pages << 6) | ((gva >> LINE_SHIFT) & 63)
        return np.where(hpa_pages >= 0, lines, -1)

    def _execute(self, parts: list[tuple[Lane, int, int]]) -> Event | None:
        self.chunks += 1
        streams: list[tuple[Lane, TxStream, int, int]] = []
        for lane, a, b in parts:
            assert lane.stream is not None
            streams.append((lane, lane.stream, a, b))
        ops = np.concatenate([s.op[a:b] for _, s, a, b in streams])
        gva = np.concatenate([s.gva[a:b] for _, s, a, b in streams])
        values = np.concatenate([s.value[a:b] for _, s, a, b in streams])
        owner = np.concatenate([np.full(b - a, lane.index, np.int32) for lane, _, a, b in streams])
        n = len(ops)
        vcpus = np.array([lane.vcpu for lane in self.lanes], np.int32)[owner]
        user = np.array([int(lane.user) for lane in self.lanes], np.int8)[owner]
        is_write = (ops == Op.WRITE) | (ops == Op.ADD)
        is_read = (ops == Op.READ) | (ops == Op.ADD) | (ops == Op.TEST_ABORT)
        kind = np.where(is_write, 1, np.where(ops == Op.FETCH, 2, 0)).astype(np.int8)

        # where the first conflict or capacity overflow happens, if any (before the run)
        lines: I64 | None = None
        limit, overflow, victims = n, None, []
        active = [lane for lane in self.lanes if lane.state.active]
        if active:
            lines = self._lines(vcpus, gva)
            unknown = np.flatnonzero(lines < 0)
            horizon = int(unknown[0]) if len(unknown) else n  # the engine stops there
            hl, ho = lines[:horizon], owner[:horizon]
            hr, hw = is_read[:horizon], is_write[:horizon]
            capacity_at, conflict_at = horizon, horizon
            for lane in active:
                mine = np.flatnonzero(ho == lane.index)
                k = first_capacity_overflow(lane.state, hl[mine], hr[mine], hw[mine])
                if k < len(mine) and int(mine[k]) < capacity_at:
                    capacity_at, overflow = int(mine[k]), lane
                hits = np.flatnonzero(conflicts_with(lane.state, lane.index, ho, hl, hr, hw))
                if len(hits) and int(hits[0]) < conflict_at:
                    conflict_at, victims = int(hits[0]), [lane]
                elif len(hits) and int(hits[0]) == conflict_at:
                    victims.append(lane)
            if overflow is not None and capacity_at <= conflict_at:
                limit, victims = capacity_at, []  # the overflowing access is not performed
            elif victims:
                limit, overflow = conflict_at, None  # the requester's access will run next
            else:  # an unmapped access stops the engine: run up to it, and it
                limit = min(n, horizon + 1)

        involved = {lane.index: lane for lane, _, _, _ in streams}
        before = {i: self.engine.stats(lane.vcpu).cycles for i, lane in involved.items()}
        result = self.engine.run(
            Accesses(gva[:limit], kind[:limit], user[:limit], vcpus[:limit]), record_hpa=True
        )
        for i, lane in involved.items():  # a lane's part of a chunk is all in or all out of tx
            spent = self.engine.stats(lane.vcpu).cycles - before[i]
            lane.cycles += spent
            if lane.state.active:
                lane.tx_cycles += spent
        done = result.stopped_at
        assert result.hpa is not None
        hpa = result.hpa[:done]
        performed = hpa >> LINE_SHIFT
        if lines is not None and not np.array_equal(performed, lines[:done]):
            bad = int(np.flatnonzero(performed != lines[:done])[0])
            raise EptlabError(
                f"access {bad} used HPA {int(hpa[bad]):#x}, but the tables map another frame: "
                "a stale translation (the RTM model needs every remap invalidated)"
            )
        loaded = self._apply(
            streams, ops[:done], values[:done], owner[:done], performed, hpa,
            is_read[:done], is_write[:done],
        )

        if done < limit:  # the engine stopped at an exit or a guest fault
            lane = self.lanes[int(owner[done])]
            self.forget_translations()
            if result.exit is not None:
                abort = None
                if lane.state.active:
                    abort = self._abort(lane, exit_cause(result.exit), exit_=result.exit)
                return ExitEvent(lane.index, result.exit, abort)
            assert result.fault is not None
            if lane.state.active:  # suppressed (SDM Vol. 1 §16.3.8.2)
                return AbortEvent(self._abort(lane, AbortCause.GUEST_FAULT, fault=result.fault))
            return FaultEvent(lane.index, result.fault, lane.pos)
        if overflow is not None:
            return AbortEvent(self._abort(overflow, AbortCause.CAPACITY))
        for victim in victims:  # requester wins
            self._pending.append(AbortEvent(self._abort(victim, AbortCause.CONFLICT)))
        if self._pending:
            return self._pending.popleft()
        if n == 1 and ops[0] == Op.TEST_ABORT and done == 1 and loaded:
            lane, stream, at, _ = streams[0]
            if lane.state.active:  # the idiom's XABORT
                lane.pos = at
                imm8 = int(stream.value[at]) & 0xFF
                return AbortEvent(self._abort(lane, AbortCause.XABORT, imm8=imm8))
        return None

    def _apply(
        self,
        streams: list[tuple[Lane, TxStream, int, int]],
        ops: npt.NDArray[np.int8],
        values: I64,
        owner: npt.NDArray[np.int32],
        lines: I64,
        hpa: I64,
        is_read: Bools,
        is_write: Bools,
    ) -> int:
        """Account for the performed accesses: positions, the sets of transactional lanes, and
        memory values in order (transactional stores into the lane's buffer). Returns the word
        the last TEST_ABORT loaded (0 if none)."""
        counts = np.bincount(owner, minlength=len(self.lanes))
        chunk_start: dict[int, tuple[int, int]] = {}  # lane -> (chunk index, stream index)
        offset = 0
        for lane, _, a, b in streams:
            chunk_start[lane.index] = (offset, a)
            offset += b - a
            count = int(counts[lane.index])
            if not count:
                continue
            lane.pos += count
            lane.executed += count
            if lane.state.active:
                lane.tx_accesses += count
                mine = owner == lane.index
                lane.state.track(lines[mine & is_read], lines[mine & is_write])
        wanted = is_write | (ops == Op.TEST_ABORT)
        if self.record_reads:
            wanted |= ops == Op.READ
        memory = self.engine.memory
        loaded = 0
        for i in np.flatnonzero(wanted).tolist():
            lane = self.lanes[int(owner[i])]
            op = int(ops[i])
            word = int(hpa[i]) & ~7
            buffer = lane.state.buffer if lane.state.active else None
            if op == Op.WRITE:
                new = int(values[i]) & U64
            else:
                current = buffer.get(word) if buffer is not None else None
                if current is None:
                    current = memory.read_u64(word)
                if op != Op.ADD:  # a load
                    first, a = chunk_start[lane.index]
                    if self.record_reads:
                        lane.reads.append((a + i - first, current))
                    loaded = current
                    continue
                new = (current + int(values[i])) & U64
            if buffer is not None:
                buffer[word] = new
            else:
                memory.write_u64(word, new)
        return loaded
