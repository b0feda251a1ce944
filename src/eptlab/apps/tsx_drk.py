"""The DrK probe (Jang, Lee, Kim, "Breaking Kernel Address Space Layout Randomization with
Intel TSX", CCS 2016) turned on the hypervisor: a guest times a transaction that touches one
of its own pages and infers the page's EPT state from how long the abort path takes to run.

The model's rule (:mod:`eptlab.mmu.rtm`): a VM exit inside a transaction aborts it, and the
hypervisor handles the exit before the guest resumes at its abort path. The guest's clock (the
TSC) keeps running across the exit, so a probe that exits takes the exit's round trip and its
handling longer. What a probe's time is made of, every term from the cost profile:

* ``rtm_abort_cycles`` (XBEGIN and the abort: every probe ends with XABORT, so none commits);
* the engine's cycles of the access when it completes (TLB lookup, the walk on a miss -- the
  probed page is not in the TLB: the guest never touched it -- and the data access);
* when it exits instead: the references of the walk that found the EPT entry missing or
  read-only (priced by where each reference was served: L1, L2, LLC, DRAM latencies),
  ``vmexit_cycles``, and the handler's work (backing: ``frame_alloc_cycles``, zeroing the
  page at ``copy_bytes_per_cycle``, ``ept_edit_cycles``; un-protecting: ``ept_edit_cycles``).

States probed (``state``): ``backing`` (lazy backing, a ``share`` of the region backed: a read
probe exits on an unbacked page), ``dirty-wp`` (dirty logging by write protection after the
guest wrote a ``share`` of the pages: a write probe exits on a page still protected, i.e. not
written since the round), ``dirty-pml`` (the same with PML: no page is protected, nothing
exits, so the clean/dirty state the hypervisor keeps is invisible to the probe). The truth
scored against is the hypervisor's: unbacked pages, or pages clean since the round. The
observer is never given it: it calibrates on a second probe of every page
(after the first, no page exits again: the first probe's exit backed or un-protected it) and
calls a first probe slow when it exceeds the slowest second probe by more than the second
probes' range. The probes change what they observe: every exit backs a page or marks it dirty
(``changed``), which the hypervisor's dirty log then reports although the guest's transactional
store was discarded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..apps.scenario import populate
from ..arch.bits import PAGE_SIZE
from ..costs import active_profile
from ..errors import ConfigError, EptlabError
from ..guest import GuestKernel, KernelImage
from ..hv import VCPU, Exit, ExitAction, Hypervisor
from ..hv.costs import hv_costs
from ..hv.dirty_log import PmlLog, WriteProtectLog
from ..mmu.engine import InveptType
from ..mmu.rtm import Op, TxStream
from ..mmu.rtm_machine import AbortEvent, ExitEvent, FaultEvent, RtmMachine

STATES = ("backing", "dirty-wp", "dirty-pml")


@dataclass(frozen=True)
class DrkSetup:
    """One probe run: the hypervisor's ``state``, ``pages`` probed, the ``share`` of them
    backed (``backing``) or written since the last dirty-logging round (``dirty-*``)."""

    state: str = "backing"
    pages: int = 256
    share: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ConfigError("state", f"{self.state!r} is not one of {', '.join(STATES)}")
        if not 2 <= self.pages <= 4096:
            raise ConfigError("pages", "must be 2..4096")
        if not 0.0 <= self.share <= 1.0:
            raise ConfigError("share", "must be in [0, 1]")


@dataclass(frozen=True)
class DrkResult:
    """First and second probe times per page (cycles), the truth (True: the page is unbacked,
    or clean since the last dirty-logging round -- write-protected under ``dirty-wp``, only a
    clear dirty flag under ``dirty-pml``), the observer's guesses and how many pages the probes
    changed."""

    setup: DrkSetup
    first: npt.NDArray[np.float64]
    second: npt.NDArray[np.float64]
    truth: npt.NDArray[np.bool_]
    guess: npt.NDArray[np.bool_]
    threshold: float
    changed: int
    logged_dirty: int  # pages the dirty log reports after the probes (dirty-* states)

    def score(self) -> dict[str, float]:
        """Accuracy, precision and recall of the guesses against the truth (precision is NaN
        when the observer called no page slow)."""
        t, g = self.truth, self.guess
        tp = int(np.sum(t & g))
        return {
            "accuracy": float(np.mean(t == g)),
            "precision": tp / int(np.sum(g)) if np.any(g) else float("nan"),  # no guess
            "recall": tp / int(np.sum(t)) if np.any(t) else 0.0,
        }


def observe(first: npt.NDArray[np.float64], second: npt.NDArray[np.float64]) -> tuple[
    npt.NDArray[np.bool_], float
]:
    """The observer's rule, from the times alone: slow means above the slowest second probe
    by more than the second probes' range (at least one cycle)."""
    spread = max(float(second.max() - second.min()), 1.0)
    threshold = float(second.max()) + spread
    return first > threshold, threshold


