"""The fast translation engine: the Python side of the numba kernels.

It owns the state objects (guest registers, VMCS fields) and the arrays of the hardware caches,
packs registers into arrays for each run, runs a chunk of accesses through
:func:`kernels.run.run_chunk`, and turns the status it returns into an exit record. It also
implements the invalidation instructions (INVLPG, INVVPID, INVEPT, MOV to CR3) on the cached
state, with SDM semantics: nothing cached is dropped unless an invalidation says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from ..arch.access import Access, Mode
from ..arch.exits import (
    EptMisconfig,
    EptViolation,
    GuestFault,
    PmlFull,
    VmExit,
)
from ..errors import ConfigError
from ..memory.physical import PhysicalMemory
from .config import PREFETCHER_KINDS, MmuConfig
from .context import CpuFeatures, GuestState, Vmcs
from .kernels import assoc as planes
from .kernels import layout as L
from .kernels import protect as _protect
from .kernels import run as _run
from .kernels.state import Caches, Log, Machine, Memory, Stream
from .kernels.walk import NSCRATCH
from .protection import ProtectionStats, config_vector, rmp_tags
from .stats import VcpuStats
from .walker import DATA, Dim, Reference

I64 = npt.NDArray[np.int64]
_run_chunk = cast(Callable[..., int], _run.run_chunk)  # a numba dispatcher
_protect_pass = cast(Callable[..., int], _protect.protect_pass)
PROTECTED_CHUNK = 4096  # accesses per kernel call when a protection pass reads the log
REFS_PER_ACCESS = 64  # log rows per access a protected run allocates (a walk reads <= 35)
U64_MASK = (1 << 64) - 1
FRAME_TABLE_SLACK = 16  # a direct frame table may span this many times the backed frames


def frame_table(htable: I64) -> tuple[npt.NDArray[np.int32], I64]:
    """``(frames, [base])`` with ``frames[pfn - base]`` the row of each backed frame (-1: none),
    built from the memory's hash table; empty when the frames are too sparse for it to pay
    (then the kernels use the hash table alone)."""
    live = htable[:, 0] >= 0
    pfns, rows = htable[live, 0], htable[live, 1]
    if not len(pfns):
        return np.zeros(0, np.int32), np.zeros(1, np.int64)
    base = int(pfns.min())
    span = int(pfns.max()) - base + 1
    if span > FRAME_TABLE_SLACK * len(pfns) + (1 << 16) or int(rows.max()) >= 1 << 31:
        return np.zeros(0, np.int32), np.zeros(1, np.int64)
    frames = np.full(span, -1, np.int32)
    frames[pfns - base] = rows
    return frames, np.array([base], np.int64)


def _signed(value: int) -> int:
    """A 64-bit value as the int64 the kernels use."""
    value &= U64_MASK
    return value - (1 << 64) if value >> 63 else value


def _writable(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """``array``, or a copy of it where it is read-only (a broadcast scalar, a buffer): numba
    compiles a kernel once per argument type, and a read-only array is another type, so every
    run passes writable ones and the kernel is compiled once (a compile takes tens of seconds)."""
    return array if array.flags.writeable else array.copy()


@dataclass(frozen=True)
class Accesses:
    """A chunk of accesses as numpy arrays of equal length."""

    gva: I64
    kind: npt.NDArray[np.int8]
    user: npt.NDArray[np.int8]
    vcpu: npt.NDArray[np.int32]

    @classmethod
    def build(
        cls,
        gva: npt.ArrayLike,
        kind: npt.ArrayLike | int = Access.READ,
        user: npt.ArrayLike | int = 0,
        vcpu: npt.ArrayLike | int = 0,
    ) -> Accesses:
        """Broadcast scalars; addresses may be given unsigned (canonical high half) or signed."""
        if isinstance(gva, np.ndarray) and gva.dtype == np.uint64:
            g = np.ascontiguousarray(gva).view(np.int64)
        elif isinstance(gva, np.ndarray) and gva.dtype.kind == "i":
            g = np.ascontiguousarray(gva, np.int64)
        else:  # Python ints, possibly >= 2**63
            g = np.fromiter((_signed(int(x)) for x in np.asarray(gva, object).ravel()), np.int64)
        n = g.shape[0]
        k = np.ascontiguousarray(np.broadcast_to(np.asarray(kind, np.int8), (n,)))
        u = np.ascontiguousarray(np.broadcast_to(np.asarray(user, np.int8), (n,)))
        v = np.ascontiguousarray(np.broadcast_to(np.asarray(vcpu, np.int32), (n,)))
        if n and (k.min() < 0 or k.max() > 2):
            raise ConfigError("Accesses.kind", "must be 0 (read), 1 (write) or 2 (fetch)")
        return cls(g, k, u, v)

    def __len__(self) -> int:
        return int(self.gva.shape[0])


@dataclass(frozen=True)
class ChunkResult:
    """How far a run got and why it stopped."""

    stopped_at: int  # index of the first access not performed (== len when all were)
    exit: VmExit | None = None
    fault: GuestFault | None = None
    hpa: I64 | None = None  # per access, when recorded
    references: list[Reference] = field(default_factory=list)  # when logged
    reference_access: list[int] = field(default_factory=list)  # access index of each reference

    @property
    def done(self) -> bool:
        """Whether the chunk ran to its end (no exit and no guest fault stopped it)."""
        return self.exit is None and self.fault is None


class InveptType(IntEnum):
    """INVEPT types (SDM Vol. 3C §30.3, INVEPT): one EPTP's mappings, or every EPTP's."""
    SINGLE_CONTEXT = 1
    ALL_CONTEXT = 2


class InvvpidType(IntEnum):
    """INVVPID types (SDM Vol. 3C §30.3, INVVPID): one address, one VPID, all VPIDs, one VPID but
    globals."""
    INDIVIDUAL_ADDRESS = 0
    SINGLE_CONTEXT = 1
    ALL_CONTEXT = 2
    SINGLE_CONTEXT_RETAINING_GLOBALS = 3


@dataclass
class _Vcpu:
    guest: GuestState
    vmcs: Vmcs | None


class Engine:
    """Runs chunks of accesses for a set of vCPUs sharing one host memory."""

    def __init__(
        self,
        memory: PhysicalMemory,
        config: MmuConfig | None = None,
        features: CpuFeatures | None = None,
    ) -> None:
        self.memory = memory
        self.config = config or MmuConfig()
        self.features = features or CpuFeatures()
        self.features.check_host_memory(memory.size)  # memory fits below any key-ID bits
        self._vcpus: list[_Vcpu] = []
        self._frames_at = -1  # memory generation the frame table was built at
        self._frames, self._frame_base = frame_table(np.zeros((0, 2), np.int64))
        self._ctx: dict[tuple[int, int], int] = {}
        self._ectx: dict[int, int] = {}
        self._feat = np.array(
            [
                self.features.maxphyaddr,
                int(self.features.ept_execute_only),
                int(self.features.advanced_ept_exit_info),
            ],
            np.int64,
        )
        c = self.config.cost
        cache = self.config.cache
        self._cost = np.array(
            [
                c.l1_tlb_hit,
                c.stlb_hit,
                c.psc_lookup,
                c.walk_start,
                cache.l1.latency,
                cache.l2.latency,
                cache.llc.latency,
                self.config.dram_cycles,  # memory encryption: decryption of each DRAM line
            ],
            np.int64,
        )
        # a confidential VM's classes, MACs and RMP checks: priced by a pass over the log
        self._protection = self.config.encryption.protection
        self._pcfg_vec = (
            config_vector(self.config.encryption, self.features)
            if self._protection is not None
            else np.zeros(_protect.NCFG, np.int64)
        )
        self._rmp = rmp_tags(self._protection)
        self._allocate()

    # -- vCPUs and contexts -------------------------------------------------------------------

    def add_vcpu(self, guest: GuestState, vmcs: Vmcs | None) -> int:
        """Register a vCPU; returns its index. (Caches are resized and emptied.)"""
        self._vcpus.append(_Vcpu(guest, vmcs))
        self._allocate()
        return len(self._vcpus) - 1

    def vcpu_state(self, vcpu: int) -> tuple[GuestState, Vmcs | None]:
        """The guest registers and VMCS of engine vCPU ``vcpu`` (the objects the engine reads)."""
        v = self._vcpus[vcpu]
        return v.guest, v.vmcs

    def _eptp_value(self, vmcs: Vmcs | None) -> int:
        return -1 if vmcs is None else vmcs.eptp.encode()

    def _context(self, vcpu: _Vcpu) -> tuple[int, int]:
        eptp = self._eptp_value(vcpu.vmcs)
        vpid = 0 if vcpu.vmcs is None else vcpu.vmcs.vpid
        ctx = self._ctx.setdefault((vpid, eptp), len(self._ctx))
        ectx = self._ectx.setdefault(eptp, len(self._ectx))
        if ctx >= 1 << 16 or ectx >= 1 << 16:
            raise ConfigError("contexts", "more than 65536 (VPID, EPTP) contexts")
        return ctx, ectx

    # -- arrays ---------------------------------------------------------------------------------

    def _allocate(self) -> None:
        nv = max(1, len(self._vcpus))
        structures = self.config.tlb.structures()
        desc = np.zeros((L.NSTRUCT, 3), np.int64)
        row = 0
        max_ways = 1
        for i, (_, shape) in enumerate(structures):
            desc[i] = (row, shape.sets, shape.ways)
            row += shape.sets * nv
            max_ways = max(max_ways, shape.ways)
        self._tlb = np.zeros((max(1, row), planes.NPLANES, max_ways), np.int64)
        self._tlb[:, planes.TAGS, :] = -1
        self._desc = desc
        levels = (self.config.cache.l1, self.config.cache.l2, self.config.cache.llc)
        cdesc = np.zeros((L.NCACHE, 4), np.int64)
        row = 0
        cways = 1
        for i, level in enumerate(levels):
            per_vcpu = i < 2
            cdesc[i] = (row, level.sets, level.ways, int(per_vcpu))
            row += level.sets * (nv if per_vcpu else 1)
            cways = max(cways, level.ways)
        self._cache = np.full((max(1, row), cways), -1, np.int64)  # line tags
        self._heads = np.zeros(max(1, row), np.int32)  # per row: way of the most recent line
        self._cdesc = cdesc
        self._stats = np.zeros((nv, L.NSTATS), np.int64)
        self._pstats = np.zeros((nv, _protect.NX), np.int64)
        self._rmp[:] = -1
        pcfg = self.config.cache.prefetcher
        self._pcfg = np.array(
            [
                PREFETCHER_KINDS.index(pcfg.kind),
                pcfg.degree,
                pcfg.distance,
                pcfg.streams,
                int(pcfg.l1_next_line),
            ],
            np.int64,
        )
        self._pf = np.full((nv, pcfg.streams + 1, L.NPF), -1, np.int64)  # stream table: empty
        self._occupied = np.zeros(nv, np.int64)  # per vCPU: structures that hold entries
        self._scratch = np.zeros((NSCRATCH, 5), np.int64)  # the kernels allocate nothing
        self._caches = Caches(
            self._tlb, self._desc, self._cache, self._cdesc, self._heads, self._pf, self._pcfg
        )

    def _pack_registers(self) -> I64:
        regs = np.zeros((max(1, len(self._vcpus)), L.NREGS), np.int64)
        for i, v in enumerate(self._vcpus):
            g = v.guest
            regs[i, L.REG_CR0] = g.cr0
            regs[i, L.REG_CR3] = g.cr3
            regs[i, L.REG_CR4] = g.cr4
            regs[i, L.REG_EFER] = g.efer
            regs[i, L.REG_PKRU] = g.pkru
            regs[i, L.REG_RFLAGS] = g.rflags
            ctx, ectx = self._context(v)
            regs[i, L.REG_CTX] = ctx
            regs[i, L.REG_ECTX] = ectx
            regs[i, L.REG_OCCUPIED] = self._occupied[i]
            if v.vmcs is not None:
                m = v.vmcs
                regs[i, L.REG_USE_EPT] = 1
                regs[i, L.REG_EPT_ROOT] = m.eptp.root
                regs[i, L.REG_EPT_LEVELS] = m.eptp.levels
                regs[i, L.REG_EPT_AD] = int(m.eptp.ad_enabled)
                regs[i, L.REG_MBEC] = int(m.mbec)
                regs[i, L.REG_PML_ON] = int(m.pml_enabled)
                regs[i, L.REG_PML_ADDR] = m.pml_address
                regs[i, L.REG_PML_INDEX] = m.pml_index
                if m.pml_enabled:
                    self.memory.frame(m.pml_address >> 12)  # the log page must have storage
        return regs

    # -- running ------------------------------------------------------------------------------

    def run(
        self,
        accesses: Accesses,
        start: int = 0,
        *,
        record_hpa: bool = False,
        log_references: int = 0,
    ) -> ChunkResult:
        """Run ``accesses[start:]`` until done or until an exit or guest fault.

        ``record_hpa`` returns each performed access's HPA; ``log_references`` keeps up to that
        many walk references (for comparing with the reference walker). With a
        :class:`~eptlab.mmu.config.Protection` the accesses run in pieces of
        :data:`PROTECTED_CHUNK`, each priced by the protection pass from its log."""
        self._check_run(accesses)
        if self._protection is None:
            return self._run(accesses, start, record_hpa, log_references)
        stopped, n = start, len(accesses)
        hpas: list[I64] = []
        references: list[Reference] = []
        indices: list[int] = []
        while True:
            hi = min(n, stopped + PROTECTED_CHUNK)
            cut = slice(stopped, hi)
            piece = Accesses(accesses.gva[cut], accesses.kind[cut], accesses.user[cut],
                             accesses.vcpu[cut])
            want = max(0, log_references - len(references))
            result = self._run(piece, 0, True, want, protect=True)
            assert result.hpa is not None
            hpas.append(result.hpa[: result.stopped_at])
            references += result.references
            indices += [stopped + i for i in result.reference_access]
            stopped += result.stopped_at
            if not result.done or stopped >= n:
                break
        hpa = np.full(n, -1, np.int64)
        hpa[start:stopped] = np.concatenate(hpas) if hpas else hpa[:0]
        return ChunkResult(
            stopped, result.exit, result.fault, hpa if record_hpa else None, references, indices
        )

    def _check_run(self, accesses: Accesses) -> None:
        if not self._vcpus:
            raise ConfigError("Engine", "add a vCPU before running")
        if any(v.vmcs is not None and v.vmcs.vt_rp for v in self._vcpus):
            raise ConfigError(
                "Vmcs",
                "the fast engine does not model HLAT, paging-write or guest-paging verification:"
                " translate with the reference walker (eptlab.mmu.walker)",
            )
        if len(accesses) and int(accesses.vcpu.max()) >= len(self._vcpus):
            raise ConfigError("Accesses.vcpu", f"only {len(self._vcpus)} vCPUs exist")

    def _run(
        self,
        accesses: Accesses,
        start: int,
        record_hpa: bool,
        log_references: int,
        *,
        protect: bool = False,
    ) -> ChunkResult:
        regs = self._pack_registers()
        rows = max(log_references, REFS_PER_ACCESS * len(accesses)) if protect else log_references
        refs = np.zeros((rows, L.NREFCOLS), np.int64)
        ref_count = np.zeros(1, np.int64)
        exit_info = np.zeros(L.NEXIT, np.int64)
        out_hpa = np.full(len(accesses) if record_hpa else 0, -1, np.int64)
        out_where = np.zeros(len(accesses) if record_hpa else 0, np.int8)
        log = Log(self._stats, refs, ref_count, exit_info, out_hpa, out_where, self._scratch)
        stopped = int(
            _run_chunk(
                Stream(_writable(accesses.gva), _writable(accesses.kind),
                       _writable(accesses.user), _writable(accesses.vcpu)),
                start,
                self._memory_bundle(),
                self._caches,
                Machine(regs, self._feat, self._cost),
                log,
            )
        )
        if protect:
            self._price(log, stopped, accesses.vcpu)
        _run.derive_totals(self._stats)
        self._occupied[:] = regs[:, L.REG_OCCUPIED]
        for i, v in enumerate(self._vcpus):  # the kernel advanced the PML index
            if v.vmcs is not None:
                v.vmcs.pml_index = int(regs[i, L.REG_PML_INDEX])
        exit_, fault = self._decode_exit(exit_info)
        n_refs = min(int(ref_count[0]), log_references)
        references = [
            Reference(
                Dim.GUEST if r[1] == 0 else Dim.EPT,
                int(r[2]),
                int(r[3]),
                int(r[4]) & U64_MASK,
                -1,
                int(r[5]) if r[5] else DATA,
            )
            for r in refs[:n_refs]
        ]
        return ChunkResult(
            stopped,
            exit_,
            fault,
            out_hpa if record_hpa else None,
            references,
            [int(r[0]) for r in refs[:n_refs]],
        )

    def _price(self, log: Log, stopped: int, vcpu: npt.NDArray[np.int32]) -> None:
        """The protection pass over one kernel call's log (accesses ``0..stopped-1``): its
        counters, and its cycles added to the statistics' translation and data cycles."""
        count = int(log.ref_count[0])
        if count > log.refs.shape[0]:
            raise RuntimeError(f"reference log overflow: {count} > {log.refs.shape[0]} rows")
        vmode = np.array(
            [
                (_protect.V_NESTED if v.vmcs is not None else 0)
                | (_protect.V_RMP if v.vmcs is not None and self._rmp_on else 0)
                for v in self._vcpus
            ],
            np.int64,
        )
        delta = np.zeros_like(self._pstats)
        _protect_pass(log.refs, count, stopped, log.out_hpa, log.out_where, vcpu, vmode,
                      self._pcfg_vec, self._rmp, delta)
        self._pstats += delta
        self._stats[:, L.ST_TRANSLATION_CYCLES] += delta[:, _protect.X_TRANSLATION_CYCLES]
        self._stats[:, L.ST_DATA_CYCLES] += delta[:, _protect.X_DATA_CYCLES]

    @property
    def _rmp_on(self) -> bool:
        return self._protection is not None and self._protection.rmp is not None

    def protection_stats(self, vcpu: int = 0) -> ProtectionStats:
        """The protection pass's counters of vCPU ``vcpu`` (all zero without a protection)."""
        return ProtectionStats.from_row(self._pstats[vcpu])

    def _memory_bundle(self) -> Memory:
        """The kernels' view of host memory, with a direct-indexed frame table over the backed
        frames when they are dense enough (rebuilt only when frames gained or lost storage)."""
        rows, htable = self.memory.kernel_arrays()
        generation = self.memory.generation
        if self._frames_at != generation:
            self._frames, self._frame_base = frame_table(htable)
            self._frames_at = generation
        return Memory(rows, htable, self._frames, self._frame_base)

    @staticmethod
    def _decode_exit(info: I64) -> tuple[VmExit | None, GuestFault | None]:
        kind = int(info[L.X_KIND])
        gla = int(info[L.X_GLA]) & U64_MASK
        if kind == L.EXIT_GUEST_FAULT:
            return None, GuestFault(int(info[L.X_VECTOR]), int(info[L.X_QUAL]), gla)
        if kind == L.EXIT_EPT_VIOLATION:
            return EptViolation(int(info[L.X_GPA]), gla, int(info[L.X_QUAL])), None
        if kind == L.EXIT_EPT_MISCONFIG:
            why = L.MISCONFIG_REASONS[int(info[L.X_WHY])]
            return EptMisconfig(int(info[L.X_GPA]), int(info[L.X_LEVEL]), why), None
        if kind == L.EXIT_PML_FULL:
            return PmlFull(), None
        return None, None

    def translate(
        self, gva: int, access: Access, mode: Mode = Mode.SUPERVISOR, vcpu: int = 0
    ) -> ChunkResult:
        """One access (convenient in tests and notebooks; slow in loops: use :meth:`run`)."""
        return self.run(Accesses.build([gva], access, int(mode), vcpu), record_hpa=True)

    # -- statistics -----------------------------------------------------------------------------

    def stats(self, vcpu: int = 0) -> VcpuStats:
        """A snapshot of vCPU ``vcpu``'s statistics."""
        return VcpuStats.from_row(self._stats[vcpu])

    @property
    def stats_rows(self) -> I64:
        """Every vCPU's statistics, live and read-only: shape (vCPUs, ``NSTATS``), columns
        indexed by the ``ST_*`` constants of :mod:`eptlab.mmu.kernels.layout`."""
        view = self._stats.view()
        view.flags.writeable = False
        return view

    @property
    def cost_vector(self) -> I64:
        """The cycle prices the kernels charge, read-only, indexed by the ``COST_*`` constants
        of :mod:`eptlab.mmu.kernels.layout`."""
        view = self._cost.view()
        view.flags.writeable = False
        return view

    def reset_stats(self) -> None:
        """Zero every vCPU's statistics (caches, TLBs and the RMP cache keep their contents)."""
        self._stats[:] = 0
        self._pstats[:] = 0

    # -- invalidation (SDM Vol. 3A §4.10.4, Vol. 3C §29.4.3) ------------------------------------

    def _drop(
        self,
        structures: list[int],
        *,
        vcpus: list[int] | None = None,
        ctxs: set[int] | None = None,
        keep_global: bool = False,
        key_for: dict[int, int] | None = None,
    ) -> None:
        """Invalidate entries of ``structures`` held by ``vcpus`` (all if None) that match the
        contexts, keys and globality given."""
        tags, data = self._tlb[:, planes.TAGS, :], self._tlb[:, planes.DATA, :]
        targets = range(max(1, len(self._vcpus))) if vcpus is None else vcpus
        only = next(iter(ctxs)) if ctxs is not None and len(ctxs) == 1 else None
        wanted = None if ctxs is None else np.array(sorted(ctxs), np.int64)
        for s in structures:
            first, sets, ways = (int(x) for x in self._desc[s])
            if sets == 0:
                continue
            for v in targets:
                block = slice(first + v * sets, first + (v + 1) * sets)
                t = tags[block, :ways]
                hit = t >= 0
                if only is not None:  # the common case, without np.isin's overhead
                    hit &= (t & 0xFFFF) == only
                elif wanted is not None:
                    hit &= np.isin(t & 0xFFFF, wanted)
                if key_for is not None and s in key_for:
                    hit &= (t >> 16) == key_for[s]
                if keep_global:
                    hit &= (data[block, :ways] & L.TF_GLOBAL) == 0
                t[hit] = -1

    _TLBS = list(range(L.S_L1D, L.S_STLB + 3))
    _PSCS = list(range(L.S_PSC, L.S_PSC + 4))
    _GPA_SIDE = list(range(L.S_NTLB, L.S_EPSC + 4))

    def _ctxs_of(self, *, vpid: int | None = None, eptp: int | None = None) -> set[int]:
        return {
            c
            for (vp, ep), c in self._ctx.items()
            if (vpid is None or vp == vpid) and (eptp is None or ep == eptp)
        }

    def _tlb_keys(self, gva: int) -> dict[int, int]:
        key = _signed(gva) & ((1 << 57) - 1)
        return {s: key >> (12 + 9 * ((s - L.S_L1D) % 3)) for s in self._TLBS}

    # Each instruction acts on the logical processor that executes it (SDM Vol. 3C §29.4.3):
    # ``vcpu``/``vcpus`` name it; ``vcpus=None`` applies it on every vCPU at once, which is what
    # a completed shootdown achieves.

    def invlpg(self, vcpu: int, gva: int) -> None:
        """INVLPG in the guest: the TLB entries for ``gva`` and all paging-structure-cache
        entries of the vCPU's current context (SDM Vol. 3A §4.10.4.1)."""
        ctx, _ = self._context(self._vcpus[vcpu])
        self._drop(self._TLBS, vcpus=[vcpu], ctxs={ctx}, key_for=self._tlb_keys(gva))
        self._drop(self._PSCS, vcpus=[vcpu], ctxs={ctx})

    def mov_cr3(self, vcpu: int, cr3: int) -> None:
        """MOV to CR3 (no PCIDs): new address space; non-global TLB entries and all
        paging-structure-cache entries of the context are invalidated (SDM §4.10.4.1)."""
        v = self._vcpus[vcpu]
        ctx, _ = self._context(v)
        v.guest.cr3 = cr3
        self._drop(self._TLBS, vcpus=[vcpu], ctxs={ctx}, keep_global=True)
        self._drop(self._PSCS, vcpus=[vcpu], ctxs={ctx})

    def invvpid(
        self,
        kind: InvvpidType,
        vpid: int = 0,
        gva: int | None = None,
        *,
        vcpus: list[int] | None = None,
    ) -> None:
        """INVVPID: linear and combined mappings of a VPID (SDM Vol. 3C §29.4.3.3)."""
        kind = InvvpidType(kind)
        ctxs = None if kind == InvvpidType.ALL_CONTEXT else self._ctxs_of(vpid=vpid)
        if kind == InvvpidType.INDIVIDUAL_ADDRESS:
            if gva is None:
                raise ConfigError("invvpid", "individual-address invalidation needs an address")
            self._drop(self._TLBS, vcpus=vcpus, ctxs=ctxs, key_for=self._tlb_keys(gva))
            self._drop(self._PSCS, vcpus=vcpus, ctxs=ctxs)
            return
        keep = kind == InvvpidType.SINGLE_CONTEXT_RETAINING_GLOBALS
        self._drop(self._TLBS, vcpus=vcpus, ctxs=ctxs, keep_global=keep)
        self._drop(self._PSCS, vcpus=vcpus, ctxs=ctxs)

    def invept(
        self, kind: InveptType, eptp: int | None = None, *, vcpus: list[int] | None = None
    ) -> None:
        """INVEPT: guest-physical and combined mappings of one EPTP (single-context) or of all
        (SDM Vol. 3C §29.4.3.1). ``eptp`` is the encoded EPTP value."""
        kind = InveptType(kind)
        if kind == InveptType.ALL_CONTEXT:
            self._drop(self._TLBS + self._PSCS + self._GPA_SIDE, vcpus=vcpus)
            return
        if eptp is None:
            raise ConfigError("invept", "single-context invalidation needs an EPTP")
        self._drop(self._TLBS + self._PSCS, vcpus=vcpus, ctxs=self._ctxs_of(eptp=eptp))
        ectx = self._ectx.get(eptp)
        if ectx is not None:
            self._drop(self._GPA_SIDE, vcpus=vcpus, ctxs={ectx})

    def flush_caches(self) -> None:
        """Empty the data-cache model and the prefetcher's stream table (e.g. between benchmark
        phases)."""
        self._cache[:] = -1
        self._heads[:] = 0
        self._pf[:] = -1
