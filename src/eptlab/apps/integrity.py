"""Kernel integrity monitoring from the EPT: trap writes to kernel code, or log them with PML.

A guest kernel's code changes legitimately at run time (static keys, alternatives, ftrace: a
5-byte NOP at a *patch site* becomes a ``JMP rel32`` and back), and illegitimately when an
attacker hooks a function. The guest cannot be trusted to police itself (a kernel-mode attacker
writes through any writable alias of the page: here the direct map), but the hypervisor sees
every guest-physical page. :class:`IntegrityMonitor` is that policy, in four modes:

``none``
    No monitor (the baseline).
``trap-code``
    The EPT leaves of kernel *code* pages lose their write permission. Every write to them is
    an EPT violation; the handler checks the written word against the allow-list of patch sites
    (site address *and* value: each site may only hold its NOP or its JMP), then **emulates**
    an allowed write or **denies** a malicious one. Detection is immediate and the write never
    reaches memory.
``trap-all``
    The naive guard: every page of the kernel image (code, rodata, data) is write-protected,
    so every ordinary write to kernel data exits too (and is emulated).
``pml``
    Writes run free. Page-modification logging records the first write (dirty flag 0 -> 1) to
    each 4 KiB page in the 512-entry log. The monitor reviews the log on each log-full exit and
    at the end of every period of ``period`` accesses (a VMX-preemption-timer exit): each logged
    code page is compared with the monitor's golden copy; changed words are accepted if they are
    a patch site holding one of its allowed values, otherwise they are a detection. Reviewed
    code pages are **re-armed**: their EPT dirty flags are cleared and the monitor runs INVEPT.
    Without the INVEPT the processor keeps using its cached translation, which still says
    "dirty", so the next write to the page sets no flag and logs nothing (set
    ``rearm_invept=False`` to see it). PML detects after the fact and cannot prevent.

Emulation (our choice): the handler completes an allowed write in software, as KVM's
instruction emulator does for write-tracked pages: it decodes the store (here the stream
carries the stored value: :attr:`IntegrityMonitor.operand`), writes the word to host memory
through the VM's EPT, and the vCPU resumes *after* the access (``ExitAction.SKIP``). A denied
write is skipped the same way without writing anything. Ordinary data writes carry no
modelled value: emulating them only skips the access. The page stays write-protected
throughout, so there is no window in which another write could slip through.

Because the hv scheduler carries no stored values, the guest runs on the shared
single-vCPU loop of :mod:`eptlab.hv.guest_runner` (:class:`StreamRunner` feeds it a
:class:`Stream`): ``engine.run`` until an exit, ``hv.handle(exit)`` (the handlers registered with
:meth:`Hypervisor.on`), then resume at the same access or after it, as the handler returned;
stores that carry a value are written at the host-physical address the hardware used. The
period-end review in pml mode is a VMX-preemption-timer exit (basic exit reason 52) that the loop
delivers every ``period`` accesses while :attr:`IntegrityMonitor.timer_armed`.

Only the watched pages are split to 4 KiB EPT pages (pml: kernel code); the rest of guest memory
stays on 2 MiB EPT pages, whose dirty flags the monitor never clears, so they log once and the
log fills mostly with code pages.

Costs (cycles, from the active cost profile (:mod:`eptlab.costs`), added to the engine's own
cycle count): a VM exit round trip ``vmexit_cycles``; decoding and emulating (or refusing) a
trapped store ``emulate_cycles``; an INVEPT ``invept_cycles`` (the walks that refill the TLBs
afterwards are counted by the engine); an EPT entry edit ``ept_edit_cycles``; reading one PML
log entry ``pml_entry_cycles``; comparing one 4 KiB page with its golden copy
``page_compare_cycles``. The
monitor also splits the watched 2 MiB EPT mappings into 4 KiB pages; the TLB reach lost that
way shows up in the engine's cycles.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from ..arch.bits import PAGE_SIZE, PageSize
from ..arch.ept import Ept
from ..arch.exits import EptQual, EptViolation, ExitReason
from ..costs import active_profile
from ..errors import ConfigError
from ..guest import DIRECT_MAP_BASE, GuestKernel, KernelImage
from ..hv import VCPU, VM, Exit, Hypervisor, guest_runner
from ..hv.exits import ExitAction
from ..hv.guest_runner import RunReport
from ..workloads import Zipf

MODES = ("none", "trap-code", "trap-all", "pml")

NOP5 = 0x00_441F_0F  # nopl 0x0(%rax,%rax,1): 0F 1F 44 00 00
JMP32 = 0xE9  # jmp rel32: E9 xx xx xx xx
INSN5_MASK = (1 << 40) - 1
U64 = (1 << 64) - 1
_2M = int(PageSize.SIZE_2M)


def _signed(address: int) -> int:
    address &= U64
    return address - (1 << 64) if address >> 63 else address


def _hash_words(gpas: npt.NDArray[np.uint64], seed: int) -> npt.NDArray[np.uint64]:
    """The initial contents of kernel code: a splitmix64 hash of each word's GPA."""
    z = gpas ^ np.uint64((seed * 0x9E3779B97F4A7C15) & U64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def with_insn(word: int, insn: int) -> int:
    """``word`` with its low 5 bytes replaced by the instruction ``insn``."""
    return (word & ~INSN5_MASK & U64) | (insn & INSN5_MASK)


def jmp(rel32: int) -> int:
    return JMP32 | ((rel32 & 0xFFFF_FFFF) << 8)


# -- the guest ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatchSite:
    """A static-key jump site: an 8-byte aligned word of kernel code whose low 5 bytes are
    either a NOP (key off) or a ``JMP rel32`` (key on)."""

    gpa: int
    key: int
    states: tuple[int, int]  # (off, on) values of the whole word


class KernelGuest:
    """A booted guest: a hypervisor, a VM backed with 2 MiB EPT pages and EPT A/D flags on, a
    guest kernel with its KASLR'd image, one vCPU running a kernel thread, kernel code filled
    with deterministic contents, static-key patch sites, and a slab area (kernel heap) reached
    through the direct map."""

    def __init__(
        self,
        *,
        seed: int = 0,
        image: KernelImage | None = None,
        slab: int = 8 << 20,
        memory: int = 256 << 20,
        patch_keys: int = 16,
        sites_per_key: int = 4,
    ) -> None:
        if slab <= 0 or slab % _2M:
            raise ConfigError("slab", "must be a positive multiple of 2 MiB")
        self.seed = seed
        self.hv = Hypervisor(seed=seed)
        self.vm = self.hv.create_vm("guest", memory, ept_ad=True, backing=PageSize.SIZE_2M)
        self.kernel = GuestKernel(self.vm, seed=seed, image=image)
        proc = self.kernel.spawn("kworker")
        self.vcpu = self.vm.add_vcpu(cr3=proc.cr3)
        self.kernel.switch_to(self.vcpu, proc)
        self.sections = {
            kind: self.kernel.kernel_region(kind) for kind in ("code", "rodata", "data")
        }
        # guest-physical 2 MiB blocks of each section, in virtual order
        self.section_blocks = {
            kind: [self._gpa(r.start + off) for off in range(0, r.length, _2M)]
            for kind, r in self.sections.items()
        }
        self.slab_blocks = [self.kernel.frames.alloc(PageSize.SIZE_2M) for _ in range(slab // _2M)]
        for block in [b for bs in self.section_blocks.values() for b in bs] + self.slab_blocks:
            self.vm.back(block)  # the kernel is resident: no lazy-backing exits while measured
        self.code_pages = [b + o for b in self.section_blocks["code"] for o in range(0, _2M, 4096)]
        self.kernel_pages = [
            b + o for bs in self.section_blocks.values() for b in bs for o in range(0, _2M, 4096)
        ]
        self._fill_code()
        rng = np.random.default_rng([seed, 1])
        words = self.random_code_words(rng, patch_keys * sites_per_key, exclude=set())
        self.sites: dict[int, PatchSite] = {}
        for i, gpa in enumerate(words):
            original = self.read_word(gpa)
            off = with_insn(original, NOP5)
            on = with_insn(original, jmp(int(rng.integers(1 << 20, 1 << 24))))
            self.sites[gpa] = PatchSite(gpa, i // sites_per_key, (off, on))
            self.write_word(gpa, off)  # keys start disabled
        self.keys = patch_keys

    def _gpa(self, gva: int) -> int:
        gpa = self.kernel.kernel_tables.guest_physical(gva)
        assert gpa is not None
        return gpa

    def original_page(self, page: int) -> npt.NDArray[np.uint64]:
        """The contents of code page ``page`` as loaded (before the patch sites were set)."""
        lanes = np.arange(0, PAGE_SIZE, 8, dtype=np.uint64)
        return _hash_words(np.uint64(page) + lanes, self.seed)

    def _fill_code(self) -> None:
        for page in self.code_pages:
            self.vm.words(page, 512)[:] = self.original_page(page)

    def monitor(self, mode: str, *, rearm_invept: bool = True) -> IntegrityMonitor:
        """An :class:`IntegrityMonitor` for this guest, attached."""
        monitor = IntegrityMonitor(
            self.vm,
            mode,
            code_pages=self.code_pages,
            kernel_pages=self.kernel_pages,
            sites=self.sites,
            rearm_invept=rearm_invept,
        )
        monitor.attach()
        return monitor

    def random_code_words(
        self,
        rng: np.random.Generator,
        count: int,
        exclude: set[int],
        pages: list[int] | None = None,
    ) -> list[int]:
        pages = pages if pages is not None else self.code_pages
        if count > len(pages) * (PAGE_SIZE // 8) - len(exclude):
            raise ConfigError("count", f"{count} words do not fit in {len(pages)} pages")
        chosen: dict[int, None] = {}  # distinct, in drawing order
        while len(chosen) < count:
            gpa = pages[int(rng.integers(len(pages)))] + 8 * int(rng.integers(512))
            if gpa not in exclude:
                chosen[gpa] = None
        return list(chosen)

    def read_word(self, gpa: int) -> int:
        return self.vm.read_u64(gpa & ~7)

    def write_word(self, gpa: int, value: int) -> None:
        self.vm.write_u64(gpa & ~7, value)

    def code_snapshot(self) -> dict[int, npt.NDArray[np.uint64]]:
        """A copy of every code page, by GPA."""
        return {p: self.vm.words(p, 512).copy() for p in self.code_pages}

    def alias(self, gpa: int) -> int:
        """The direct-map address of ``gpa`` (a writable kernel alias of any guest page)."""
        return DIRECT_MAP_BASE + gpa


# -- the access stream --------------------------------------------------------------------------


@dataclass(frozen=True)
class CodeWrite:
    """An 8-byte store to kernel code: a static-key patch or an attack."""

    index: int  # position in the stream
    gpa: int
    value: int
    legitimate: bool
    label: str  # "static-key" or "hook"


@dataclass
class Stream:
    """Accesses (signed GVAs, kinds 0 read / 1 write / 2 fetch) and the code writes among them,
    with their values."""

    gva: npt.NDArray[np.int64]
    kind: npt.NDArray[np.int8]
    writes: list[CodeWrite] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.writes = sorted(self.writes, key=lambda w: w.index)
        self._by_index = {w.index: w for w in self.writes}

    def __len__(self) -> int:
        return int(self.gva.shape[0])

    def store_at(self, index: int) -> CodeWrite | None:
        return self._by_index.get(index)

    @property
    def guest_writes(self) -> int:
        return int(np.count_nonzero(self.kind == 1))

    @property
    def malicious(self) -> list[CodeWrite]:
        return [w for w in self.writes if not w.legitimate]

    @property
    def patches(self) -> list[CodeWrite]:
        return [w for w in self.writes if w.legitimate]

    @classmethod
    def build(
        cls,
        gva: npt.NDArray[np.int64],
        kind: npt.NDArray[np.int8],
        inserts: Iterable[tuple[int, int, int, bool, str]],
    ) -> Stream:
        """Insert code writes ``(before position, gpa, value, legitimate, label)`` into a base
        stream; they become write accesses through the direct map."""
        items = sorted(enumerate(inserts), key=lambda t: (t[1][0], t[0]))
        positions = np.array([it[0] for _, it in items], np.int64)
        addresses = np.array([_signed(DIRECT_MAP_BASE + it[1]) for _, it in items], np.int64)
        out_gva = np.insert(gva, positions, addresses) if len(items) else gva.copy()
        out_kind = np.insert(kind, positions, np.ones(len(items), np.int8)) if items else kind
        writes = [
            CodeWrite(int(pos) + k, gpa, value, legit, label)
            for k, (_, (pos, gpa, value, legit, label)) in enumerate(items)
        ]
        return cls(out_gva.astype(np.int64), out_kind.astype(np.int8), writes)


@dataclass(frozen=True)
class KernelActivity:
    """Ordinary kernel activity with static-key flips and injected hooks.

    Each access is, with the given probabilities, an instruction fetch from kernel code (Zipf
    over code pages: hot functions), a read of rodata, a read or write of kernel data, or a read
    or write of slab objects through the direct map (Zipf over pages, a third of data and slab
    accesses are writes). On top of that: ``patch_events`` static-key flips at random times, each
    writing every site of one key (the NOP <-> JMP toggle), and ``malicious_writes`` hooks (a
    ``JMP`` to attacker code written over a distinct non-site word) at random times, aimed at
    the code pages of ``attack_pages`` target functions (so some pages are hit more than once).
    """

    accesses: int = 400_000
    patch_events: int = 24
    malicious_writes: int = 12
    attack_pages: int = 4
    fetch: float = 0.45
    rodata: float = 0.10
    data: float = 0.22
    slab: float = 0.23
    write_share: float = 1 / 3
    seed: int = 0

    def stream(self, guest: KernelGuest) -> Stream:
        n = self.accesses
        rng = np.random.default_rng([self.seed, 2])
        probs = np.array([self.fetch, self.rodata, self.data, self.slab], np.float64)
        if n < 1 or probs.min() < 0 or probs.sum() <= 0:
            raise ConfigError("KernelActivity", "needs accesses >= 1 and a non-negative mix")
        category = rng.choice(4, size=n, p=probs / probs.sum())
        gva = np.empty(n, np.int64)
        kind = np.zeros(n, np.int8)
        sections = guest.sections
        for c, (name, size, alpha) in enumerate(
            (("code", 16, 1.0), ("rodata", 8, 0.9), ("data", 8, 1.1), ("slab", 8, 1.0))
        ):
            sel = np.flatnonzero(category == c)
            if not sel.size:
                continue
            if name == "slab":
                footprint, base = len(guest.slab_blocks) * _2M, 0
            else:
                footprint, base = sections[name].length, sections[name].start
            z = Zipf(footprint=footprint, seed=self.seed * 8 + c, alpha=alpha, access_size=size)
            offsets = z.chunk_at(0, 0, sel.size).address
            if name == "slab":
                blocks = np.array(guest.slab_blocks, np.int64)
                gpas = blocks[offsets >> 21] + (offsets & (_2M - 1))
                gva[sel] = gpas + np.int64(_signed(DIRECT_MAP_BASE))
            else:
                gva[sel] = offsets + np.int64(_signed(base))
            if name == "code":
                kind[sel] = 2
            elif name in ("data", "slab"):
                kind[sel] = (rng.random(sel.size) < self.write_share).astype(np.int8)
        inserts: list[tuple[int, int, int, bool, str]] = []
        state = [0] * guest.keys
        by_key: dict[int, list[PatchSite]] = {}
        for site in guest.sites.values():
            by_key.setdefault(site.key, []).append(site)
        for pos in np.sort(rng.integers(0, n, self.patch_events)).tolist():
            key = int(rng.integers(guest.keys))
            state[key] ^= 1
            for site in by_key.get(key, []):
                inserts.append((pos, site.gpa, site.states[state[key]], True, "static-key"))
        targets = [
            guest.code_pages[int(i)]
            for i in rng.choice(len(guest.code_pages), self.attack_pages, replace=False)
        ]
        words = guest.random_code_words(
            rng, self.malicious_writes, exclude=set(guest.sites), pages=targets
        )
        lo, hi = max(1, n // 50), max(2, n - n // 50)
        for pos, gpa in zip(np.sort(rng.integers(lo, hi, len(words))).tolist(), words, strict=True):
            hook = with_insn(guest.read_word(gpa), jmp(-int(rng.integers(1 << 20, 1 << 30))))
            inserts.append((pos, gpa, hook, False, "hook"))
        return Stream.build(gva, kind, inserts)


# -- the monitor --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Detection:
    gpa: int  # the word found tampered with
    value: int
    at: int  # stream position when the monitor found it
    how: str  # "trap" or "pml-review"


@dataclass
class MonitorCounters:
    trapped_writes: int = 0  # write EPT violations on protected pages
    emulated: int = 0  # of which completed in software
    denied: int = 0
    patches_allowed: int = 0
    timer_exits: int = 0  # period ends (VMX-preemption-timer exits) in pml mode
    pml_full_exits: int = 0
    reviews: int = 0
    pml_entries: int = 0
    pages_compared: int = 0
    rearmed: int = 0  # dirty flags cleared
    invept: int = 0
    ept_edits: int = 0
    splits: int = 0

    def cycles(self) -> int:
        """Cycles of the monitor's own work (VM exits are costed by the caller)."""
        p = active_profile()
        return (
            (self.emulated + self.denied) * p.cycles("emulate_cycles")
            + self.invept * p.cycles("invept_cycles")
            + self.ept_edits * p.cycles("ept_edit_cycles")
            + self.pml_entries * p.cycles("pml_entry_cycles")
            + self.pages_compared * p.cycles("page_compare_cycles")
        )


class IntegrityMonitor:
    """The policy, attached to one VM (see the module docstring for the modes)."""

    def __init__(
        self,
        vm: VM,
        mode: str,
        *,
        code_pages: Iterable[int],
        kernel_pages: Iterable[int] = (),
        sites: dict[int, PatchSite] | None = None,
        rearm_invept: bool = True,
    ) -> None:
        if mode not in MODES:
            raise ConfigError("mode", f"{mode!r} is not one of {', '.join(MODES)}")
        self.vm, self.hv, self.mode = vm, vm.hv, mode
        self.code_pages = frozenset(code_pages)
        self.kernel_pages = frozenset(kernel_pages) | self.code_pages
        self.allowed = {gpa: frozenset(s.states) for gpa, s in (sites or {}).items()}
        self.rearm_invept = rearm_invept
        self.counters = MonitorCounters()
        self.detections: list[Detection] = []
        self.decisions: dict[int, str] = {}  # stream position -> "allowed" / "denied"
        self.golden: dict[int, npt.NDArray[np.uint64]] = {}
        # what the run loop tells the handlers about the access that exited, and is told back
        self.clock = 0  # stream position of the current access
        self.operand: int | None = None  # the value a trapped store writes (its decode)
        self.protected: frozenset[int] = frozenset()
        self.attached = False

    # -- setting up ---------------------------------------------------------------------------

    def attach(self) -> None:
        """Split the watched pages to 4 KiB EPT pages, then protect them (trap modes) or turn
        PML on and arm their dirty flags (pml); register the exit handlers; INVEPT."""
        if self.attached:
            raise ConfigError("IntegrityMonitor", "already attached")
        self.attached = True
        watched = {
            "none": frozenset(),
            "trap-code": self.code_pages,
            "trap-all": self.kernel_pages,
            "pml": self.code_pages,
        }[self.mode]
        ept = self.vm.ept
        for page in sorted(watched):
            leaf = ept.lookup(page)
            if leaf is None:
                self.vm.back(page)
                leaf = ept.lookup(page)
                assert leaf is not None
            while leaf.level > 1:
                ept.split(page)
                self.counters.splits += 1
                leaf = ept.lookup(page)
                assert leaf is not None
        if self.mode in ("trap-code", "trap-all"):
            for page in sorted(watched):
                self.counters.ept_edits += ept.protect(page, PAGE_SIZE, "r-x")
            self.protected = watched
            self.hv.on(ExitReason.EPT_VIOLATION, self._on_ept_violation)
        elif self.mode == "pml":
            if not self.vm.pml_enabled:
                self.vm.enable_pml()
            for page in sorted(watched):
                self.golden[page] = self.vm.words(page, 512).copy()
                self._clear_dirty(page)
            self.hv.on(ExitReason.PML_FULL, self._on_pml_full)
            self.hv.on(ExitReason.PREEMPTION_TIMER, self._on_timer)
        # every mode (``none`` too) starts with the VM's cached translations dropped, so that
        # the modes are measured from the same state
        self._invept()

    def _invept(self) -> None:
        self.vm.invept()
        self.counters.invept += 1

    def _clear_dirty(self, page: int) -> None:
        leaf = self.vm.ept.lookup(page)
        assert leaf is not None and leaf.level == 1
        if leaf.value & Ept.D:
            self.hv.host.memory.write_u64(leaf.entry_address, leaf.value & ~int(Ept.D))
            self.counters.ept_edits += 1

    def is_allowed(self, gpa: int, value: int | None) -> bool:
        """The allow-list: a known patch site receiving one of its two states."""
        states = self.allowed.get(gpa & ~7)
        return states is not None and value is not None and value & U64 in states

    # -- trap modes ----------------------------------------------------------------------------

    def _on_ept_violation(self, exit_: Exit) -> ExitAction | None:
        record = exit_.record
        if exit_.vcpu.vm is not self.vm or not isinstance(record, EptViolation):
            return None
        page = record.gpa & ~(PAGE_SIZE - 1)
        q = record.qualification
        if not q & EptQual.WRITE or not q & EptQual.GLA_TRANSLATION or page not in self.protected:
            return None  # not a data write to a page we protect: someone else's exit
        self.counters.trapped_writes += 1
        value = self.operand
        if page not in self.code_pages or self.is_allowed(record.gpa, value):
            # a patch site receiving a legal state, or (trap-all) an ordinary data write
            if value is not None:
                self.vm.write_u64(record.gpa & ~7, value)  # emulate: the store, in software
            if page in self.code_pages:
                self.counters.patches_allowed += 1
                self.decisions[self.clock] = "allowed"
            self.counters.emulated += 1
        else:
            self.counters.denied += 1
            self.decisions[self.clock] = "denied"
            self.detections.append(Detection(record.gpa & ~7, value or 0, self.clock, "trap"))
        return ExitAction.SKIP

    # -- pml mode ------------------------------------------------------------------------------

    def _on_pml_full(self, exit_: Exit) -> ExitAction | None:
        if exit_.vcpu.vm is not self.vm:
            return None
        self.counters.pml_full_exits += 1
        self.review(exit_.vcpu)
        return ExitAction.RETRY  # the write that found the log full is retried with an empty log

    @property
    def timer_armed(self) -> bool:
        """pml mode reviews the log at every VMX-preemption-timer exit (end of a period)."""
        return self.attached and self.mode == "pml"

    def _on_timer(self, exit_: Exit) -> ExitAction | None:
        if exit_.vcpu.vm is not self.vm:
            return None
        self.period_end(exit_.vcpu)
        return ExitAction.RETRY

    def period_end(self, vcpu: VCPU) -> None:
        """The end of a period: in pml mode a timer exit and a review of the log."""
        if self.mode != "pml":
            return
        self.counters.timer_exits += 1
        self.review(vcpu)

    def review(self, vcpu: VCPU) -> list[Detection]:
        """Drain the vCPU's PML log, compare each logged code page with its golden copy, accept
        legal patch-site states, report everything else, then re-arm the reviewed pages (clear
        their EPT dirty flags, INVEPT) so their next write is logged again."""
        logged = self.vm.drain_pml(vcpu)
        self.counters.reviews += 1
        self.counters.pml_entries += len(logged)
        found: list[Detection] = []
        pages = sorted({gpa & ~(PAGE_SIZE - 1) for gpa in logged} & self.code_pages)
        for page in pages:
            self.counters.pages_compared += 1
            current = self.vm.words(page, 512).copy()
            golden = self.golden[page]
            for word in np.flatnonzero(current != golden).tolist():
                gpa, value = page + 8 * word, int(current[word])
                if not self.is_allowed(gpa, value):
                    found.append(Detection(gpa, value, self.clock, "pml-review"))
            self.golden[page] = current  # known now: report each change once
            self._clear_dirty(page)
            self.counters.rearmed += 1
        if pages and self.rearm_invept:
            self._invept()
        self.detections += found
        return found


# -- running the guest --------------------------------------------------------------------------


class StreamRunner:
    """Runs a :class:`Stream` (its code writes carry their values) on a kernel guest's vCPU
    through the shared loop, :class:`eptlab.hv.guest_runner.GuestRunner`."""

    def __init__(self, guest: KernelGuest, monitor: IntegrityMonitor) -> None:
        self.guest, self.monitor = guest, monitor
        self.loop = guest_runner.GuestRunner(guest.vcpu, monitor)

    def run(
        self,
        stream: Stream,
        *,
        period: int = 50_000,
        progress: Callable[[int], None] | None = None,
    ) -> RunReport:
        """Run the whole stream; in pml mode the log is reviewed every ``period`` accesses and
        at the end."""
        values = {w.index: w.value for w in stream.writes}
        return self.loop.run(
            stream.gva, stream.kind, values=values, period=period, progress=progress
        )
