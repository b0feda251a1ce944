"""The hypervisor: owns host memory and the translation engine, creates VMs, and dispatches
every VM exit to the handlers registered for its reason.

    action = None
    while (exit_ := vcpu.run(action)) is not None:
        action = hv.handle(exit_)

Handlers are plain functions ``handler(exit) -> ExitAction | None``: what the vCPU does next
(:class:`~eptlab.hv.exits.ExitAction`: retry, skip, step, stop), or None for "not mine". The
newest handler registered for a reason is asked first, so applications override the defaults
(lazy backing, PML drain, hypercall dispatch). An exit nobody takes raises
:class:`UnhandledExit`, which shows the exit record. Exits are counted by
:class:`~eptlab.arch.exits.ExitReason` (:func:`~eptlab.hv.exits.exit_names` for output).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence

from ..arch.bits import PageSize
from ..arch.exits import ExitReason
from ..errors import EptlabError
from ..memory.allocator import Policy
from ..memory.layout import LayoutConfig, resolve
from ..mmu.config import MmuConfig
from ..mmu.context import CpuFeatures
from ..mmu.engine import Engine
from .exits import Exit, ExitAction, Vmcall
from .host import HostMemory
from .scheduler import Scheduler
from .vcpu import VCPU
from .vm import VM

Handler = Callable[[Exit], ExitAction | None]
HypercallFn = Callable[[VCPU, tuple[int, ...]], int]


class UnhandledExit(EptlabError):
    """No handler took a VM exit; carries the exit record."""
    def __init__(self, exit_: Exit) -> None:
        super().__init__(f"no handler took this VM exit: {exit_}")
        self.exit = exit_


class Hypervisor:
    """Owns host memory and the translation engine, creates VMs and dispatches every VM exit to the
    handlers registered for its reason."""
    def __init__(
        self,
        *,
        host_memory: int = 1 << 40,
        mmu: MmuConfig | None = None,
        features: CpuFeatures | None = None,
        host_policy: Policy | None = None,
        seed: int = 0,
        layout: LayoutConfig | str | None = None,
    ) -> None:
        """``layout`` (None: the default, ``aged``; :mod:`eptlab.memory.layout`): an ``aged``
        host backs guest memory from an aged buddy allocator, a ``contiguous`` one in address
        order. An explicit ``host_policy`` overrides the layout's choice of host allocator."""
        self.features = features or CpuFeatures()
        self.layout = resolve(layout)
        policy: Policy = host_policy or ("aged" if self.layout.aged else "sequential")
        self.host = HostMemory(host_memory, policy=policy, seed=seed, aging=self.layout.aging)
        self.engine = Engine(self.host.memory, mmu or MmuConfig(), self.features)
        self.vms: list[VM] = []
        self.exits: Counter[ExitReason] = Counter()
        self.hypercall_results: list[tuple[str, int, int]] = []
        self._handlers: defaultdict[ExitReason, list[Handler]] = defaultdict(list)
        self._hypercalls: dict[int, tuple[str, HypercallFn]] = {}
        self._vpid = 0
        self.on(ExitReason.VMCALL, self._dispatch_hypercall)

    def next_vpid(self) -> int:
        """A fresh VPID (1, 2, ...)."""
        self._vpid += 1
        return self._vpid

    # -- VMs ----------------------------------------------------------------------------------

    def create_vm(
        self,
        name: str,
        memory: int,
        *,
        ept_levels: int = 4,
        ept_ad: bool = False,
        mbec: bool = False,
        lazy: bool = True,
        backing: PageSize = PageSize.SIZE_4K,
        pml: bool = False,
        layout: LayoutConfig | str | None = None,
    ) -> VM:
        """``layout``: the VM's (None: the hypervisor's); its guest OS follows it."""
        vm = VM(
            self,
            name,
            memory,
            ept_levels=ept_levels,
            ept_ad=ept_ad or pml,
            mbec=mbec,
            lazy=lazy,
            backing=backing,
            layout=self.layout if layout is None else LayoutConfig.of(layout),
        )
        self.vms.append(vm)
        self.on(ExitReason.EPT_VIOLATION, vm.handle_lazy_backing, first=True)
        self.on(ExitReason.PML_FULL, vm.handle_pml_full, first=True)
        if pml:
            vm.enable_pml()
        return vm

    # -- exits ----------------------------------------------------------------------------------

    def on(self, reason: ExitReason, handler: Handler, *, first: bool = False) -> None:
        """Register ``handler`` for ``reason``: asked before earlier ones (or after them all,
        with ``first=True``, for defaults)."""
        if first:
            self._handlers[reason].insert(0, handler)
        else:
            self._handlers[reason].append(handler)

    def handle(self, exit_: Exit, *, expect: ExitAction | None = None) -> ExitAction:
        """Give ``exit_`` to the handlers of its reason, newest first, until one takes it;
        returns its action (UnhandledExit if none takes it). A caller whose loop can do only
        one thing (re-run what exited, say) passes it as ``expect``: any other answer is an
        error rather than silently ignored."""
        self.exits[exit_.reason] += 1
        for handler in reversed(self._handlers[exit_.reason]):
            action = handler(exit_)
            if action is not None:
                if expect is not None and action is not expect:
                    raise EptlabError(f"{exit_}: the handler answered {action.name}, this loop "
                                      f"can only {expect.name}")
                return action
        raise UnhandledExit(exit_)

    def hypercall(self, number: int, name: str) -> Callable[[HypercallFn], HypercallFn]:
        """Decorator registering a hypercall: ``fn(vcpu, args) -> result``."""

        def register(fn: HypercallFn) -> HypercallFn:
            if number in self._hypercalls:
                raise EptlabError(f"hypercall {number} is already {self._hypercalls[number][0]}")
            self._hypercalls[number] = (name, fn)
            return fn

        return register

    def _dispatch_hypercall(self, exit_: Exit) -> ExitAction | None:
        record = exit_.record
        if not isinstance(record, Vmcall) or record.number not in self._hypercalls:
            return None
        name, fn = self._hypercalls[record.number]
        self.hypercall_results.append((name, record.number, fn(exit_.vcpu, record.args)))
        return ExitAction.SKIP  # the VMCALL is complete: resume after it

    # -- running --------------------------------------------------------------------------------

    def run(
        self,
        vcpus: Sequence[VCPU] | None = None,
        *,
        seed: int = 0,
        quantum: tuple[int, int] = (256, 1024),
        preempt_at: dict[int, set[int]] | None = None,
    ) -> Scheduler:
        """Run the given vCPUs (default: all) interleaved until every program ends (or a handler
        answers STOP), handling every exit. Returns the scheduler (its ``order`` records the
        interleaving)."""
        vcpus = list(vcpus) if vcpus is not None else [v for vm in self.vms for v in vm.vcpus]
        scheduler = Scheduler(
            self.engine, vcpus, seed=seed, quantum=quantum, preempt_at=preempt_at
        )
        action: ExitAction | None = None
        while (exit_ := scheduler.run(action)) is not None:
            action = self.handle(exit_)
        return scheduler
