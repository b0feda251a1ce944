"""The guest side of the integrity monitor (:mod:`eptlab.apps.integrity`): a booted kernel with
deterministic code contents and static-key patch sites, the access stream (ordinary kernel
activity with the code writes among it, each carrying its value), and the stream's generator.

The attacks beyond direct code writes (page-table remapping, aliasing, write-then-restore) are
built by :mod:`eptlab.apps.integrity_attacks` as stores inserted into the same stream.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import numpy.typing as npt

from ..arch.access import Access, Mode
from ..arch.bits import PAGE_SIZE, PageSize
from ..errors import ConfigError
from ..guest import DIRECT_MAP_BASE, GuestKernel, KernelImage
from ..hv import Hypervisor
from ..workloads import Zipf

if TYPE_CHECKING:
    from .integrity import IntegrityMonitor
    from .integrity_attacks import Attack
    from .integrity_hlat import HlatSetup

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
        self.hlat: HlatSetup | None = None  # set when a monitor in mode hlat is attached

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
        """An :class:`IntegrityMonitor` for this guest, attached (``hlat``: with the HLAT
        tables, paging-write and guest-paging verification installed)."""
        from .integrity import IntegrityMonitor
        from .integrity_hlat import install_hlat

        monitor = IntegrityMonitor(
            self.vm,
            mode,
            code_pages=self.code_pages,
            kernel_pages=self.kernel_pages,
            sites=self.sites,
            rearm_invept=rearm_invept,
            page_tables=self.code_path_entries() if mode == "trap-pt" else None,
        )
        monitor.attach()
        if mode == "hlat":
            self.hlat = install_hlat(self)
            monitor.counters.ept_edits += self.hlat.ept_edits
            monitor.counters.splits += self.hlat.splits
        return monitor

    def processor_gpa(self, la: int) -> int | None:
        """The guest-physical address the processor's translation of ``la`` reaches now
        (through HLAT when it is on), by the reference walker; None if it faults or exits."""
        from ..mmu.walker import ReferenceWalker

        v = self.vcpu
        walker = ReferenceWalker(self.hv.host.memory, v.guest, v.vmcs, self.hv.features)
        return walker.translate(la & U64, Access.READ, Mode.SUPERVISOR).gpa

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

    def code_address(self, gpa: int) -> int:
        """The kernel-code linear address that maps code word ``gpa`` (canonical, unsigned)."""
        code = self.sections["code"]
        block = gpa & ~(_2M - 1)
        index = self.section_blocks["code"].index(block)
        return code.start + index * _2M + (gpa & (_2M - 1))

    def roots(self) -> list[int]:
        """The guest-physical addresses of every top-level table that maps the kernel half:
        the kernel's own and each process's (whose upper half copies the kernel's entries)."""
        return [self.kernel.kernel_tables.root] + [
            p.tables.root for p in self.kernel.processes.values()
        ]

    def code_path_entries(self) -> dict[int, int]:
        """Every guest paging entry on the translation path of the kernel code (PML4Es of each
        root, the PDPTE, the PDEs mapping the 2 MiB code blocks), by GPA, with its value now."""
        tables = self.kernel.kernel_tables
        code = self.sections["code"]
        entries: dict[int, int] = {}
        for offset in range(0, code.length, _2M):
            la = code.start + offset
            top = tables.entry_address(la, tables.levels) - tables.root
            for root in self.roots():
                entries[root + top] = self.vm.read_u64(root + top)
            for level in range(tables.levels - 1, 1, -1):
                slot = tables.entry_address(la, level)
                entries[slot] = self.vm.read_u64(slot)
        return entries

    def pde_address(self, la: int) -> int:
        """GPA of the page-directory entry on ``la``'s path in the kernel's tables."""
        return self.kernel.kernel_tables.entry_address(la, 2)


# -- the access stream --------------------------------------------------------------------------


@dataclass(frozen=True)
class CodeWrite:
    """An 8-byte store that carries its value: a static-key patch, a direct hook, or a store of
    the other attacks (:mod:`eptlab.apps.integrity_attacks`) or of guest page-table updates."""

    index: int  # position in the stream
    gpa: int  # the guest-physical word written (as the guest meant it)
    value: int
    legitimate: bool
    label: str  # "static-key", "hook", "pt-update" or an attack's store label
    gva: int = 0  # the linear address it is written through (0: the direct map of ``gpa``)


PAGE_TABLE_STORES = frozenset({"remap-pde", "alias-pde", "pt-update"})
"""Labels of the stores that write guest paging entries."""


class StoreInsert(NamedTuple):
    """A store to insert into a base stream: before base position ``pos``, write ``value`` at
    ``gpa`` through linear address ``gva`` (None: the direct map)."""

    pos: int
    gpa: int
    value: int
    legitimate: bool
    label: str
    gva: int | None = None


@dataclass
class Stream:
    """Accesses (signed GVAs, kinds 0 read / 1 write / 2 fetch) and the code writes among them,
    with their values."""

    gva: npt.NDArray[np.int64]
    kind: npt.NDArray[np.int8]
    writes: list[CodeWrite] = field(default_factory=list)
    attacks: list[Attack] = field(default_factory=list)  # remap, alias, restore

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
        """The direct hooks (the other attacks' stores: :meth:`labelled`)."""
        return [w for w in self.writes if not w.legitimate and w.label == "hook"]

    @property
    def patches(self) -> list[CodeWrite]:
        """The static-key patches."""
        return [w for w in self.writes if w.legitimate and w.label == "static-key"]

    @property
    def barriers(self) -> list[int]:
        """Positions right after each page-table store (see
        :class:`eptlab.hv.guest_runner.GuestRunner`): later walks see the entry written."""
        return [w.index + 1 for w in self.writes if w.label in PAGE_TABLE_STORES]

    def labelled(self, label: str) -> list[CodeWrite]:
        """The stores with ``label``, in stream order."""
        return [w for w in self.writes if w.label == label]

    @classmethod
    def build(
        cls,
        gva: npt.NDArray[np.int64],
        kind: npt.NDArray[np.int8],
        inserts: Iterable[tuple[int, int, int, bool, str] | StoreInsert],
    ) -> Stream:
        """Insert stores ``(before position, gpa, value, legitimate, label[, gva])`` into a base
        stream (stable: same-position inserts keep their order); without a ``gva`` they are
        written through the direct map."""
        full = [StoreInsert(*t) for t in inserts]
        items = sorted(enumerate(full), key=lambda t: (t[1].pos, t[0]))
        positions = np.array([it.pos for _, it in items], np.int64)
        linear = [
            DIRECT_MAP_BASE + it.gpa if it.gva is None else it.gva for _, it in items
        ]
        addresses = np.array([_signed(a) for a in linear], np.int64)
        out_gva = np.insert(gva, positions, addresses) if len(items) else gva.copy()
        out_kind = np.insert(kind, positions, np.ones(len(items), np.int8)) if items else kind
        writes = [
            CodeWrite(it.pos + k, it.gpa, it.value, it.legitimate, it.label, la)
            for k, ((_, it), la) in enumerate(zip(items, linear, strict=True))
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
    remap_attacks: int = 0  # page-table remapping attacks (eptlab.apps.integrity_attacks)
    alias_attacks: int = 0  # writable aliases of a code page, written through
    restore_attacks: int = 0  # hooks written, then the original word written back
    restore_gap: int = 200  # base-stream accesses between a hook and its restore
    pt_updates: int = 0  # ordinary guest writes of page-directory entries near the code

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
        inserts: list[tuple[int, int, int, bool, str] | StoreInsert] = []
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
        from .integrity_attacks import attack_inserts

        attacks, more = attack_inserts(guest, self, np.random.default_rng([self.seed, 3]))
        stream = Stream.build(gva, kind, [*inserts, *more])
        stream.attacks = attacks
        return stream

