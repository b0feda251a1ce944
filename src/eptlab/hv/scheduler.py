"""A deterministic, seedable scheduler that interleaves the access streams of several vCPUs.

Each vCPU runs for a quantum (a seeded random number of accesses between ``quantum[0]`` and
``quantum[1]``), then another one does; ``preempt_at={vcpu_index: {k, ...}}`` forces a switch
right before a vCPU's k-th access (counted from the start of its program), which lets tests
place a remap exactly between two accesses of another vCPU. Hypercalls and guest actions are
ordering points: the interleaved chunk stops before them.

The interleaved accesses run through the engine as one chunk with a vCPU id per access, so an
exit on any vCPU stops the chunk there; the hypervisor handles it, and the next :meth:`run`
takes the handler's :class:`~eptlab.hv.exits.ExitAction`: RETRY runs the same access again, SKIP
goes past it, STOP ends the run (a hypercall is complete once handled: SKIP or STOP). Single
stepping is the single-vCPU loop's (:mod:`eptlab.hv.guest_runner`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..errors import EptlabError
from ..mmu.engine import Accesses, Engine
from .exits import Exit, ExitAction, Vmcall
from .program import GuestAction, Hypercall, Run, Segment

if TYPE_CHECKING:
    from .vcpu import VCPU

CHUNK = 1 << 16


@dataclass
class _Lane:
    """One vCPU's position in its program."""

    vcpu: VCPU
    run: Run | None = None
    pos: int = 0
    done: int = 0  # accesses of this vCPU issued so far
    event: Segment | None = None  # a hypercall or action waiting to happen
    finished: bool = False
    preempt: list[int] = field(default_factory=list)

    def refill(self) -> None:
        while self.run is None and self.event is None and not self.finished:
            segment = next(self.vcpu.program, None)
            if segment is None:
                self.finished = True
            elif isinstance(segment, Run):
                if len(segment.chunk):
                    self.run, self.pos = segment, 0
            else:
                self.event = segment

    @property
    def runnable(self) -> bool:
        self.refill()
        return self.run is not None


