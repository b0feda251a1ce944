"""Run one case through the reference walker, the fast engine and (its result) Bochs, and put
the three outcomes in one comparable form: a dict of fields."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..arch.exits import EptMisconfig, EptViolation, GuestFault, PmlFull, VmExit
from ..mmu.config import CacheConfig, MmuConfig, TlbConfig
from ..mmu.engine import Engine
from ..mmu.walker import ReferenceWalker
from .cases import FEATURES, Case

Fields = dict[str, object]
FIELDS = ("outcome", "vector", "error_code", "address", "qualification", "gpa", "gla",
          "flags", "pml_log", "pml_index")  # fmt: skip

VMCALL, EXCEPTION, EPT_VIOLATION, EPT_MISCONFIG, PML_FULL = 18, 0, 48, 49, 62
UNCACHED = MmuConfig(tlb=TlbConfig.disabled(), cache=CacheConfig.disabled())
"""No TLBs, no paging-structure caches and no data caches (costs are not compared): one cold
walk per case, and small arrays for an engine built per case."""
QUALIFICATION_MASK = 0xFFF  # bits 0-11; bit 12 (NMI unblocking) is not about translation


def _changes(case: Case, read: Callable[[int], int]) -> frozenset[tuple[int, int]]:
    return frozenset((a, read(a)) for a, v in case.words() if read(a) != v)


def _outcome(
    exit_: VmExit | None, fault: GuestFault | None
) -> Fields:
    if fault is not None:
        return {"outcome": "fault", "vector": fault.vector, "error_code": fault.error_code,
                "address": fault.address}  # fmt: skip
    if isinstance(exit_, EptViolation):
        out: Fields = {"outcome": "ept_violation", "gpa": exit_.gpa,
                       "qualification": exit_.qualification & QUALIFICATION_MASK}  # fmt: skip
        if exit_.qualification & (1 << 7):
            out["gla"] = exit_.gla
        return out
    if isinstance(exit_, EptMisconfig):
        return {"outcome": "ept_misconfig", "gpa": exit_.gpa}
    if isinstance(exit_, PmlFull):
        return {"outcome": "pml_full"}
    return {"outcome": "ok"}


def walker_fields(case: Case, walker_class: type[ReferenceWalker] = ReferenceWalker) -> Fields:
    """What the reference walker (or a variant of it) says; consumes the case's memory."""
    before = case.words()
    walker = walker_class(case.memory, case.guest, case.vmcs, FEATURES)
    t = walker.translate(case.gva, case.access, case.mode)
    out = _outcome(t.exit, t.fault)
    out["flags"] = frozenset(
        (a, case.memory.read_u64(a)) for a, v in before if case.memory.read_u64(a) != v
    )
    if case.vmcs.pml_enabled:
        out["pml_log"] = tuple(t.pml_logged)
        out["pml_index"] = case.vmcs.pml_index
    return out


def engine_fields(case: Case) -> Fields:
    """What the fast engine says (caches off: one cold walk); consumes the case's memory."""
    before = case.words()
    index_before = case.vmcs.pml_index
    engine = Engine(case.memory, UNCACHED, FEATURES)
    engine.add_vcpu(case.guest, case.vmcs)
    result = engine.translate(case.gva, case.access, case.mode)
    out = _outcome(result.exit, result.fault)
    out["flags"] = frozenset(
        (a, case.memory.read_u64(a)) for a, v in before if case.memory.read_u64(a) != v
    )
    if case.vmcs.pml_enabled:
        _, vmcs = engine.vcpu_state(0)
        assert vmcs is not None
        out["pml_log"] = tuple(
            case.memory.read_u64(case.vmcs.pml_address + 8 * i) & ~0xFFF
            for i in _logged_slots(index_before, vmcs.pml_index)
        )
        out["pml_index"] = vmcs.pml_index
    return out


def _logged_slots(before: int, after: int) -> range:
    if before >= 512:
        return range(0)
    count = (before - after) & 0xFFFF
    return range(before, before - count, -1)


def bochs_fields(case: Case, line: Mapping[str, object]) -> Fields:
    """The harness's JSON line for ``case`` in the same form."""

    def num(key: str) -> int:
        return int(str(line[key]), 16)

    if "launch_error" in line:
        return {"outcome": f"launch-error-{num('launch_error')}"}
    reason = num("reason") & 0xFFFF
    out: Fields
    if reason == VMCALL and "pf_error" in line:
        # the guest's own #PF handler ran (IDT vector 14) and reported error code and CR2
        out = {"outcome": "fault", "vector": 14, "error_code": num("pf_error"),
               "address": num("pf_cr2")}  # fmt: skip
    elif reason == VMCALL:
        out = {"outcome": "ok"}
    elif reason == EXCEPTION:
        intr = num("intr")
        vector = intr & 0xFF
        out = {"outcome": "fault", "vector": vector,
               "error_code": num("error") if intr & (1 << 11) else 0,
               "address": num("qual") if vector == 14 else case.gva}  # fmt: skip
    elif reason == EPT_VIOLATION:
        qual = num("qual")
        out = {"outcome": "ept_violation", "gpa": num("gpa"),
               "qualification": qual & QUALIFICATION_MASK}  # fmt: skip
        if qual & (1 << 7):
            out["gla"] = num("gla")
    elif reason == EPT_MISCONFIG:
        out = {"outcome": "ept_misconfig", "gpa": num("gpa")}
    elif reason == PML_FULL:
        out = {"outcome": "pml_full"}
    else:
        out = {"outcome": f"exit-{reason}"}
    changed = line.get("changed", [])
    assert isinstance(changed, list)
    out["flags"] = frozenset((int(a, 16), int(v, 16)) for a, v in changed)
    if case.vmcs.pml_enabled:
        pml = line.get("pml", [])
        assert isinstance(pml, list)
        out["pml_log"] = tuple(int(v, 16) for v in pml)
        out["pml_index"] = num("pml_index")
    return out


def differing(a: Fields, b: Fields) -> list[str]:
    """The fields on which two outcomes disagree."""
    return [f for f in FIELDS if a.get(f) != b.get(f)]


@dataclass
class CaseReport:
    """One case's three outcomes and how they differ."""

    case_id: int
    notes: dict[str, object]
    walker: Fields
    engine: Fields
    bochs: Fields
    bochs_vs_walker: list[str] = field(default_factory=list)
    engine_vs_walker: list[str] = field(default_factory=list)
    pinned: str | None = None  # the pinned Bochs departure that explains bochs_vs_walker
