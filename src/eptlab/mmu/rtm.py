"""Restricted transactional memory (Intel TSX RTM): the architectural model.

What is modelled, and where each rule comes from (Intel SDM):

* XBEGIN starts transactional execution, or nests it one level deeper; past the implementation's
  maximum nesting depth it aborts (Vol. 2, XBEGIN "Operation": ``RTM_NEST_COUNT <
  MAX_RTM_NEST_COUNT``, else ``RTM_ABORT_PROCESSING``). XEND ends one level; the outermost XEND
  commits. XEND outside a transaction is #GP(0) (Vol. 2, XEND). XABORT imm8 aborts; outside a
  transaction it is a NOP (Vol. 2, XABORT).
* An abort discards the memory updates of the transaction, restores the registers, sets EAX to
  the abort status and resumes at the fallback address of the *outermost* XBEGIN (Vol. 2,
  XABORT "Operation": ``RTM_ABORT_PROCESSING``). A commit makes all the transaction's stores
  visible at once (Vol. 1 §16.3.6 "RTM Memory Ordering").
* The abort status in EAX (Vol. 1 §16.3.5 "RTM Abort Status Definition", Table 16-1): bit 0 the
  abort came from XABORT (then bits 31:24 hold its imm8), bit 1 the transaction may succeed on a
  retry (always clear when bit 0 is set), bit 2 another logical processor conflicted with a
  memory address of the transaction, bit 3 an internal buffer overflowed (capacity), bit 4 a
  debug breakpoint was hit, bit 5 the abort happened inside a nested transaction. The SDM adds
  that EAX can be 0 after an abort whose cause "may not satisfy the requirements for setting any
  of the EAX bits" (its example: CPUID inside an RTM region).
* Faults are not delivered: "Any fault or trap in a transactional region that must be exposed to
  software will be suppressed. Transactional execution will abort ... as if the fault or trap had
  never occurred" (Vol. 1 §16.3.8.2 "Runtime Considerations"). A guest #PF inside a transaction
  therefore never reaches the guest kernel: the transaction aborts and the page stays unmapped.

Our choices where the SDM leaves room (each is a field or a constant here):

* Abort status per cause: conflict -> CONFLICT | RETRY; capacity -> CAPACITY; XABORT -> XABORT
  | imm8 << 24; nesting overflow -> 0; anything that leaves the processor (a VM exit: EPT
  violation, EPT misconfiguration, PML log full, an interrupt or the preemption timer, an IPI)
  and a suppressed fault -> 0, as the SDM's "EAX can be 0" allows. NESTED is added when the
  abort happens at depth > 1.
* A VM exit inside a transaction aborts it *and is still delivered* to the hypervisor, which
  handles it (backs the page, breaks copy-on-write, drains the PML log); the guest then resumes
  at its abort path with the status in EAX. (The SDM's §16.3.8.2 discusses instructions that
  cause VM exits inside a transactional region; EPT violations and PML-full are events of a
  memory access, not instructions, and the hypervisor must see them for a retry to succeed.)
* Read and write sets are tracked per 64-byte physical line. The write set lives in the L1 data
  cache: more distinct written lines in one L1 set than it has ways is a capacity abort (48 KiB,
  12-way, 64 sets by default, as :class:`~eptlab.mmu.config.CacheConfig`'s L1). The read set is
  bounded by a total line count (``read_lines``, 4 MiB worth by default: read-set tracking
  extends beyond the L1). Instruction fetches are not tracked.
* Conflicts are requester-wins with strong isolation: an access by any logical processor,
  transactional or not, to a line in another processor's write set, or a write to a line in its
  read set, aborts *that other* transaction (CONFLICT | RETRY); the requester goes on.
* Side effects that hardware does not roll back stay: accessed/dirty flags set by the walks of
  an aborted transaction (in guest page tables and in the EPT), PML log entries of its writes
  (a page can be logged dirty though its store was discarded), TLB and cache fills.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from functools import cached_property

import numpy as np
import numpy.typing as npt

from ..errors import ConfigError
from .config import CacheLevel

I64 = npt.NDArray[np.int64]
U64 = (1 << 64) - 1
LINE_SHIFT = 6

# -- the abort status in EAX (SDM Vol. 1 §16.3.5, Table 16-1) ----------------------------------

XABORT_EXPLICIT = 1 << 0
XABORT_RETRY = 1 << 1
XABORT_CONFLICT = 1 << 2
XABORT_CAPACITY = 1 << 3
XABORT_DEBUG = 1 << 4
XABORT_NESTED = 1 << 5
XABORT_CODE_SHIFT = 24
MAX_NESTING = 7  # MAX_RTM_NEST_COUNT of current implementations (implementation-specific)


def xabort_code(status: int) -> int:
    """The XABORT imm8 in bits 31:24 (meaningful only when bit 0 is set)."""
    return (status >> XABORT_CODE_SHIFT) & 0xFF


class AbortCause(StrEnum):
    """Why a transaction aborted (what the model knows; EAX tells the guest much less)."""

    XABORT = "xabort"
    CONFLICT = "conflict"
    CAPACITY = "capacity"
    NESTING = "nesting"
    DEBUG = "debug"
    EPT_VIOLATION = "ept_violation"
    EPT_MISCONFIG = "ept_misconfig"
    PML_FULL = "pml_full"
    GUEST_FAULT = "guest_fault"  # a #PF / #GP, suppressed
    TIMER = "timer"  # VMX-preemption timer / external interrupt exit
    IPI = "ipi"  # another vCPU's shootdown interrupted this one


EXIT_CAUSES = frozenset(
    {
        AbortCause.EPT_VIOLATION,
        AbortCause.EPT_MISCONFIG,
        AbortCause.PML_FULL,
        AbortCause.TIMER,
        AbortCause.IPI,
    }
)
"""Causes that are VM exits: the hypervisor sees them."""


def abort_status(cause: AbortCause, depth: int, imm8: int = 0) -> int:
    """EAX after an abort for ``cause`` at nesting ``depth`` (see the module docstring)."""
    if cause is AbortCause.XABORT:
        status = XABORT_EXPLICIT | (imm8 & 0xFF) << XABORT_CODE_SHIFT
    elif cause is AbortCause.CONFLICT:
        status = XABORT_CONFLICT | XABORT_RETRY
    elif cause is AbortCause.CAPACITY:
        status = XABORT_CAPACITY
    elif cause is AbortCause.DEBUG:
        status = XABORT_DEBUG
    else:
        status = 0
    if depth > 1:
        status |= XABORT_NESTED
    return status


# -- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RtmConfig:
    """Capacity limits of the transactional buffers."""

    write_sets: int = 64  # L1D sets (48 KiB / 12 ways / 64 B)
    write_ways: int = 12
    read_lines: int = 65_536  # 4 MiB of lines
    max_nesting: int = MAX_NESTING

    def __post_init__(self) -> None:
        if self.write_sets < 1 or self.write_sets & (self.write_sets - 1):
            raise ConfigError("write_sets", f"{self.write_sets} is not a power of two")
        if self.write_ways < 1 or self.read_lines < 1:
            raise ConfigError("write_ways/read_lines", "must be positive")
        if self.max_nesting < 1:
            raise ConfigError("max_nesting", "must be at least 1")

    @classmethod
    def from_l1(cls, l1: CacheLevel, **kw: int) -> RtmConfig:
        """The write set bounded by the L1 data cache ``l1``."""
        if not l1.sets:
            raise ConfigError("l1", "a disabled L1 cannot hold a write set")
        return cls(write_sets=l1.sets, write_ways=l1.ways, **kw)


# -- the instruction stream -----------------------------------------------------------------------


class Op(IntEnum):
    """Entries of a logical processor's instruction stream.

    READ, WRITE and FETCH are memory accesses (the engine's kinds 0, 1, 2). ADD is a locked
    read-modify-write of an 8-byte word (``word += value``): a write for paging, in both the read
    and the write set. XBEGIN, XEND and XABORT are the RTM instructions (XABORT's imm8 in
    ``value``). TEST_ABORT is the lock-elision idiom ``mov rax, [gva]; test rax, rax; jz 1f;
    xabort imm8; 1:`` -- a load, and an XABORT with ``value`` as imm8 if the word is nonzero.
    """

    READ = 0
    WRITE = 1
    FETCH = 2
    ADD = 3
    XBEGIN = 4
    XEND = 5
    XABORT = 6
    TEST_ABORT = 7


BOUNDARY_OPS = (Op.XBEGIN, Op.XEND, Op.XABORT, Op.TEST_ABORT)
"""Entries executed one at a time between runs of plain accesses."""


@dataclass(frozen=True)
class TxStream:
    """One logical processor's stream: parallel arrays ``op`` (:class:`Op`), ``gva`` (the address
    of a memory entry, 0 for markers) and ``value`` (a WRITE's value, an ADD's addend, an
    XABORT's or TEST_ABORT's imm8; uint64 bits held as int64).

    Transactions are the index ranges between an XBEGIN and its matching XEND: markers are
    entries of the stream, so nesting and XABORT anywhere need no side table. The engine sees
    only the memory entries (ADD as a write, TEST_ABORT as a read)."""

    op: npt.NDArray[np.int8]
    gva: I64
    value: I64

    def __post_init__(self) -> None:
        if not len(self.op) == len(self.gva) == len(self.value):
            raise ConfigError("TxStream", "op, gva and value must have the same length")
        if len(self.op) and (int(self.op.min()) < 0 or int(self.op.max()) > int(Op.TEST_ABORT)):
            raise ConfigError("TxStream.op", "an entry is not an Op")

    def __len__(self) -> int:
        return int(self.op.shape[0])

    @classmethod
    def of(cls, entries: Iterable[tuple[Op, int, int] | tuple[Op, int] | tuple[Op]]) -> TxStream:
        """From ``(op, gva, value)`` tuples (gva and value default to 0)."""
        rows = [tuple(e) + (0, 0)[len(e) - 1 :] for e in entries]
        return cls(
            np.array([int(r[0]) for r in rows], np.int8),
            np.array([_signed(int(r[1])) for r in rows], np.int64),
            np.array([_signed(int(r[2])) for r in rows], np.int64),
        )

    @classmethod
    def accesses(
        cls, gva: npt.ArrayLike, op: npt.ArrayLike | int = Op.READ, value: npt.ArrayLike | int = 0
    ) -> TxStream:
        """Memory entries only (vectorized)."""
        g = np.ascontiguousarray(gva, np.int64)
        n = len(g)
        return cls(
            np.ascontiguousarray(np.broadcast_to(np.asarray(op, np.int8), (n,))),
            g,
            np.ascontiguousarray(np.broadcast_to(np.asarray(value, np.int64), (n,))),
        )

    @classmethod
    def marker(cls, op: Op, value: int = 0) -> TxStream:
        """A one-element stream holding the marker ``op`` (XBEGIN, XEND, XABORT, ...) with
        ``value``."""
        return cls.of([(op, 0, value)])

    @classmethod
    def concat(cls, parts: Iterable[TxStream]) -> TxStream:
        """The streams one after the other."""
        parts = list(parts)
        if not parts:
            return cls.of([])
        return cls(
            np.concatenate([p.op for p in parts]),
            np.concatenate([p.gva for p in parts]),
            np.concatenate([p.value for p in parts]),
        )

    def __add__(self, other: TxStream) -> TxStream:
        return TxStream.concat([self, other])

    @cached_property
    def next_boundary(self) -> I64:
        """For each index, the first index at or after it holding a boundary op (or len)."""
        n = len(self)
        marks = np.flatnonzero(np.isin(self.op, np.array(BOUNDARY_OPS, np.int8)))
        if not len(marks):
            return np.full(n, n, np.int64)
        at = np.searchsorted(marks, np.arange(n))
        return np.where(at < len(marks), marks[np.minimum(at, len(marks) - 1)], n)

    @cached_property
    def is_memory(self) -> npt.NDArray[np.bool_]:
        """Mask of the elements that are memory accesses (not markers)."""
        return self.op <= Op.ADD


def _signed(value: int) -> int:
    value &= U64
    return value - (1 << 64) if value >> 63 else value


# -- one logical processor's transactional state --------------------------------------------------


@dataclass
class TxState:
    """The RTM state of one logical processor: nesting depth, the outermost XBEGIN, the read
    and write sets (physical 64-byte lines), the per-L1-set count of written lines and the write
    buffer (8-byte word HPA -> value, invisible until commit)."""

    config: RtmConfig
    depth: int = 0
    begin: int = -1  # stream index of the outermost XBEGIN
    read: set[int] = field(default_factory=set)
    write: set[int] = field(default_factory=set)
    buffer: dict[int, int] = field(default_factory=dict)
    per_set: I64 = field(init=False)
    _arrays: tuple[I64, I64] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.per_set = np.zeros(self.config.write_sets, np.int64)

    @property
    def active(self) -> bool:
        """Whether a transaction is open."""
        return self.depth > 0

    def start(self, begin: int) -> None:
        """Open a transaction that began at stream position ``begin`` (read and write sets empty).
        """
        self.reset()
        self.depth, self.begin = 1, begin

    def reset(self) -> None:
        """Leave transactional execution: sets and buffer are dropped."""
        self.depth, self.begin = 0, -1
        self.read.clear()
        self.write.clear()
        self.buffer.clear()
        self.per_set[:] = 0
        self._arrays = None

    def arrays(self) -> tuple[I64, I64]:
        """(read set, write set) as sorted arrays (cached until the sets change)."""
        if self._arrays is None:
            self._arrays = (
                np.sort(np.fromiter(self.read, np.int64, len(self.read))),
                np.sort(np.fromiter(self.write, np.int64, len(self.write))),
            )
        return self._arrays

    def track(self, read_lines: I64, write_lines: I64) -> None:
        """Add performed accesses to the sets."""
        if len(read_lines):
            self.read.update(read_lines.tolist())
        mask = self.config.write_sets - 1
        for line in write_lines.tolist():
            if line not in self.write:
                self.write.add(line)
                self.per_set[line & mask] += 1
        self._arrays = None

    def overflows(self) -> bool:
        """Whether the sets exceed the capacity limits (never true after :meth:`track` of
        accesses the model let through)."""
        return bool(self.per_set.max() > self.config.write_ways) or len(
            self.read
        ) > self.config.read_lines


def first_capacity_overflow(
    state: TxState, lines: I64, is_read: npt.NDArray[np.bool_], is_write: npt.NDArray[np.bool_]
) -> int:
    """Index of the first of these accesses (in order, all by the processor owning ``state``)
    that would overflow its write set (an L1 set over its ways) or its read set; len if none."""
    n = len(lines)
    first = n
    old_read, old_write = state.arrays()
    cfg = state.config
    w = np.flatnonzero(is_write)
    if len(w):
        lw = lines[w]
        uniq, at = np.unique(lw, return_index=True)
        new = ~np.isin(uniq, old_write)
        pos = np.sort(w[at[new]])
        if len(pos):
            sets = lines[pos] & (cfg.write_sets - 1)
            order = np.argsort(sets, kind="stable")
            s_sorted = sets[order]
            rank = np.arange(len(pos)) - np.searchsorted(s_sorted, s_sorted, "left")
            over = pos[order][state.per_set[s_sorted] + rank + 1 > cfg.write_ways]
            if len(over):
                first = min(first, int(over.min()))
    r = np.flatnonzero(is_read)
    if len(r):
        uniq, at = np.unique(lines[r], return_index=True)
        new = ~np.isin(uniq, old_read)
        pos = np.sort(r[at[new]])
        room = cfg.read_lines - len(state.read)
        if len(pos) > room:
            first = min(first, int(pos[max(0, room)]))
    return first


def conflicts_with(
    victim: TxState,
    victim_index: int,
    owner: npt.NDArray[np.int32],
    lines: I64,
    is_read: npt.NDArray[np.bool_],
    is_write: npt.NDArray[np.bool_],
) -> npt.NDArray[np.bool_]:
    """For each access of an interleaved run (``owner`` = the processor of each), whether it
    conflicts with ``victim``'s transaction at that moment: another processor's access to a
    line in the victim's write set, or its write to a line in the victim's read set. The sets
    grow with the victim's own accesses earlier in the run (which must all be transactional)."""
    n = len(lines)
    old_read, old_write = victim.arrays()
    in_write = np.isin(lines, old_write)
    in_any = in_write | np.isin(lines, old_read)
    own = owner == victim_index
    mine = np.flatnonzero(own)
    if len(mine):
        index = np.arange(n)
        tracked = mine[(is_read | is_write)[mine]]
        for subset, target in ((mine[is_write[mine]], "w"), (tracked, "a")):
            if not len(subset):
                continue
            uniq, at = np.unique(lines[subset], return_index=True)
            first_at = subset[at]
            k = np.minimum(np.searchsorted(uniq, lines), len(uniq) - 1)
            earlier = (uniq[k] == lines) & (first_at[k] < index)
            if target == "w":
                in_write |= earlier
            else:
                in_any |= earlier
    result: npt.NDArray[np.bool_] = ~own & (in_write | (is_write & in_any))
    return result
