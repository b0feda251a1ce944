"""The KVM backend: one VM with one vCPU running a guest built from ``guests/*.S``, and the run
loop that turns ``kvm_run`` exits into the exit records the simulator produces.

=====================================  ==============================================  =========
KVM exit                               eptlab record                                   SDM name
=====================================  ==============================================  =========
``out`` to :data:`HC_PORT`             :class:`~eptlab.hv.exits.Vmcall` (RAX; RBX..)   VMCALL
MMIO write into a read-only memslot    :class:`~eptlab.arch.exits.EptViolation`,        EPT viol.
                                       qualification WRITE | READABLE | EXECUTABLE
MMIO access outside every memslot      ``EptViolation``, no permission bits            EPT viol.
other MMIO inside a memslot (a read)   :class:`KvmFailure`                             --
HLT                                    :class:`~eptlab.hv.exits.Hlt`                   HLT
SHUTDOWN (triple fault)                :class:`~eptlab.hv.exits.TripleFault`           triple f.
DIRTY_RING_FULL                        :class:`~eptlab.arch.exits.PmlFull`             PML full
INTERNAL_ERROR, FAIL_ENTRY, others     :class:`KvmFailure` (KVM's own)                 --
other port I/O                         :class:`PortIo`                                 I/O instr.
=====================================  ==============================================  =========

The run loop asks the application's handler first, then the standard handling (DONE stops,
REPORT stores a value, NOP and ROUND resume, HLT stops). Handlers answer with the simulator's
:class:`~eptlab.hv.exits.ExitAction`, checked against what re-entering does on KVM
(:data:`REENTRY`): KVM itself completes the instruction of an I/O, MMIO or HLT exit, so those
take SKIP (the handler emulated or suppressed it) or STOP; a full dirty ring or a KVM failure
executed nothing, so RETRY; STEP is not implemented here. An exit nobody takes -- an unknown
hypercall, a triple fault, an internal error, a stray MMIO -- raises
:class:`~eptlab.errors.GuestError` with the record. A watchdog (signal + ``immediate_exit``)
stops a guest that runs past its deadline, in any thread once SIGUSR1 has a handler
(:func:`install_watchdog_handler`; a run in the main thread installs it, a run elsewhere without
it raises :class:`~eptlab.errors.WatchdogUnavailable` rather than run unguarded). Descriptors
and mappings are released by :meth:`KvmGuest.close` (or ``with``), also on errors.
"""

from __future__ import annotations

import contextlib
import math
import signal
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ..arch.exits import EptQual, EptViolation, ExitReason, PmlFull
from ..errors import ConfigError, GuestError, KvmError, WatchdogUnavailable
from ..hv.exits import ExitAction, Hlt, TripleFault, Vmcall, exit_names
from . import abi, build
from .fds import Kvm, StatsFd, VcpuFd, VmFd
from .memory import GuestMemory
from .vcpu_exit import (
    DirtyRingFull,
    FailEntry,
    HltExit,
    InternalError,
    Interrupted,
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    ShutdownExit,
    SystemEvent,
    VcpuExit,
)

HC_PORT = 0xE5
HC_DONE, HC_REPORT, HC_ROUND, HC_NOP = 0, 1, 2, 3
HYPERCALL_NAMES = {HC_DONE: "DONE", HC_REPORT: "REPORT", HC_ROUND: "ROUND", HC_NOP: "NOP"}
BOOT_SIZE = 2 << 20  # slot 0: image, page tables, parameter area
PARAM_AREA = 0x100000
LOG_AREA = 0x180000
DATA_BASE = BOOT_SIZE
IMAGE_MAGIC = b"EPTLABG1"
PAGE = 4096
MAX_GUEST = 4 << 30  # the guests' page tables map 4 GiB


# -- records the simulator has no counterpart for ---------------------------------------------


@dataclass(frozen=True, slots=True)
class PortIo:
    """Exit reason 30 for a port other than the hypercall port."""

    reason: ClassVar[ExitReason] = ExitReason.IO_INSTRUCTION
    port: int
    write: bool
    data: bytes = b""
    qualification: int = 0