class _Prober:
    """Times transactions of one guest vCPU, handling the exits they take."""

    def __init__(self, hv: Hypervisor, vcpu: VCPU) -> None:
        self.hv, self.vcpu = hv, vcpu
        self.machine = RtmMachine(hv.engine, seed=0)
        self.machine.add_lane(vcpu.engine_id, user=True)
        self.costs = hv_costs()
        self.abort = active_profile().cycles("rtm_abort_cycles")
        cache = hv.engine.config.cache
        self.latency = np.array(
            [cache.l1.latency, cache.l2.latency, cache.llc.latency, cache.dram_latency], float
        )

    def run(self, gva: int, op: Op) -> tuple[float, bool]:
        """Time ``XBEGIN; op [gva]; XABORT``; returns (cycles, whether it exited)."""
        lane = self.machine.lanes[0]
        engine, vm = self.hv.engine, self.vcpu.vm
        cycles_before = lane.cycles
        walk_before = np.array(engine.stats(self.vcpu.engine_id).walk_refs_served, float)
        backed_before = vm.counters["pages_backed"]
        stream = TxStream.of([(Op.XBEGIN,), (op, gva, 0), (Op.XABORT, 0, 1)])
        self.machine.load(0, stream)
        exited = False
        while (event := self.machine.run()) is not None:
            if isinstance(event, ExitEvent):
                exited = True
                self.hv.handle(Exit(self.vcpu, event.exit), expect=ExitAction.RETRY)
            elif isinstance(event, FaultEvent):  # pragma: no cover - the guest mapped it
                raise EptlabError(f"the probe of {gva:#x} faulted in the guest")
            elif isinstance(event, AbortEvent):
                break
        t = float(self.abort + lane.cycles - cycles_before)
        if exited:
            walk = np.array(engine.stats(self.vcpu.engine_id).walk_refs_served, float)
            t += float((walk - walk_before) @ self.latency) + self.costs.vmexit
            t += self.costs.ept_edit
            if vm.counters["pages_backed"] > backed_before:
                t += self.costs.frame_alloc + self.costs.copy_cycles(PAGE_SIZE)
        return t, exited


def probe(s: DrkSetup) -> DrkResult:
    """Build the VM in state ``s.state``, probe every page twice, score the observer."""
    hv = Hypervisor(seed=s.seed)
    rng = np.random.default_rng([s.seed, 0xD12C])
    length = s.pages * PAGE_SIZE
    memory = hv.layout.guest_memory((32 << 20) + 2 * (-(-length // (2 << 20))) * (2 << 20))
    vm = hv.create_vm("guest", memory, pml=s.state == "dirty-pml")
    kernel = GuestKernel(vm, seed=s.seed, image=KernelImage(code=2 << 20, rodata=2 << 20,
                                                            data=2 << 20))
    process = kernel.spawn("app")
    vcpu = vm.add_vcpu(cr3=process.cr3)
    kernel.switch_to(vcpu, process)
    buffer = populate(kernel, process, length)
    chosen = rng.random(s.pages) < s.share  # backed, or written since the round
    gpas = buffer.gpa + PAGE_SIZE * np.arange(s.pages)
    prober = _Prober(hv, vcpu)
    log: WriteProtectLog | PmlLog | None = None
    if s.state == "backing":
        for gpa in gpas[chosen].tolist():
            vm.back(int(gpa))
        truth, op = ~chosen, Op.READ
    else:
        vm.ept.map_range(buffer.gpa, length)
        log = WriteProtectLog(vm) if s.state == "dirty-wp" else PmlLog(vm)
        log.start(buffer.gpa, length)
        for k in np.flatnonzero(chosen).tolist():  # the guest's own writes, not transactional
            prober.machine.load(0, TxStream.of([(Op.WRITE, buffer.gva + k * PAGE_SIZE, 1)]))
            while (event := prober.machine.run()) is not None:
                if isinstance(event, ExitEvent):
                    hv.handle(Exit(vcpu, event.exit), expect=ExitAction.RETRY)
        truth, op = ~chosen, Op.WRITE  # clean since the round: what dirty logging knows
        if isinstance(log, WriteProtectLog):
            log.dirty.clear()  # what the guest wrote is known; count what the probes add
        else:
            for v in vm.vcpus:
                vm.drain_pml(v)
            vm.dirty_log.clear()
    order = rng.permutation(s.pages)
    first = np.zeros(s.pages)
    second = np.zeros(s.pages)
    changed = 0
    hv.engine.invept(InveptType.ALL_CONTEXT)  # cold TLBs: every probe walks
    for k in order.tolist():
        t, exited = prober.run(buffer.gva + k * PAGE_SIZE, op)
        first[k], changed = t, changed + int(exited)
    hv.engine.invept(InveptType.ALL_CONTEXT)  # the observer evicts its TLB between passes
    for k in order.tolist():
        second[k] = prober.run(buffer.gva + k * PAGE_SIZE, op)[0]
    logged = len(log.collect()) if log is not None else 0
    guess, threshold = observe(first, second)
    return DrkResult(s, first, second, truth, guess, threshold, changed, logged)


__all__ = ["STATES", "DrkResult", "DrkSetup", "observe", "probe"]
