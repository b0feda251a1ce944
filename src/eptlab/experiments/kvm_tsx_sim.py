"""The simulator's side of the TSX cross-check: a :class:`~eptlab.kvm.txplan.TxPlan` run through
the RTM model (:class:`~eptlab.mmu.rtm_machine.RtmMachine` on eptlab's hypervisor), with the
guest program of ``guests/tsx.S``: warm-up stores outside any transaction, then every
transaction with up to ``max_retries`` retries and a fallback, ``rounds`` times.

The VM is laid out like the KVM guest (the boot region, data at ``DATA_BASE`` identity-mapped by
the guest's page tables). Policies, as the model has them:

* ``lazy``: EPT entries of the data region are created on the first touch (EPT violation, the
  hypervisor backs the page; :meth:`VM.handle_lazy_backing`).
* ``prefaulted``: every page mapped in the EPT before the guest starts.
* ``dirty-log``: write protection (:class:`~eptlab.hv.dirty_log.WriteProtectLog`) armed after
  the warm-up and collected (re-armed) after every round.
* ``readonly``: the data region read-only in the EPT after the warm-up; a write exits and the
  hypervisor performs it (an aborted transaction's store is discarded; a fallback store is
  emulated and skipped), the page stays read-only.

In the model a VM exit inside a transaction aborts it (EAX 0) *and* is delivered to the
hypervisor (:mod:`eptlab.mmu.rtm`): that is the rule the cross-check puts to the machine.
Cycles are not modelled here (the log's cycles are 0).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from ..arch.bits import PAGE_SIZE
from ..arch.exits import EptQual, EptViolation
from ..errors import EptlabError
from ..hv import Exit, ExitAction, Hypervisor
from ..hv.dirty_log import WriteProtectLog
from ..kvm.backend import BOOT_SIZE, DATA_BASE
from ..kvm.txplan import KIND_ABORT, KIND_COMMIT, KIND_FALLBACK, AttemptLog, TxPlan
from ..mmu.rtm import Op, RtmConfig, TxStream
from ..mmu.rtm_machine import AbortEvent, CommitEvent, DoneEvent, ExitEvent, RtmMachine
from ..tables import GuestPageTables

SYSFS_L1D = Path("/sys/devices/system/cpu/cpu0/cache/index0")


def host_l1d() -> RtmConfig:
    """The write-set bound of this CPU: its L1 data cache's sets and ways (sysfs), or the
    model's default (48 KiB, 12 ways, 64 sets) where sysfs does not say."""
    try:
        if (SYSFS_L1D / "type").read_text().strip() == "Data":
            sets = int((SYSFS_L1D / "number_of_sets").read_text())
            ways = int((SYSFS_L1D / "ways_of_associativity").read_text())
            return RtmConfig(write_sets=sets, write_ways=ways)
    except (OSError, ValueError):
        pass
    return RtmConfig()


def _stores(addresses: npt.NDArray[np.int64], op: Op, value: int) -> TxStream:
    return TxStream.accesses(np.asarray(addresses, np.int64) + DATA_BASE, op, value)


class _Sim:
    def __init__(self, plan: TxPlan, policy: str, config: RtmConfig) -> None:
        self.plan, self.policy = plan, policy
        span = -(-(plan.span + PAGE_SIZE) // BOOT_SIZE) * BOOT_SIZE
        memory = DATA_BASE + span
        self.hv = hv = Hypervisor()
        self.vm = vm = hv.create_vm("guest", memory, lazy=policy == "lazy")
        vm.ept.map_range(0, DATA_BASE if policy == "lazy" else memory)
        tables = iter(range(PAGE_SIZE, BOOT_SIZE, PAGE_SIZE))
        pt = GuestPageTables(vm, lambda: next(tables))
        pt.map_range(DATA_BASE, DATA_BASE, memory - DATA_BASE)
        self.data = (DATA_BASE, memory - DATA_BASE)
        self.vcpu = vm.add_vcpu(cr3=pt.root)
        self.machine = RtmMachine(hv.engine, config)
        self.machine.add_lane(self.vcpu.engine_id, user=False)
        self.wp: WriteProtectLog | None = None
        self.readonly = False

    def _exit(self, record: object, in_tx: bool) -> None:
        if (self.readonly and isinstance(record, EptViolation)
                and record.qualification & EptQual.WRITE):
            if not in_tx:  # the fallback's store: performed by the hypervisor, then skipped
                self.machine.skip(0)
            return
        self.hv.handle(Exit(self.vcpu, record), expect=ExitAction.RETRY)  # type: ignore[arg-type]

    def drive(self, stream: TxStream) -> tuple[int, int]:
        """Run one stream to its end: ``(kind, status)``."""
        self.machine.load(0, stream)
        while (event := self.machine.run()) is not None:
            if isinstance(event, CommitEvent):
                return KIND_COMMIT, 0
            if isinstance(event, DoneEvent):
                return KIND_FALLBACK, 0
            if isinstance(event, ExitEvent):
                self._exit(event.exit, event.abort is not None)
                if event.abort is not None:
                    return KIND_ABORT, event.abort.status
                continue
            if isinstance(event, AbortEvent):
                return KIND_ABORT, event.abort.status
            raise EptlabError(f"tsx simulation: unexpected {event}")
        raise EptlabError("tsx simulation: the lane stopped without an outcome")

    def start_policy(self) -> None:
        gpa, size = self.data
        if self.policy == "dirty-log":
            self.wp = WriteProtectLog(self.vm)
            self.wp.start(gpa, size)
        elif self.policy == "readonly":
            self.vm.ept.protect(gpa, size, "r-x")
            self.vm.invept()
            self.readonly = True
        self.machine.forget_translations()

    def end_round(self) -> None:
        if self.wp is not None:
            self.wp.collect()
            self.machine.forget_translations()


def simulate(plan: TxPlan, policy: str, *, rounds: int, max_retries: int,
             config: RtmConfig | None = None) -> AttemptLog:
    """The attempt log the model predicts for ``plan`` under ``policy`` (cycles 0)."""
    sim = _Sim(plan, policy, config or host_l1d())
    warm = plan.warm_addresses()
    if len(warm):
        sim.drive(_stores(warm, Op.ADD, 0))  # `or $0`: a write that keeps the value
    sim.start_policy()
    words: list[int] = []
    for _ in range(rounds):
        for t in range(plan.transactions):
            body = _stores(plan.addresses(t), Op.WRITE, t)
            attempt = TxStream.marker(Op.XBEGIN) + body + TxStream.marker(Op.XEND)
            for _ in range(max_retries + 1):
                kind, status = sim.drive(attempt)
                words += [kind << 56 | t << 32 | status, 0]
                if kind == KIND_COMMIT:
                    break
            else:
                sim.drive(body)
                words += [KIND_FALLBACK << 56 | t << 32, 0]
        sim.end_round()
    return AttemptLog.decode(np.array(words, np.uint64))
