"""integrity on KVM: watch a guest kernel's code pages for malicious writes, three ways.

The ``ikernel`` guest (``guests/ikernel.S``) loads its code into ``code_pages`` pages (a memslot
of their own), then loops: it runs the function at the start of one code page after another
(each reads 32 words of its page), stores into ``data_writes`` words of its data pages (a second
memslot), toggles the patch site of one of its first ``patch_pages`` code pages every
``patch_every`` iterations (a legitimate, allow-listed code change), and performs a schedule of
injected writes into its code pages (:func:`make_schedule`: *hooks* that stay, and *transient*
writes undone by a *restore* a few iterations later, before the next review). Every injected
write is logged in guest memory with its iteration, GPA, value, RDTSC before and after, and the
word read back (:class:`LogEntry`): the ground truth.

Policies, armed at the guest's ROUND(-1) (boot done: code loaded, data touched), with what KVM
gives userspace:

* ``none``: nothing.
* ``trap-code``: the code slot is read-only (``KVM_MEM_READONLY``): every write to it exits as
  MMIO. An allowed patch (the site word, holding one of its two states) is performed by this
  VMM; any other write is a detection, and is dropped (``trap_action="deny"``: prevention) or
  performed (``"log"``).
* ``trap-all``: the code and data slots are read-only: every kernel write exits; data writes
  are performed (emulated) here. The naive baseline. (Slot 0 -- the guest's driver, its page
  tables, the parameter block and the ground-truth log -- stays writable: it is the harness.)
* ``log-bitmap`` / ``log-ring``: the code slot has ``KVM_MEM_LOG_DIRTY_PAGES``; writes run free.
  Every ``review_every`` iterations (or, with ``review_ms``, once its TSC passed the next
  deadline ``review_ms`` apart, checked every 64 iterations) the guest makes a ROUND hypercall
  (the review tick, its RDTSC in RCX) and the VMM collects the dirty code pages
  (``KVM_GET_DIRTY_LOG``, or the dirty ring: harvest and ``KVM_RESET_DIRTY_RINGS``) and
  compares each with its golden copy: changed words that are not an allowed patch are
  detections; a dirty page with no changed word is *dirty but unchanged* (a write-then-restore
  between two reviews). A last review runs at the end. Nothing is prevented.

KVM reports the GPA of an MMIO exit, never the guest-linear address or the instruction: the
trapped write is known by its GPA and data only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt

from ...arch.exits import EptQual, EptViolation, PmlFull
from ...errors import ConfigError, GuestError
from ...hv.exits import ExitAction, Vmcall
from .. import abi
from ..backend import (
    BOOT_SIZE,
    DATA_BASE,
    HC_DONE,
    HC_REPORT,
    HC_ROUND,
    LOG_AREA,
    PAGE,
    PARAM_AREA,
    KvmExit,
    KvmGuest,
    SlotSpec,
)
from ..fds import Kvm, dirty_pages
from ..memory import GuestMemory

POLICIES = ("none", "trap-code", "trap-all", "log-bitmap", "log-ring")
TRAP_ACTIONS = ("deny", "log")
CODE_SLOT, DATA_SLOT = 1, 2
HOOK, TRANSIENT, RESTORE = 0, 1, 2
KINDS = {HOOK: "hook", TRANSIENT: "transient", RESTORE: "restore"}
NOP_SITE = 0x001F0F0000441F0F  # nopl 0(%rax,%rax,1); nopl (%rax)
JMP_SITE = 0x001F0F00000003E9  # jmp +3; nopl (%rax)
SITE_STATES = frozenset((NOP_SITE, JMP_SITE))
TAIL = 256  # code-page bytes past the function: where injected writes land
WORDS = PAGE // 8
BOOT_DONE = (1 << 64) - 1  # ROUND(-1)
SCHEDULE_AT = PARAM_AREA + 256
MAX_SCHEDULE = (LOG_AREA - SCHEDULE_AT) // 32
MAX_LOG = (BOOT_SIZE - LOG_AREA) // 128  # the log's half of LOG_AREA..2 MiB
STAMPS_AT = LOG_AREA + 64 * MAX_LOG  # the other half: TSC stamps
MAX_STAMPS = (BOOT_SIZE - STAMPS_AT) // 8
U64 = (1 << 64) - 1


@dataclass(frozen=True)
class IntegrityConfig:
    """One run's guest and schedule (the same for every policy)."""

    code_pages: int = 64
    data_pages: int = 256
    iterations: int = 50_000
    data_writes: int = 2  # data words stored per iteration
    review_every: int = 5_000  # iterations between review ticks (log-* policies)
    review_ms: float = 0.0  # > 0: review ticks every this many ms of guest TSC instead
    patch_every: int = 1_000  # iterations between legitimate patches (0: none)
    patch_pages: int = 4  # code pages with a patch site
    hooks: int = 10  # injected writes that stay
    transient_pairs: int = 2  # injected writes undone before the next review
    attack_pages: int = 4  # code pages the hooks aim at
    trap_action: str = "deny"  # trap-code/trap-all: "deny" a detected write, or "log" it
    ring_entries: int = 4096
    stamp_every: int = 1024  # iterations per TSC stamp (a power of two)
    seed: int = 0
    user: bool = True

    def check(self) -> None:
        """Raise :class:`~eptlab.errors.ConfigError` naming the first impossible field."""
        for name in ("code_pages", "data_pages", "iterations", "review_every"):
            if getattr(self, name) < 1:
                raise ConfigError(name, "must be at least 1")
        for name in ("data_writes", "patch_every", "hooks", "transient_pairs"):
            if getattr(self, name) < 0:
                raise ConfigError(name, "must not be negative")
        if not 0 <= self.patch_pages <= self.code_pages:
            raise ConfigError("patch_pages", f"must be in 0..code_pages ({self.code_pages})")
        if self.hooks and not 1 <= self.attack_pages <= self.code_pages:
            raise ConfigError("attack_pages", f"must be in 1..code_pages ({self.code_pages})")
        free = self.code_pages - self.patch_pages - self.attack_pages
        if self.transient_pairs > max(free, 0):
            raise ConfigError("transient_pairs", f"needs a code page of its own each ({free} "
                              "pages have no patch site and no hook)")
        if self.transient_pairs and self.review_every < 3:
            raise ConfigError("review_every", "a write-then-restore needs 3 iterations")
        if 2 * self.transient_pairs + self.hooks > min(MAX_SCHEDULE, MAX_LOG):
            raise ConfigError("hooks", f"at most {min(MAX_SCHEDULE, MAX_LOG)} injected writes")
        if self.trap_action not in TRAP_ACTIONS:
            raise ConfigError("trap_action", f"{self.trap_action!r} is not one of "
                              f"{', '.join(TRAP_ACTIONS)}")
        if self.review_ms < 0:
            raise ConfigError("review_ms", "must not be negative")
        if self.stamp_every < 1 or self.stamp_every & (self.stamp_every - 1):
            raise ConfigError("stamp_every", "must be a power of two")
        if self.iterations // self.stamp_every + 2 > MAX_STAMPS:
            raise ConfigError("stamp_every", f"at most {MAX_STAMPS} stamps fit: raise it")
        if self.ring_entries < 1024 or self.ring_entries & (self.ring_entries - 1):
            raise ConfigError("ring_entries", "must be a power of two, at least 1024")

    @property
    def code_base(self) -> int:
        """GPA of the first code page (the code slot)."""
        return DATA_BASE

    @property
    def data_base(self) -> int:
        """GPA of the first data page (the data slot, after the code)."""
        return DATA_BASE + self.code_pages * PAGE

    @property
    def memory(self) -> int:
        """Bytes of guest memory: slot 0, code and data."""
        return self.data_base + self.data_pages * PAGE

    def slots(self) -> list[SlotSpec]:
        """Slot 0 (image, tables, parameters, log), the code slot, the data slot: as booted
        (every policy arms at the end of the boot)."""
        return [SlotSpec(0, BOOT_SIZE), SlotSpec(self.code_base, self.code_pages * PAGE),
                SlotSpec(self.data_base, self.data_pages * PAGE)]

    def is_site(self, gpa: int) -> bool:
        """Whether ``gpa`` is a patch site (the first word of one of the first code pages)."""
        page, offset = divmod(gpa - self.code_base, PAGE)
        return offset == 0 and 0 <= page < self.patch_pages