class Scheduler:
    """Runs several vCPUs interleaved, deterministically for a seed: each runs a quantum of accesses
    (or up to a preemption point) before the next; returns each VM exit to the caller."""
    def __init__(
        self,
        engine: Engine,
        vcpus: Sequence[VCPU],
        *,
        seed: int = 0,
        quantum: tuple[int, int] = (256, 1024),
        preempt_at: dict[int, set[int]] | None = None,
    ) -> None:
        if not vcpus:
            raise ValueError("nothing to schedule")
        self.engine = engine
        self.lanes = [
            _Lane(v, preempt=sorted((preempt_at or {}).get(i, ()))) for i, v in enumerate(vcpus)
        ]
        self.rng = np.random.default_rng(seed)
        self.quantum = quantum
        self._chunk: Accesses | None = None
        self._owner: np.ndarray = np.zeros(0, np.int32)  # lane of each access in the chunk
        self._pos = 0
        self._pending: Exit | None = None  # the exit returned last, waiting for its action
        self.switches = 0
        self.order: list[int] = []  # lane of every access issued, for tests and traces

    # -- building interleaved chunks --------------------------------------------------------------

    def _slice(self, lane_index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        lane = self.lanes[lane_index]
        if not lane.runnable:
            return None
        assert lane.run is not None
        chunk = lane.run.chunk
        q = int(self.rng.integers(self.quantum[0], self.quantum[1] + 1))
        take = min(q, len(chunk) - lane.pos)
        while lane.preempt and lane.preempt[0] <= lane.done:
            lane.preempt.pop(0)
        if lane.preempt and lane.preempt[0] < lane.done + take:
            take = lane.preempt.pop(0) - lane.done
        sl = slice(lane.pos, lane.pos + take)
        user = np.full(take, 1 if lane.run.user else 0, np.int8)
        lane.pos += take
        lane.done += take
        if lane.pos >= len(chunk):
            lane.run = None
        return chunk.address[sl], chunk.kind[sl], user

    def _build(self) -> bool:
        """Interleave quanta of the runnable lanes into the next chunk; False if none."""
        gva, kind, user, owner = [], [], [], []
        total = 0
        while total < CHUNK:
            runnable = [i for i, lane in enumerate(self.lanes) if lane.runnable]
            if not runnable:
                break
            for i in self.rng.permutation(runnable).tolist():
                piece = self._slice(i)
                if piece is None:
                    continue
                gva.append(piece[0])
                kind.append(piece[1])
                user.append(piece[2])
                owner.append(np.full(len(piece[0]), i, np.int32))
                total += len(piece[0])
                self.switches += 1
            if any(lane.event is not None for lane in self.lanes):
                break  # ordering point: let the events happen before going on
        if not total:
            return False
        owners = np.concatenate(owner)
        engine_ids = np.array([lane.vcpu.engine_id for lane in self.lanes], np.int32)[owners]
        self._chunk = Accesses.build(
            np.concatenate(gva), np.concatenate(kind), np.concatenate(user), engine_ids
        )
        self._owner, self._pos = owners, 0
        self.order.extend(owners.tolist())
        return True

    # -- running --------------------------------------------------------------------------------

    def run(self, action: ExitAction | None = None) -> Exit | None:
        """Run until a VM exit (returned) or until every vCPU's program is done (None).
        ``action`` answers the exit the previous call returned (its handler's decision): it is
        required then, and must be None otherwise. STOP returns None at once."""
        pending = self._pending
        if (pending is None) != (action is None):
            raise EptlabError(
                f"answer each exit, and only an exit: got {action} for {pending or 'no exit'}"
            )
        self._pending = None
        if pending is not None and action is not None and self._resume(pending, action):
            return None
        while True:
            if self._chunk is not None and self._pos < len(self._chunk):
                lane_exit = self._run_chunk()
                if lane_exit is not None:
                    return lane_exit
                continue
            self._chunk = None
            for lane in self.lanes:  # events that are due, in lane order
                lane.refill()
                if lane.event is not None and lane.run is None:
                    event, lane.event = lane.event, None
                    if isinstance(event, Hypercall):
                        self._pending = Exit(lane.vcpu, Vmcall(event.number, event.args))
                        return self._pending
                    if isinstance(event, GuestAction):
                        event.action(lane.vcpu)
            if not self._build() and all(lane.finished for lane in self.lanes):
                return None

    def _resume(self, exit_: Exit, action: ExitAction) -> bool:
        """Carry out ``action`` for ``exit_``; True when the run stops."""
        if action is ExitAction.STOP:
            return True
        if isinstance(exit_.record, Vmcall):
            if action is not ExitAction.SKIP:
                raise EptlabError(f"{exit_}: a handled hypercall is complete (SKIP or STOP), "
                                  f"not {action.name}")
            return False
        if action is ExitAction.STEP:
            raise EptlabError(f"{exit_}: the scheduler does not single-step (STEP is "
                              "eptlab.hv.guest_runner's)")
        if action is ExitAction.SKIP:
            self._pos += 1  # completed in software or suppressed: go past it
        return False

    def _run_chunk(self) -> Exit | None:
        assert self._chunk is not None
        result = self.engine.run(self._chunk, self._pos)
        self._pos = result.stopped_at
        if result.done:
            return None
        lane = self.lanes[int(self._owner[self._pos])]
        if result.fault is not None:
            guest_os = lane.vcpu.guest_os
            if guest_os is None or not guest_os.handle_fault(lane.vcpu, result.fault):
                lane.vcpu.unresolved_faults.append(result.fault)
                self._pos += 1  # give the access up
            return None
        assert result.exit is not None
        self._pending = Exit(lane.vcpu, result.exit)
        return self._pending
