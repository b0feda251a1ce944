"""tsx on KVM: a guest's RTM transactions while the VMM applies a policy to its memory.

The ``tsx`` guest (``guests/tsx.S``) warms a set of pages, then runs a :class:`TxPlan`'s
transactions round after round (XBEGIN, stores, XEND; an abort retried up to ``max_retries``
times, then a fallback without a transaction) and logs every attempt's EAX status and RDTSC
cycles in guest memory, which the VMM decodes (:class:`~eptlab.kvm.txplan.AttemptLog`).

Policies, applied to the data slot at the guest's ROUND(-1) (after its warm-up):

* ``lazy``: nothing; pages the guest did not touch yet are not populated on the host (the memfd
  is fresh), so a first touch faults into the host kernel and KVM.
* ``prefaulted``: the whole data region populated on the host first (``MADV_POPULATE_WRITE``);
  KVM's own second-level (here: shadow) entries are still built on the guest's first access.
* ``dirty-log``: ``KVM_MEM_LOG_DIRTY_PAGES`` switched on (KVM write-protects the slot), and the
  log read (which clears it and write-protects again) at every ROUND.
* ``readonly``: the slot made read-only (``KVM_MEM_READONLY``): every write exits to this VMM
  as MMIO, which performs it (a fallback store) -- a transactional store never completes.

KVM's own exits come from the vCPU's binary statistics (``KVM_GET_STATS_FD``), counted from the
end of the warm-up to the end of the run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from ...arch.exits import EptQual, EptViolation
from ...errors import ConfigError, RtmUnavailable
from ...hv.exits import ExitAction, Vmcall
from .. import abi
from ..backend import (
    BOOT_SIZE,
    DATA_BASE,
    HC_DONE,
    HC_ROUND,
    LOG_AREA,
    PAGE,
    PARAM_AREA,
    KvmExit,
    KvmGuest,
    default_slots,
)
from ..fds import Kvm, dirty_pages
from ..memory import GuestMemory
from ..rtm_host import FORCE_ENV
from ..txplan import AttemptLog, TxPlan

POLICIES = ("lazy", "prefaulted", "dirty-log", "readonly")
DATA_SLOT = 1
LOG_ENTRIES = (BOOT_SIZE - LOG_AREA) // 16
RUN_WORDS = (LOG_AREA - PARAM_AREA) // 8
WARM_DONE = (1 << 64) - 1  # ROUND(-1)


def guest_rtm(kvm: Kvm) -> tuple[bool, bool]:
    """(RTM, HLE) in what KVM offers guests: KVM_GET_SUPPORTED_CPUID leaf 7 subleaf 0, EBX bits
    11 and 4 (SDM Vol. 2, CPUID). The guests get exactly this CPUID (KVM_SET_CPUID2).
    ``EPTLAB_NO_RTM=1`` pretends both are clear (to test the unavailable path)."""
    if os.environ.get(FORCE_ENV, "") not in ("", "0"):
        return False, False
    cpuid = kvm.supported_cpuid()
    for entry in cpuid.entries[: cpuid.nent]:
        if entry.function == 7 and entry.index == 0:
            return bool(entry.ebx >> 11 & 1), bool(entry.ebx >> 4 & 1)
    return False, False


@dataclass
class TsxOutcome:
    """One policy's run of the TSX guest: the attempt log and KVM's statistics."""
    policy: str
    log: AttemptLog
    mmio_writes: int = 0  # writes trapped in a read-only slot (performed here)
    dirty_pages: list[int] = field(default_factory=list)  # per round (dirty-log)
    kernel: dict[str, int] = field(default_factory=dict)  # vCPU statistics, transaction phase
    seconds: float = 0.0


class _Policy:
    """The exit handler: the policy at ROUND(-1), dirty-log harvests at each ROUND, trapped
    writes performed in ``readonly``; the statistics snapshot at the end of the warm-up."""

    def __init__(self, guest: KvmGuest, outcome: TsxOutcome) -> None:
        self.guest, self.outcome = guest, outcome
        self.before: dict[str, int] = {}

    def __call__(self, e: KvmExit) -> ExitAction | None:
        record, g = e.record, self.guest
        if isinstance(record, EptViolation) and record.qualification & EptQual.WRITE:
            if self.outcome.policy != "readonly" or g.slot_of(record.gpa) != DATA_SLOT:
                return None
            self.outcome.mmio_writes += 1
            g.emulate_write(e)
            return ExitAction.SKIP
        if isinstance(record, Vmcall) and record.number == HC_ROUND:
            policy = self.outcome.policy
            if record.args[0] == WARM_DONE:
                if policy == "dirty-log":
                    g.set_slot_flags(DATA_SLOT, abi.MemFlag.LOG_DIRTY_PAGES)
                elif policy == "readonly":
                    g.set_slot_flags(DATA_SLOT, abi.MemFlag.READONLY)
                stats = g.stats()
                self.before = stats.read() if stats is not None else {}
            elif policy == "dirty-log":
                slot = g.slots[DATA_SLOT]
                bitmap = g.vm.get_dirty_log(DATA_SLOT, slot.size // PAGE)
                self.outcome.dirty_pages.append(len(dirty_pages(bitmap)))
        if isinstance(record, Vmcall) and record.number == HC_DONE:
            stats = g.stats()
            if stats is not None and self.before:
                after = stats.read()
                self.outcome.kernel = {k: v - self.before.get(k, 0) for k, v in after.items()}
        return None


def _absolute(runs: npt.NDArray[np.uint64], base: int) -> npt.NDArray[np.uint64]:
    out = np.array(runs, np.uint64, copy=True)
    out[..., 0] += np.uint64(base)
    return out


def run_policy(kvm: Kvm, plan: TxPlan, policy: str, *, memory: int, rounds: int = 2,
               max_retries: int = 3, user: bool = True, timeout: float = 60.0) -> TsxOutcome:
    """One guest run of ``plan`` under ``policy`` on a fresh VM."""
    if policy not in POLICIES:
        raise ConfigError("policies", f"{policy!r} is not one of {', '.join(POLICIES)}")
    if rounds < 1 or max_retries < 0:
        raise ConfigError("rounds/max_retries", "rounds >= 1 and max_retries >= 0")
    if not guest_rtm(kvm)[0]:
        raise RtmUnavailable("KVM_GET_SUPPORTED_CPUID offers guests no RTM "
                             "(CPUID.7.0:EBX bit 11 clear)")
    if DATA_BASE + plan.span > memory:
        raise ConfigError("memory_mib", f"the plan needs {plan.span >> 20} MiB of data region")
    entries = plan.transactions * rounds * (max_retries + 2)
    if entries > LOG_ENTRIES:
        raise ConfigError("transactions", f"{entries} log entries do not fit ({LOG_ENTRIES})")
    runs = _absolute(plan.runs, DATA_BASE).ravel()
    warm = _absolute(plan.warm, DATA_BASE).ravel()
    if len(runs) + len(warm) > RUN_WORDS:
        raise ConfigError("transactions", "the runs do not fit the parameter area")
    outcome = TsxOutcome(policy, AttemptLog.decode(np.zeros(0, np.uint64)))
    mem = GuestMemory(memory)
    if policy == "prefaulted":
        mem.populate_write(DATA_BASE, memory - DATA_BASE)
    with KvmGuest(kvm, mem, "tsx", slots=default_slots(memory), user=user) as guest:
        warm_at = PARAM_AREA
        runs_at = PARAM_AREA + 8 * len(warm)
        guest.memory.write(warm_at, warm.astype("<u8").tobytes())
        guest.memory.write(runs_at, runs.astype("<u8").tobytes())
        guest.start(r8=warm_at, r9=len(plan.warm), r10=runs_at, r11=plan.transactions,
                     r12=plan.per_tx, r13=max_retries, r14=rounds, r15=LOG_AREA)
        result = guest.run(_Policy(guest, outcome), timeout=timeout)
        if result.status is None or not LOG_AREA <= result.status <= BOOT_SIZE:
            raise ConfigError("tsx", f"the guest ended without a log end ({result.status})")
        n = (result.status - LOG_AREA) // 16
        words = np.frombuffer(guest.memory.read(LOG_AREA, 16 * n), "<u8")
        outcome.log = AttemptLog.decode(words)
        outcome.seconds = result.seconds
    return outcome