@dataclass(frozen=True)
class Injection:
    """One scheduled write: at ``iteration``, ``value`` into the word at ``gpa``."""

    iteration: int
    gpa: int
    value: int  # restore: ignored (the guest writes back the word it saved)
    kind: int


def make_schedule(cfg: IntegrityConfig) -> list[Injection]:
    """Hooks at random iterations (away from the ends) to distinct random tail words of
    ``attack_pages`` random code pages without a patch site when there are enough; transient
    pairs (write at ``a``, restore at ``b > a``, both inside one review window and before its
    tick) on code pages of their own. Seeded; sorted by iteration."""
    rng = np.random.default_rng([cfg.seed, 15])
    n, it = cfg.code_pages, cfg.iterations
    plain = list(range(cfg.patch_pages, n))
    pool = plain if len(plain) >= cfg.attack_pages + cfg.transient_pairs else list(range(n))
    order = [int(p) for p in rng.permutation(pool)]
    targets, own = order[: cfg.attack_pages], order[cfg.attack_pages:]
    out: list[Injection] = []
    used: set[int] = set()

    def word(page: int) -> int:
        while True:
            gpa = cfg.code_base + page * PAGE + 8 * int(rng.integers(TAIL // 8, WORDS))
            if gpa not in used:
                used.add(gpa)
                return gpa

    def value() -> int:  # a jmp rel32 to "attacker code" in the low bytes, marked high bytes
        return (0xBAD0 << 48 | int(rng.integers(1 << 20, 1 << 30)) << 8 | 0xE9) & U64

    lo, hi = max(0, it // 50), max(1, it - it // 50)
    for _ in range(cfg.hooks):
        page = targets[int(rng.integers(len(targets)))]
        out.append(Injection(int(rng.integers(lo, hi)), word(page), value(), HOOK))
    windows = max(1, it // cfg.review_every)
    for k in range(cfg.transient_pairs):
        w = int(rng.integers(windows))
        start, end = w * cfg.review_every, min(it, (w + 1) * cfg.review_every) - 1
        if end - start < 2:
            raise ConfigError("review_every", "too short a window for a write-then-restore")
        a = int(rng.integers(start, end - 1))
        # with timed reviews a pair is a few iterations apart (a tick between them is rare)
        b = int(rng.integers(a + 1, end)) if not cfg.review_ms else min(
            end - 1, a + 1 + int(rng.integers(8)))
        gpa = word(own[k])
        out.append(Injection(a, gpa, value(), TRANSIENT))
        out.append(Injection(b, gpa, 0, RESTORE))
    out.sort(key=lambda j: (j.iteration, j.kind == RESTORE))
    return out


# -- what the run leaves ---------------------------------------------------------------------


@dataclass(frozen=True)
class LogEntry:
    """One injected write as the guest logged it."""

    iteration: int
    gpa: int
    value: int
    tsc_before: int
    tsc_after: int
    readback: int
    kind: int

    @classmethod
    def decode(cls, words: npt.NDArray[np.uint64]) -> list[LogEntry]:
        """Entries from the guest's log (8 words each)."""
        rows = words.reshape(-1, 8)
        return [cls(*(int(v) for v in r[:7])) for r in rows]


@dataclass(frozen=True)
class Detection:
    """A write the monitor reported: by a trap, or by a review (with the tick's time)."""

    gpa: int  # the 8-byte word
    value: int
    how: str  # "trap" or "review"
    iteration: int | None = None  # review: the tick's iteration count (i + 1)
    tsc: int | None = None  # review: the guest's RDTSC at the tick
    host_us: float = 0.0  # review: from the exit reaching this VMM to this page compared


@dataclass
class Counters:
    """What the monitor did, by kind (measured phase)."""

    code_write_exits: int = 0  # trapped writes to the code slot
    data_write_exits: int = 0  # trapped writes to the data slot (trap-all), performed here
    patches_allowed: int = 0
    denied: int = 0
    ticks: int = 0  # review ticks (ROUND hypercalls)
    ring_full_exits: int = 0
    reviews: int = 0
    pages_compared: int = 0
    review_us: float = 0.0  # time spent collecting and comparing, in this VMM


@dataclass
class IntegrityOutcome:
    """One policy's run: the schedule, the guest's log, the monitor's detections, the costs."""

    policy: str
    config: IntegrityConfig
    schedule: list[Injection]
    log: list[LogEntry] = field(default_factory=list)
    detections: list[Detection] = field(default_factory=list)
    dirty_unchanged: list[tuple[int, int]] = field(default_factory=list)  # (GPA, tick iter.)
    counters: Counters = field(default_factory=Counters)
    loop_cycles: int = 0
    stamps: npt.NDArray[np.uint64] = field(default_factory=lambda: np.zeros(0, np.uint64))
    checksum: int = 0
    tsc_khz: int = 0
    kernel: dict[str, int] = field(default_factory=dict)  # vCPU statistics, measured phase
    ticks: list[int] = field(default_factory=list)  # iterations that ended with a review tick
    vmm_exits: int = 0  # exits this VMM handled in the measured phase (not REPORT/DONE)
    final_words: dict[int, int] = field(default_factory=dict)  # injected GPAs at the end
    seconds: float = 0.0

    @property
    def cycles_per_iteration(self) -> float:
        """Guest RDTSC cycles over the measured loop per iteration (exits included)."""
        return self.loop_cycles / self.config.iterations

    @property
    def chunks(self) -> npt.NDArray[np.float64]:
        """Guest cycles per iteration of each stamp period (the last one may be shorter)."""
        cfg = self.config
        spans = np.diff(self.stamps.astype(np.float64))
        sizes = np.full(len(spans), float(cfg.stamp_every))
        if len(sizes):
            sizes[-1] = cfg.iterations - cfg.stamp_every * (len(sizes) - 1)
        out: npt.NDArray[np.float64] = spans / sizes
        return out

    def event_periods(self) -> dict[str, list[int]]:
        """Stamp periods holding what the policy acts on, by kind: ``write`` (a patch or an
        injected write: an exit in the trap policies, a dirty-logging fault in KVM for the log
        policies, nothing for none), ``tick`` (a review; log policies only, taking precedence),
        ``data`` (trap-all: every period, each holds trapped data writes)."""
        cfg, n = self.config, len(self.chunks)
        if self.policy == "trap-all":
            return {"data": list(range(n))}
        writes = {j.iteration for j in self.schedule}
        if cfg.patch_every:
            writes |= set(range(cfg.patch_every - 1, cfg.iterations, cfg.patch_every))
        tick_periods = {i // cfg.stamp_every for i in self.ticks}
        write_periods = {i // cfg.stamp_every for i in writes} - tick_periods
        out = {"write": sorted(write_periods), "tick": sorted(tick_periods)}
        return {kind: [k for k in ks if k < n] for kind, ks in out.items() if ks}

    def monitor_cycles(self, base: float) -> float:
        """The policy's cost in guest cycles, robust to the host preempting the vCPU: for each
        kind of :meth:`event_periods`, the median over its periods of the cycles above ``base``
        cycles per iteration (a quiet period's cost: policy none's median), times the number of
        those periods. A preempted period is an outlier the median ignores (unless most of a
        kind's periods are preempted)."""
        cfg, chunks = self.config, self.chunks
        sizes = np.full(len(chunks), float(cfg.stamp_every))
        if len(sizes):
            sizes[-1] = cfg.iterations - cfg.stamp_every * (len(sizes) - 1)
        total = 0.0
        for periods in self.event_periods().values():
            excess = (chunks[periods] - base) * sizes[periods]
            total += float(np.median(excess)) * len(periods)
        return total


# -- the monitor -------------------------------------------------------------------------------


class _Monitor:
    """The exit handler: arms the policy at ROUND(-1), judges trapped writes, reviews the dirty
    code pages at each tick and at the end."""

    def __init__(self, guest: KvmGuest, policy: str, outcome: IntegrityOutcome) -> None:
        self.guest, self.policy, self.outcome = guest, policy, outcome
        self.cfg = outcome.config
        self.armed = False
        self.golden = np.zeros((self.cfg.code_pages, WORDS), np.uint64)
        self.carry: set[int] = set()  # code pages harvested early (ring full)
        self.before: dict[str, int] = {}
        self.end_tsc = 0

    # -- arming -------------------------------------------------------------------------------

    def arm(self) -> None:
        g = self.guest
        self.golden[:] = self._code()
        readonly, log = abi.MemFlag.READONLY, abi.MemFlag.LOG_DIRTY_PAGES
        if self.policy in ("trap-code", "trap-all"):
            g.set_slot_flags(CODE_SLOT, readonly)
        if self.policy == "trap-all":
            g.set_slot_flags(DATA_SLOT, readonly)
        if self.policy in ("log-bitmap", "log-ring"):
            g.set_slot_flags(CODE_SLOT, log)
        for j in self.outcome.schedule:  # every injected write must change its word
            if j.kind != RESTORE and int(self.golden.flat[self._word(j.gpa)]) == j.value:
                raise ConfigError("seed", f"injected value equals the code at {j.gpa:#x}")
        stats = g.stats()
        self.before = stats.read() if stats is not None else {}
        self.armed = True

    def _code(self, page: int | None = None) -> npt.NDArray[np.uint64]:
        cfg, mem = self.cfg, self.guest.memory
        if page is None:
            raw = mem.read(cfg.code_base, cfg.code_pages * PAGE)
            return np.frombuffer(raw, "<u8").reshape(cfg.code_pages, WORDS).astype(np.uint64)
        return np.frombuffer(mem.read(cfg.code_base + page * PAGE, PAGE), "<u8").astype(np.uint64)

    def _word(self, gpa: int) -> int:
        return (gpa - self.cfg.code_base) // 8

    def allowed(self, gpa: int, value: int) -> bool:
        """The allow-list: a patch site receiving one of its two states."""
        return self.cfg.is_site(gpa) and value in SITE_STATES

    # -- exits ----------------------------------------------------------------------------------

    def __call__(self, e: KvmExit) -> ExitAction | None:
        record = e.record
        if isinstance(record, Vmcall):
            return self._hypercall(record)
        if not self.armed:
            return None
        if isinstance(record, EptViolation) and record.qualification & EptQual.WRITE:
            slot = self.guest.slot_of(record.gpa)
            if slot == CODE_SLOT:
                self.outcome.vmm_exits += 1
                self._code_write(e, record.gpa)
                return ExitAction.SKIP
            if slot == DATA_SLOT and self.policy == "trap-all":
                self.outcome.vmm_exits += 1
                self.outcome.counters.data_write_exits += 1
                self.guest.emulate_write(e)
                return ExitAction.SKIP
            return None
        if isinstance(record, PmlFull) and self.policy == "log-ring":
            self.outcome.vmm_exits += 1
            self.outcome.counters.ring_full_exits += 1
            self.carry |= self._harvest()
            return ExitAction.RETRY
        return None

    def _hypercall(self, record: Vmcall) -> ExitAction | None:
        if record.number == HC_ROUND:
            if record.args[0] == BOOT_DONE:
                self.arm()
            elif self.armed:
                self.outcome.vmm_exits += 1
                self.outcome.counters.ticks += 1
                self.outcome.ticks.append(record.args[0] - 1)
                if self.policy in ("log-bitmap", "log-ring"):
                    self.review(record.args[0], record.args[1])
        elif record.number == HC_REPORT and record.args[0] == 3:
            self.end_tsc = record.args[1]
        elif record.number == HC_DONE and self.armed:
            if self.policy in ("log-bitmap", "log-ring"):
                self.review(self.cfg.iterations, self.end_tsc)  # the last review
            stats = self.guest.stats()
            if stats is not None and self.before:
                after = stats.read()
                self.outcome.kernel = {k: v - self.before.get(k, 0) for k, v in after.items()}
        return None  # the standard handling records REPORTs, stops at DONE

    def _code_write(self, e: KvmExit, gpa: int) -> None:
        c = self.outcome.counters
        c.code_write_exits += 1
        mem = self.guest.memory
        word = gpa & ~7
        if gpa != word or len(e.data) != 8:  # a narrower or unaligned store: merge it
            merged = bytearray(mem.read(word, 8))
            merged[gpa - word : gpa - word + len(e.data)] = e.data
            value = int.from_bytes(merged[:8], "little")
        else:
            value = int.from_bytes(e.data, "little")
        if self.allowed(word, value):
            c.patches_allowed += 1
            self.guest.emulate_write(e)
            return
        self.outcome.detections.append(Detection(word, value, "trap"))
        if self.cfg.trap_action == "log":
            self.guest.emulate_write(e)
        else:
            c.denied += 1

    # -- reviews --------------------------------------------------------------------------------

    def _harvest(self) -> set[int]:
        """Dirty code pages (indexes) since the last collection; the log is cleared."""
        g = self.guest
        if self.policy == "log-bitmap":
            bitmap = g.vm.get_dirty_log(CODE_SLOT, self.cfg.code_pages)
            return {int(p) for p in dirty_pages(bitmap)}
        assert g.ring is not None
        entries = g.ring.harvest()
        g.vm.reset_dirty_rings()
        return {offset for slot, offset in entries if slot & 0xFFFF == CODE_SLOT}

    def review(self, iteration: int, tsc: int) -> None:
        start = time.perf_counter()
        c = self.outcome.counters
        pages = sorted(self._harvest() | self.carry)
        self.carry = set()
        c.reviews += 1
        base = self.cfg.code_base
        for page in pages:
            c.pages_compared += 1
            current = self._code(page)
            changed = np.flatnonzero(current != self.golden[page]).tolist()
            host_us = (time.perf_counter() - start) * 1e6
            if not changed:
                self.outcome.dirty_unchanged.append((base + page * PAGE, iteration))
            for w in changed:
                gpa, value = base + page * PAGE + 8 * w, int(current[w])
                if not self.allowed(gpa, value):
                    self.outcome.detections.append(
                        Detection(gpa, value, "review", iteration, tsc, host_us))
            self.golden[page] = current  # known now: each change is reported once
        c.review_us += (time.perf_counter() - start) * 1e6


# -- running -----------------------------------------------------------------------------------


def _parameter_block(cfg: IntegrityConfig, schedule: list[Injection], tsc_khz: int) -> bytes:
    """The guest's parameter block (offsets as ``P_*`` in ``guests/ikernel.S``)."""
    review_tsc = round(cfg.review_ms * tsc_khz) if cfg.review_every else 0
    words = [cfg.code_base, cfg.code_pages, cfg.data_base, cfg.data_pages, cfg.iterations,
             cfg.data_writes, cfg.review_every, SCHEDULE_AT, len(schedule), LOG_AREA,
             cfg.patch_every, cfg.patch_pages, 0, 0, 0, 0, cfg.stamp_every - 1, STAMPS_AT,
             review_tsc, 0]
    return np.array(words, "<u8").tobytes()


def run_policy(kvm: Kvm, cfg: IntegrityConfig, policy: str, *,
               timeout: float = 120.0) -> IntegrityOutcome:
    """One guest run under ``policy`` on a fresh VM (the schedule from ``cfg.seed``)."""
    if policy not in POLICIES:
        raise ConfigError("policies", f"{policy!r} is not one of {', '.join(POLICIES)}")
    cfg.check()
    if policy == "log-ring" and not kvm.check_extension(abi.Cap.DIRTY_LOG_RING):
        raise ConfigError("policies", "this KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING)")
    schedule = make_schedule(cfg)
    outcome = IntegrityOutcome(policy, cfg, schedule)
    ticks = cfg.review_every if policy in ("log-bitmap", "log-ring") else 0
    table = np.array([(j.iteration, j.gpa, j.value, j.kind) for j in schedule], "<u8")
    with KvmGuest(kvm, GuestMemory(cfg.memory), "ikernel", slots=cfg.slots(),
                  dirty_ring=cfg.ring_entries if policy == "log-ring" else 0,
                  user=cfg.user) as guest:
        outcome.tsc_khz = guest.vcpu.tsc_khz()
        block = _parameter_block(replace(cfg, review_every=ticks), schedule, outcome.tsc_khz)
        guest.memory.write(PARAM_AREA, block)  # review_every 0: no ticks at all
        guest.memory.write(SCHEDULE_AT, table.tobytes())
        guest.start(r8=PARAM_AREA)
        monitor = _Monitor(guest, policy, outcome)
        result = guest.run(monitor, timeout=timeout)
        if result.status is None or result.status > MAX_LOG or not monitor.armed:
            raise GuestError("ikernel", f"ended without its log ({result.status})")
        words = np.frombuffer(guest.memory.read(LOG_AREA, 64 * result.status), "<u8")
        outcome.log = LogEntry.decode(words)
        outcome.loop_cycles = result.reports.get(1, 0)
        count = -(-cfg.iterations // cfg.stamp_every) + 1
        outcome.stamps = np.frombuffer(guest.memory.read(STAMPS_AT, 8 * count), "<u8").copy()
        outcome.checksum = result.reports.get(2, 0)
        outcome.final_words = {j.gpa: guest.memory.read_u64(j.gpa) for j in schedule}
        outcome.seconds = result.seconds
    if len(outcome.log) != len(schedule):
        raise GuestError("ikernel", f"logged {len(outcome.log)} of {len(schedule)} writes")
    return outcome


# -- scoring against the ground truth ----------------------------------------------------------


@dataclass(frozen=True)
class Score:
    """An outcome scored against the guest's log (:func:`score`)."""

    injected: int  # hooks + transient writes
    hooks: int
    transients: int
    restores: int
    detected: int  # injected writes the monitor reported
    hooks_detected: int
    transients_detected: int
    restores_detected: int
    prevented: int  # injected writes that never landed (the guest's read back)
    tampered: int  # hooks whose word holds the attacker's value at the end
    transients_flagged: int  # transient pairs seen as dirty but unchanged by a review
    dirty_unchanged: int  # page reviews that found a dirty page with no change
    false_detections: int  # detections matching no injected write
    delays_us: list[float]
    delays_iterations: list[int]

    @property
    def mean_delay_us(self) -> float | None:
        """Mean write-to-detection delay (None: nothing detected)."""
        return float(np.mean(self.delays_us)) if self.delays_us else None

    @property
    def max_delay_us(self) -> float | None:
        """Longest write-to-detection delay (None: nothing detected)."""
        return float(max(self.delays_us)) if self.delays_us else None


def score(o: IntegrityOutcome) -> Score:
    """Match the monitor's detections with the guest's log. A trap detection is matched to the
    logged write with its GPA and value, in order; its delay is bounded by the write's own
    duration (RDTSC before to after: the exit and this VMM's decision are inside it). A review
    detection is matched to the last logged write of that value before the tick; its delay is
    the guest's TSC from the write to the tick, plus this VMM's time to the page's compare."""
    khz = o.tsc_khz or 1
    unused = list(range(len(o.detections)))
    matched: dict[int, Detection] = {}  # log entry -> its detection
    for k, entry in enumerate(o.log):
        for i in unused:
            d = o.detections[i]
            if d.gpa != entry.gpa or d.value != entry.value:
                continue
            if d.how == "review" and (d.iteration is None or d.iteration <= entry.iteration):
                continue
            matched[k] = d
            unused.remove(i)
            break
    delays_us: list[float] = []
    delays_it: list[int] = []
    for k, entry in enumerate(o.log):
        if k not in matched or entry.kind == RESTORE:
            continue
        d = matched[k]
        if d.how == "trap":
            delays_us.append((entry.tsc_after - entry.tsc_before) * 1e3 / khz)
            delays_it.append(0)
        else:
            assert d.tsc is not None and d.iteration is not None
            delays_us.append((d.tsc - entry.tsc_after) * 1e3 / khz + d.host_us)
            delays_it.append(d.iteration - entry.iteration)
    kinds = [e.kind for e in o.log]
    injected = [k for k, e in enumerate(o.log) if e.kind != RESTORE]
    flagged = 0
    for e in o.log:
        if e.kind != RESTORE:
            continue
        page = e.gpa & ~(PAGE - 1)
        flagged += any(p == page and it > e.iteration for p, it in o.dirty_unchanged)
    hooks = [k for k in injected if o.log[k].kind == HOOK]
    return Score(
        injected=len(injected),
        hooks=kinds.count(HOOK),
        transients=kinds.count(TRANSIENT),
        restores=kinds.count(RESTORE),
        detected=sum(1 for k in injected if k in matched),
        hooks_detected=sum(1 for k in hooks if k in matched),
        transients_detected=sum(1 for k in injected if k in matched and kinds[k] == TRANSIENT),
        restores_detected=sum(1 for k in matched if kinds[k] == RESTORE),
        prevented=sum(1 for k in injected if o.log[k].readback != o.log[k].value),
        tampered=sum(1 for k in hooks if o.final_words.get(o.log[k].gpa) == o.log[k].value),
        transients_flagged=flagged,
        dirty_unchanged=len(o.dirty_unchanged),
        false_detections=len(unused),
        delays_us=delays_us,
        delays_iterations=delays_it,
    )
