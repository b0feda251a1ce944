"""Per-vCPU statistics of the fast engine, as a dataclass and as a flat dict."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt

from .kernels import layout as L

CACHE_LEVELS = ("l1", "l2", "llc", "dram")


@dataclass(frozen=True, slots=True)
class VcpuStats:
    """Per-vCPU counters of the fast engine: accesses, TLB and cache hits, walk references by level,
    cycles, exits and faults."""
    accesses: int
    reads: int
    writes: int
    fetches: int
    l1d_tlb_hits: int
    l1i_tlb_hits: int
    stlb_hits: int
    walks: int
    rewalks: int
    guest_refs: tuple[int, int, int, int, int]  # by level 1..5
    ept_refs: tuple[int, int, int, int, int]
    psc_hits: tuple[int, int, int, int]  # by level of the cached entry 2..5 (PDE..PML5E)
    nested_tlb_hits: int
    ept_psc_hits: int
    walk_refs_served: tuple[int, int, int, int]  # L1, L2, LLC, DRAM
    data_served: tuple[int, int, int, int]
    cycles: int
    translation_cycles: int
    data_cycles: int
    guest_faults: int
    ept_violations: int
    ept_misconfigs: int
    pml_full: int
    pml_logged: int
    prefetches: int  # lines the data prefetcher brought in (off the critical path)
    useful_prefetches: int  # demand data accesses that hit a line a prefetch brought

    @classmethod
    def from_row(cls, row: npt.NDArray[np.int64]) -> VcpuStats:
        """Build from one row of the engine's statistics array."""
        r = [int(x) for x in row]

        def span(start: int, n: int) -> tuple[int, ...]:
            return tuple(r[start : start + n])

        return cls(
            accesses=r[L.ST_ACCESSES],
            reads=r[L.ST_READS],
            writes=r[L.ST_WRITES],
            fetches=r[L.ST_FETCHES],
            l1d_tlb_hits=r[L.ST_L1D_HITS],
            l1i_tlb_hits=r[L.ST_L1I_HITS],
            stlb_hits=r[L.ST_STLB_HITS],
            walks=r[L.ST_WALKS],
            rewalks=r[L.ST_REWALKS],
            guest_refs=span(L.ST_GUEST_REFS, 5),  # type: ignore[arg-type]
            ept_refs=span(L.ST_EPT_REFS, 5),  # type: ignore[arg-type]
            psc_hits=span(L.ST_PSC_HITS + 1, 4),  # type: ignore[arg-type]
            nested_tlb_hits=r[L.ST_NTLB_HITS],
            ept_psc_hits=r[L.ST_EPSC_HITS],
            walk_refs_served=span(L.ST_WALK_CACHE, 4),  # type: ignore[arg-type]
            data_served=span(L.ST_DATA_CACHE, 4),  # type: ignore[arg-type]
            cycles=r[L.ST_CYCLES],
            translation_cycles=r[L.ST_TRANSLATION_CYCLES],
            data_cycles=r[L.ST_DATA_CYCLES],
            guest_faults=r[L.ST_GUEST_FAULTS],
            ept_violations=r[L.ST_EPT_VIOLATIONS],
            ept_misconfigs=r[L.ST_EPT_MISCONFIGS],
            pml_full=r[L.ST_PML_FULL],
            pml_logged=r[L.ST_PML_LOGGED],
            prefetches=r[L.ST_PF_ISSUED],
            useful_prefetches=r[L.ST_PF_USEFUL],
        )

    @property
    def walk_references(self) -> int:
        """Memory references made by walks: guest entries plus EPT entries."""
        return sum(self.guest_refs) + sum(self.ept_refs)

    @property
    def tlb_miss_rate(self) -> float:
        """Walks per access."""
        return self.walks / self.accesses if self.accesses else 0.0

    def as_dict(self) -> dict[str, int | float]:
        """Flat: tuples become ``name_level`` keys (``guest_refs_l1``, ``data_served_dram``)."""
        flat: dict[str, int | float] = {}
        for name, value in asdict(self).items():
            if isinstance(value, (tuple, list)):
                if name in ("walk_refs_served", "data_served"):
                    labels = list(CACHE_LEVELS)
                elif name == "psc_hits":
                    labels = ["pde", "pdpte", "pml4e", "pml5e"]
                else:
                    labels = [f"l{i}" for i in range(1, 6)]
                for label, v in zip(labels, value, strict=True):
                    flat[f"{name}_{label}"] = v
            else:
                flat[name] = value
        flat["walk_references"] = self.walk_references
        flat["tlb_miss_rate"] = self.tlb_miss_rate
        return flat