@dataclass(frozen=True, slots=True)
class KvmFailure:
    """KVM could not run the guest: internal error, failed entry, an exit it does not name.
    Not a VM exit of the architecture, so it has no ``reason``; it is counted apart, in
    :attr:`KvmRun.failures`, and named :data:`KVM_FAILURE` in output."""

    what: str
    detail: tuple[int, ...] = ()
    qualification: int = 0


KvmRecord = Vmcall | EptViolation | Hlt | TripleFault | PmlFull | PortIo | KvmFailure

KVM_FAILURE = "KVM_FAILURE"  # the output name of KvmFailure, which has no SDM reason number

REENTRY: dict[type, ExitAction] = {
    # KVM completes the exiting instruction itself on the next KVM_RUN (the OUT, the MMIO
    # access with what userspace did with it, the HLT): going on means going past it
    Vmcall: ExitAction.SKIP,
    PortIo: ExitAction.SKIP,
    EptViolation: ExitAction.SKIP,
    Hlt: ExitAction.SKIP,
    # nothing was executed: KVM_EXIT_DIRTY_RING_FULL comes before entering the guest, a failure
    # left it where it was
    PmlFull: ExitAction.RETRY,
    KvmFailure: ExitAction.RETRY,
}
"""What going on after each record means on KVM (besides STOP, the only action it allows);
a triple fault cannot be resumed at all."""


@dataclass(frozen=True)
class KvmExit:
    """One exit of a KVM guest: the record, plus the bytes of a write that was not performed
    (MMIO into a read-only slot) so a handler can emulate it."""

    guest: KvmGuest
    record: KvmRecord
    data: bytes = b""


Handler = Callable[[KvmExit], ExitAction | None]
"""An application's exit handler: an action (see :data:`REENTRY`), or None (not mine: the
standard handling)."""


@dataclass
class KvmRun:
    """What one KVM run did: exits by reason, hypercalls, KVM's own statistics."""
    exits: Counter[ExitReason] = field(default_factory=Counter)
    failures: int = 0  # KvmFailure records: KVM could not run the guest (no SDM reason)
    hypercalls: Counter[str] = field(default_factory=Counter)
    reports: dict[int, int] = field(default_factory=dict)  # REPORT(key, value)
    status: int | None = None  # DONE's argument
    halted: bool = False
    seconds: float = 0.0
    kernel: dict[str, int] = field(default_factory=dict)  # vCPU statistics counted inside KVM

    @property
    def kernel_exits(self) -> int:
        """All exits of the vCPU, handled in the kernel or here (KVM's ``exits`` statistic)."""
        return self.kernel.get("exits", 0)

    @property
    def insn_emulated(self) -> int:
        """Guest instructions KVM's instruction emulator executed (``insn_emulation``)."""
        return self.kernel.get("insn_emulation", 0)

    @property
    def total_exits(self) -> int:
        """Exits that reached the VMM, every reason together (KVM failures included)."""
        return sum(self.exits.values()) + self.failures

    def exit_names(self) -> dict[str, int]:
        """Exits by reason name, KVM failures as :data:`KVM_FAILURE`: the output form."""
        names = exit_names(self.exits)
        if self.failures:
            names[KVM_FAILURE] = self.failures
        return names


# -- host ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flavour:
    """Which KVM this is: the module, and whether second-level paging is hardware (EPT/NPT,
    "TDP") or KVM's shadow paging."""

    module: str
    tdp: bool | None

    @property
    def label(self) -> str:
        """Human-readable flavour, e.g. ``kvm_pvm, shadow paging``."""
        paging = {True: "TDP (EPT/NPT)", False: "shadow paging", None: "paging unknown"}
        return f"{self.module}, {paging[self.tdp]}"

    def as_dict(self) -> dict[str, object]:
        """The columns every KVM row carries: module and TDP."""
        return {"kvm_module": self.module, "tdp": self.tdp}


def _param(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def flavour() -> Flavour:
    """Read from /sys/module: kvm_intel (ept), kvm_amd (npt), kvm_pvm (always shadow)."""
    yes = ("Y", "y", "1")
    for module, param in (("kvm_intel", "ept"), ("kvm_amd", "npt")):
        if Path(f"/sys/module/{module}").exists():
            value = _param(f"/sys/module/{module}/parameters/{param}")
            return Flavour(module, None if value is None else value in yes)
    if Path("/sys/module/kvm_pvm").exists():
        return Flavour("kvm_pvm", False)
    return Flavour("kvm", None)


# -- the image -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    """A guest image built from source: bytes, entry point, CR3 and GDT."""
    name: str
    data: bytes
    entry: int
    cr3: int
    gdt: int
    gdt_limit: int

    @classmethod
    def load(cls, name: str) -> Image:
        """Build (or take from the cache) guest ``name`` and parse its header."""
        data = build.image(name)
        magic, entry, cr3, gdt, limit = struct.unpack_from("<8sQQQQ", data, 0)
        if magic != IMAGE_MAGIC:
            raise GuestError(name, f"image has no {IMAGE_MAGIC!r} header")
        if build.LOAD_ADDRESS + len(data) > PARAM_AREA:
            raise GuestError(name, "image overlaps the parameter area")
        return cls(name, data, entry, cr3, gdt, limit)


    def tss(self) -> TssDescriptor:
        """The 64-bit TSS descriptor at :data:`TSS_SELECTOR` in the image's GDT."""
        if self.gdt_limit < TSS_SELECTOR + 15:
            raise GuestError(self.name, f"the GDT has no TSS descriptor at {TSS_SELECTOR:#x}")
        lo, hi = struct.unpack_from("<QQ", self.data, self.gdt - build.LOAD_ADDRESS + TSS_SELECTOR)
        access = lo >> 40 & 0xFF  # type 3:0, S 4, DPL 6:5, P 7 (SDM Vol. 3A §8.2.3)
        tss = TssDescriptor(
            base=(lo >> 16 & 0xFFFFFF) | (lo >> 56 & 0xFF) << 24 | (hi & 0xFFFFFFFF) << 32,
            limit=(lo & 0xFFFF) | (lo >> 48 & 0xF) << 16,
            type=access & 0xF, system=not access & 0x10, present=bool(access & 0x80))
        if not (tss.present and tss.system and tss.type in (TSS_AVAILABLE, TSS_BUSY)):
            raise GuestError(self.name, f"GDT entry {TSS_SELECTOR:#x} is not a 64-bit TSS")
        return tss


TSS_SELECTOR = 0x28  # the GDT entry of the guests' TSS (guests/common.inc)
TSS_AVAILABLE, TSS_BUSY = 0x9, 0xB  # 64-bit TSS descriptor types (SDM Vol. 3A Table 3-2)


@dataclass(frozen=True)
class TssDescriptor:
    """Base and limit of the guest's 64-bit TSS."""
    base: int
    limit: int
    type: int
    system: bool
    present: bool


_IMAGES: dict[str, Image] = {}


def image(name: str) -> Image:
    """Guest image ``name``, built once per process."""
    if name not in _IMAGES:
        _IMAGES[name] = Image.load(name)
    return _IMAGES[name]


# -- slots ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlotSpec:
    """A memory slot: guest-physical range and flags."""
    gpa: int
    size: int
    flags: int = 0


def default_slots(memory: int, data_flags: int = 0, chunk: int | None = None) -> list[SlotSpec]:
    """Slot 0 for the first 2 MiB (image, tables, parameters), then the data region as one slot
    or as ``chunk``-sized slots, each with ``data_flags``."""
    if memory < 2 * BOOT_SIZE or memory % BOOT_SIZE:
        raise ConfigError("memory", f"{memory} is not a multiple of 2 MiB of at least 4 MiB")
    if memory > MAX_GUEST:
        raise ConfigError("memory", f"the guests map at most {MAX_GUEST >> 30} GiB")
    slots = [SlotSpec(0, BOOT_SIZE)]
    step = memory - DATA_BASE if chunk is None else chunk
    if step <= 0 or step % PAGE or (memory - DATA_BASE) % step:
        raise ConfigError("chunk", f"{chunk} does not divide the data region in whole pages")
    slots += [SlotSpec(gpa, step, data_flags) for gpa in range(DATA_BASE, memory, step)]
    return slots


# -- KVM exit -> eptlab record -------------------------------------------------------------------


def exit_record(
    vexit: VcpuExit, slots: list[SlotSpec], get_regs: Callable[[], abi.Regs]
) -> tuple[KvmRecord, bytes]:
    """The eptlab record for one decoded KVM exit, and the bytes of a write that was not
    performed. A plain function of the exit (tests feed it synthetic exits, no VM needed);
    ``get_regs`` is called only for a hypercall.

    KVM reports an MMIO exit's guest-physical address only, never the guest-linear one: an
    ``EptViolation`` from here has ``gla=None`` and qualification bits 7-8 (GLA valid, access
    to the translation) clear, which means *unknown*, not "no linear address" as it would on
    hardware (SDM Vol. 3C Table 28-7). Compare those bits with the simulator's only where both
    engines can know them."""
    if isinstance(vexit, IoOut):
        if vexit.port == HC_PORT:
            regs = get_regs()
            return Vmcall(regs.rax & 0xFFFFFFFF, (regs.rbx, regs.rcx, regs.rdx, regs.rsi)), b""
        return PortIo(vexit.port, True, vexit.data), b""
    if isinstance(vexit, IoIn):
        return PortIo(vexit.port, False), b""
    if isinstance(vexit, MmioWrite | MmioRead):
        write = isinstance(vexit, MmioWrite)
        slot = next((s for s in slots if s.gpa <= vexit.gpa < s.gpa + s.size), None)
        if slot is None:  # nothing mapped: an EPT violation with no permission bits
            qualification = EptQual.WRITE if write else EptQual.READ
            data = vexit.data if isinstance(vexit, MmioWrite) else b""
            return EptViolation(vexit.gpa, None, int(qualification)), data
        if isinstance(vexit, MmioWrite) and slot.flags & abi.MemFlag.READONLY:
            # a write to a read-only slot: the page is readable and executable, not writable
            # (SDM Vol. 3C Table 28-7, exit qualification bits 3-5). KVM does not report the
            # guest-linear address: bits 7-8 (GLA valid, translation) are unknown, not 0.
            qualification = EptQual.WRITE | EptQual.READABLE | EptQual.EXECUTABLE
            return EptViolation(vexit.gpa, None, int(qualification)), vexit.data
        # A read of a readable GPA, or a write to a writable slot, cannot be an EPT violation:
        # KVM sent it to userspace for a reason of its own.
        kind = "write" if write else "read"
        return KvmFailure(f"MMIO {kind} of GPA {vexit.gpa:#x} inside memslot "
                          f"{slots.index(slot)} (flags {slot.flags:#x})", (vexit.gpa,)), b""
    if isinstance(vexit, HltExit):
        return Hlt(), b""
    if isinstance(vexit, ShutdownExit):
        return TripleFault(), b""
    if isinstance(vexit, DirtyRingFull):
        return PmlFull(), b""
    if isinstance(vexit, InternalError):
        return KvmFailure(f"internal error, suberror {vexit.suberror}", vexit.data), b""
    if isinstance(vexit, FailEntry):
        what = f"entry failed, hardware reason {vexit.hardware_reason:#x}"
        return KvmFailure(what, (vexit.cpu,)), b""
    if isinstance(vexit, SystemEvent):
        return KvmFailure(f"system event {vexit.type}"), b""
    if isinstance(vexit, Interrupted):
        return KvmFailure("interrupted"), b""
    return KvmFailure(f"KVM exit reason {vexit.reason}"), b""


# -- the watchdog --------------------------------------------------------------------------------


WATCHDOG_SIGNAL = signal.SIGUSR1


def _kick(signum: int, frame: object) -> None:
    """The watchdog's handler does nothing: delivering the signal is what makes ``KVM_RUN`` in
    the vCPU's thread return EINTR."""


def _handled() -> bool:
    """Whether the watchdog's signal has a Python handler. SIG_DFL would kill the process and
    SIG_IGN discards the signal before it can interrupt ``KVM_RUN``."""
    return callable(signal.getsignal(WATCHDOG_SIGNAL))


def install_watchdog_handler() -> None:
    """Give SIGUSR1 a (no-op) handler for the whole process, once, so the watchdog can interrupt
    ``KVM_RUN`` in any thread. Python installs handlers only from the main thread: a run in the
    main thread does this itself; call it there before running guests in other threads. A
    Python handler already in place is kept (any Python handler interrupts ``KVM_RUN``; it is
    called, in the main thread, each time a watchdog fires)."""
    if _handled():
        return
    if threading.current_thread() is not threading.main_thread():
        raise WatchdogUnavailable(
            "SIGUSR1 has no handler and only the main thread can install one: call "
            "eptlab.kvm.backend.install_watchdog_handler() from the main thread first")
    signal.signal(WATCHDOG_SIGNAL, _kick)


class Watchdog:
    """Stops ``KVM_RUN`` after ``seconds``: sets ``immediate_exit`` and sends SIGUSR1 to the
    running thread (a no-op handler, so the ioctl returns EINTR). Never silently off: without
    a usable handler (see :func:`install_watchdog_handler`) entering it raises
    :class:`~eptlab.errors.WatchdogUnavailable`."""

    def __init__(self, vcpu: VcpuFd, seconds: float) -> None:
        if not (math.isfinite(seconds) and seconds > 0):  # inf would silently disable it
            raise ConfigError("timeout", f"{seconds} s: the watchdog needs a finite time > 0")
        self.vcpu, self.seconds = vcpu, seconds
        self.fired = False
        self._thread_id = threading.get_ident()
        self._timer: threading.Timer | None = None

    def _fire(self) -> None:
        self.fired = True
        self.vcpu.immediate_exit = True
        with contextlib.suppress(ProcessLookupError):
            signal.pthread_kill(self._thread_id, WATCHDOG_SIGNAL)

    def __enter__(self) -> Watchdog:
        install_watchdog_handler()
        self._thread_id = threading.get_ident()
        self._timer = threading.Timer(self.seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer.join()
        if not self.vcpu.closed:
            self.vcpu.immediate_exit = False


# -- the guest -----------------------------------------------------------------------------------


LONG_MODE_CR0 = 0x80050033  # PG, AM, WP, NE, ET, MP, PE
LONG_MODE_CR4 = 0x20  # PAE
LONG_MODE_EFER = 0x500  # LMA, LME
USER_RFLAGS = 0x3002  # IOPL 3


class KvmGuest:
    """A VM with one vCPU, its memory, its memslots and a guest image, ready to run.

    The guest runs in 64-bit mode at CPL 3 with IOPL 3 (``user=True``, the default) or at
    CPL 0. CPL 3 because on kvm-pvm a CPL-0 guest that is not PVM-aware is executed by KVM's
    instruction emulator, one instruction at a time (its ``insn_emulation`` statistic counts
    them), while CPL-3 code runs on the processor; on kvm_intel / kvm_amd both run natively.
    The programs need no privilege: OUT is allowed by IOPL 3, RDTSC by CR4.TSD = 0; only HLT
    needs CPL 0.

    ``memory`` is owned (closed with the guest) unless ``own_memory=False``. ``dirty_ring``
    (entries) enables KVM's dirty ring before the vCPU exists.
    """

    def __init__(
        self,
        kvm: Kvm,
        memory: GuestMemory,
        guest: str,
        *,
        slots: list[SlotSpec] | None = None,
        dirty_ring: int = 0,
        own_memory: bool = True,
        load: bool = True,
        user: bool = True,
    ) -> None:
        self.kvm, self.memory, self.name, self.user = kvm, memory, guest, user
        self._stack = contextlib.ExitStack()
        try:
            if own_memory:  # first, so any failure below releases the memory
                self._stack.callback(memory.close)
            self.image = image(guest)
            self.slots = list(slots) if slots is not None else default_slots(memory.size)
            self.vm: VmFd = self._stack.enter_context(kvm.create_vm())
            self.ring = None
            if dirty_ring:
                cap = (abi.Cap.DIRTY_LOG_RING_ACQ_REL
                       if kvm.check_extension(abi.Cap.DIRTY_LOG_RING_ACQ_REL)
                       else abi.Cap.DIRTY_LOG_RING)
                self.vm.enable_cap(cap, dirty_ring * 16)
            for index, slot in enumerate(self.slots):
                self._set_slot(index, slot)
            self.vcpu: VcpuFd = self._stack.enter_context(self.vm.create_vcpu(0))
            self._stats: StatsFd | None = None
            if dirty_ring:
                self.ring = self.vcpu.map_dirty_ring(dirty_ring)
            self.vcpu.set_cpuid2(_supported_cpuid(kvm))
            if load:
                memory.write(build.LOAD_ADDRESS, self.image.data)
            self._long_mode()
        except BaseException:
            self._stack.close()
            raise

    def _set_slot(self, index: int, slot: SlotSpec) -> None:
        self.vm.set_user_memory_region(
            index, slot.gpa, slot.size, self.memory.address + slot.gpa, slot.flags
        )

    def set_slot_flags(self, index: int, flags: int) -> None:
        """Change a slot's flags. KVM changes only LOG_DIRTY_PAGES in place; for READONLY the
        slot is deleted and created again. ``slots`` changes only once KVM took the new slot;
        when it refuses, the old slot is put back (or, if even that fails, recorded as gone)."""
        slot = self.slots[index]
        if slot.flags == flags:
            return
        new = SlotSpec(slot.gpa, slot.size, flags)
        if not (slot.flags ^ flags) & abi.MemFlag.READONLY:
            self._set_slot(index, new)
        else:
            self.vm.set_user_memory_region(index, slot.gpa, 0, self.memory.address + slot.gpa, 0)
            try:
                self._set_slot(index, new)
            except KvmError:
                try:
                    self._set_slot(index, slot)
                except KvmError:
                    self.slots[index] = SlotSpec(slot.gpa, 0)  # deleted: no memory there now
                raise
        self.slots[index] = new

    def slot_of(self, gpa: int) -> int | None:
        """Index of the memory slot holding ``gpa``, or None."""
        for index, slot in enumerate(self.slots):
            if slot.gpa <= gpa < slot.gpa + slot.size:
                return index
        return None

    def _long_mode(self) -> None:
        """64-bit mode straight away: flat segments from the image's GDT, its page tables."""
        sregs = self.vcpu.get_sregs()
        dpl = 3 if self.user else 0
        code = abi.Segment(base=0, limit=0xFFFFFFFF, selector=0x1B if self.user else 0x08,
                           type=11, present=1, dpl=dpl, db=0, s=1, l=1, g=1)
        data = abi.Segment(base=0, limit=0xFFFFFFFF, selector=0x23 if self.user else 0x10,
                           type=3, present=1, dpl=dpl, db=1, s=1, l=0, g=1)
        sregs.cs = code
        sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
        tss = self.image.tss()  # TR as LTR would load it: the TSS descriptor, busy
        sregs.tr = abi.Segment(base=tss.base, limit=tss.limit, selector=TSS_SELECTOR,
                               type=TSS_BUSY, present=1, s=0)
        sregs.gdt.base, sregs.gdt.limit = self.image.gdt, self.image.gdt_limit
        sregs.idt.base, sregs.idt.limit = 0, 0  # no IDT: any exception ends in a triple fault
        sregs.cr0, sregs.cr3 = LONG_MODE_CR0, self.image.cr3
        sregs.cr4, sregs.efer = LONG_MODE_CR4, LONG_MODE_EFER
        self.vcpu.set_sregs(sregs)

    def start(self, **registers: int) -> None:
        """Point the vCPU at the image's entry with the given registers (r8=..., r15=...)."""
        # in user mode IOPL 3 lets the guest's OUT (the hypercall) through (SDM Vol. 1 §19.5.1)
        regs = abi.Regs(rflags=USER_RFLAGS if self.user else 2, rip=self.image.entry)
        for name, value in registers.items():
            if name not in abi.REG_NAMES:
                raise ConfigError("register", f"{name!r} is not a general register")
            setattr(regs, name, value & (1 << 64) - 1)
        self.vcpu.set_regs(regs)

    # -- running --------------------------------------------------------------------------------

    def record(self, vexit: VcpuExit) -> tuple[KvmRecord, bytes]:
        """The eptlab record for one decoded KVM exit (and the data of an unperformed write)."""
        return exit_record(vexit, self.slots, self.vcpu.get_regs)

    def run(self, handler: Handler | None = None, *, timeout: float = 10.0) -> KvmRun:
        """Run until DONE or HLT (or a handler's STOP, or an error); every exit goes to
        ``handler`` first."""
        result = KvmRun()
        stats = self.stats()
        before = stats.read() if stats is not None else {}
        start = time.perf_counter()
        vcpu = self.vcpu
        with Watchdog(vcpu, timeout) as watchdog:
            while True:
                vexit = vcpu.run()
                if isinstance(vexit, Interrupted):
                    if watchdog.fired:
                        raise GuestError(
                            self.name, f"still running after the {timeout:g} s deadline "
                            "(stopped by the watchdog)")
                    continue
                record, data = self.record(vexit)
                if isinstance(record, KvmFailure):
                    result.failures += 1
                else:
                    result.exits[record.reason] += 1
                kvm_exit = KvmExit(self, record, data)
                action = handler(kvm_exit) if handler is not None else None
                if action is None:
                    action = self._standard(kvm_exit, result)
                if action is None:
                    raise GuestError(self.name, _describe(record), record)
                if action is ExitAction.STOP:
                    break
                if action is not REENTRY.get(type(record)):
                    raise GuestError(self.name, f"a handler answered {action.name} to "
                                     f"{_describe(record)}, which KVM cannot do", record)
        result.seconds = time.perf_counter() - start
        if stats is not None:
            after = stats.read()
            result.kernel = {k: v - before.get(k, 0) for k, v in after.items()}
        return result

    def stats(self) -> StatsFd | None:
        """The vCPU's statistics fd (opened once; None where KVM_GET_STATS_FD is missing)."""
        if self._stats is None:
            try:
                self._stats = self._stack.enter_context(self.vcpu.stats())
            except KvmError:
                return None
        return self._stats

    @staticmethod
    def _standard(kvm_exit: KvmExit, result: KvmRun) -> ExitAction | None:
        record = kvm_exit.record
        if isinstance(record, Vmcall):
            name = HYPERCALL_NAMES.get(record.number)
            if name is not None:
                result.hypercalls[name] += 1
            if record.number == HC_DONE:
                result.status = record.args[0]
                return ExitAction.STOP
            if record.number == HC_REPORT:
                result.reports[record.args[0]] = record.args[1]
                return ExitAction.SKIP
            if record.number in (HC_NOP, HC_ROUND):
                return ExitAction.SKIP
            return None
        if isinstance(record, Hlt):
            result.halted = True
            return ExitAction.STOP
        return None

    def emulate_write(self, kvm_exit: KvmExit) -> None:
        """Perform a trapped write in the backing memory (what the guest meant to store)."""
        record = kvm_exit.record
        assert isinstance(record, EptViolation)
        self.memory.write(record.gpa, kvm_exit.data)

    # -- teardown -------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the guest's file descriptors and mappings."""
        self._stack.close()

    def __enter__(self) -> KvmGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _describe(record: KvmRecord) -> str:
    if isinstance(record, Vmcall):
        return f"unknown hypercall {record.number:#x} (args {[hex(a) for a in record.args]})"
    if isinstance(record, TripleFault):
        return "triple fault (KVM_EXIT_SHUTDOWN): the guest shut down"
    if isinstance(record, KvmFailure):
        return f"KVM could not run it: {record.what}"
    if isinstance(record, EptViolation):
        kind = "write" if record.qualification & EptQual.WRITE else "read"
        return f"unhandled {kind} of GPA {record.gpa:#x} (no writable memslot)"
    if isinstance(record, PortIo):
        return f"port I/O to unknown port {record.port:#x}"
    return f"unhandled exit {record}"


_CPUID: list[abi.Cpuid2] = []  # the host's supported CPUID: asked once per process


def _supported_cpuid(kvm: Kvm) -> abi.Cpuid2:
    if not _CPUID:
        _CPUID.append(kvm.supported_cpuid())
    return _CPUID[0]


def run_guest(
    guest: str,
    *,
    memory: int = 8 << 20,
    registers: Mapping[str, int] | None = None,
    timeout: float = 10.0,
    kvm: Kvm | None = None,
    user: bool = True,
) -> KvmRun:
    """Build, run and tear down one guest (tests and the CLI)."""
    with contextlib.ExitStack() as stack:
        kvm = kvm or stack.enter_context(Kvm.open())
        g = stack.enter_context(KvmGuest(kvm, GuestMemory(memory), guest, user=user))
        g.start(**dict(registers or {}))
        return g.run(timeout=timeout)
