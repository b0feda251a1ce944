"""Confidential VMs' memory references: which class a reference belongs to, what it costs, and
the counters of the engine's protection pass (:mod:`eptlab.mmu.kernels.protect`).

A :class:`~eptlab.mmu.config.Protection` names the key of each reference class (guest
page-table reads, EPT reads, private data, shared memory), the keys whose lines carry a MAC
(TDX), and whether SEV-SNP's RMP check applies. The engine prices it after each chunk from its
reference log: every DRAM line of an encrypted class pays the decrypt latency (plus the MAC
latency if its class carries one); with the RMP check on, every host-physical access of a
nested walk and the data page the walk ends on is looked up in the RMP cache, and each miss
reads an RMP entry. The cost is additive and serial, like the rest of the timing model.

:func:`classify_walk` is the plain-Python statement of the same rules over the reference
walker's :class:`~eptlab.mmu.walker.Reference` list (the oracle the tests compare the pass with).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt

from .config import EncryptionConfig, Protection
from .context import CpuFeatures
from .kernels import protect as P
from .walker import DATA, Dim, Reference

CLASSES = ("guest_pt", "ept", "data", "shared")
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class ProtectionStats:
    """Counters of the protection pass for one vCPU: DRAM lines by class, lines decrypted,
    MACs checked, RMP checks and RMP-cache misses (each an RMP entry read), and the cycles added
    to translation (walk lines, RMP lookups) and to data (data lines)."""

    lines: tuple[int, int, int, int]  # DRAM lines by class: guest_pt, ept, data, shared
    decrypted: int
    macs: int
    rmp_checks: int
    rmp_lookups: int
    rmp_cycles: int
    translation_cycles: int
    data_cycles: int

    @classmethod
    def from_row(cls, row: I64) -> ProtectionStats:
        """Build from one row of the engine's protection counters."""
        r = [int(x) for x in row]
        return cls(
            lines=(r[P.X_LINES], r[P.X_LINES + 1], r[P.X_LINES + 2], r[P.X_LINES + 3]),
            decrypted=r[P.X_DECRYPTED],
            macs=r[P.X_MACS],
            rmp_checks=r[P.X_RMP_CHECKS],
            rmp_lookups=r[P.X_RMP_LOOKUPS],
            rmp_cycles=r[P.X_RMP_CYCLES],
            translation_cycles=r[P.X_TRANSLATION_CYCLES],
            data_cycles=r[P.X_DATA_CYCLES],
        )

    @property
    def cycles(self) -> int:
        """Every cycle the protection added."""
        return self.translation_cycles + self.data_cycles

    def line_count(self, name: str) -> int:
        """DRAM lines of class ``name`` (one of :data:`CLASSES`)."""
        return self.lines[CLASSES.index(name)]

    def as_dict(self) -> dict[str, int]:
        """Flat: ``lines_<class>`` keys for the tuple."""
        flat = {k: v for k, v in asdict(self).items() if k != "lines"}
        flat.update({f"lines_{c}": n for c, n in zip(CLASSES, self.lines, strict=True)})
        return flat


def config_vector(encryption: EncryptionConfig, features: CpuFeatures) -> I64:
    """The pass's ``cfg`` (:mod:`~eptlab.mmu.kernels.protect`): latencies, key-ID field, and per
    class whether it is encrypted and whether it carries a MAC."""
    prot = encryption.protection
    assert prot is not None, "no protection to price"
    cfg = np.zeros(P.NCFG, np.int64)
    cfg[P.CFG_DECRYPT] = encryption.decrypt_latency
    cfg[P.CFG_MAC] = encryption.integrity_latency
    cfg[P.CFG_KEY_SHIFT] = features.maxphyaddr - features.keyid_bits
    cfg[P.CFG_KEY_MASK] = (1 << features.keyid_bits) - 1
    cfg[P.CFG_RMP_LOOKUP] = prot.rmp.lookup_cycles if prot.rmp is not None else 0
    encrypted, macs = prot.encrypted(), prot.with_mac()
    for c, name in enumerate(CLASSES):
        cfg[P.CFG_ENC + c] = int(name in encrypted)
        cfg[P.CFG_MACS + c] = int(name in macs)
    return cfg


def rmp_tags(protection: Protection | None) -> I64:
    """An empty RMP cache (``sets x ways`` tags, -1: invalid) for ``protection``."""
    rmp = protection.rmp if protection is not None else None
    sets, ways = (rmp.sets, rmp.ways) if rmp is not None else (0, 1)
    return np.full((sets, ways), -1, np.int64)


@dataclass(frozen=True, slots=True)
class WalkClasses:
    """What the rules say about one translated access: the class of each walk reference (in
    order), the class of its data line, and the host pages its RMP checks look up (walk
    references, then the data page)."""

    walk: list[str]
    data: str
    rmp_pages: list[int]


def classify_walk(
    references: list[Reference],
    data_hpa: int,
    features: CpuFeatures,
    *,
    nested: bool,
    rmp: bool,
) -> WalkClasses:
    """Classify the references of one walk (the reference walker's list) and its data access,
    as the protection pass does: guest page-table reads are ``guest_pt``; EPT reads are ``ept``,
    or ``shared`` when they translate the data address of shared memory (TDX's shared EPT);
    data is ``shared`` when, under EPT, its host-physical address carries key ID 0 on a machine
    with key-ID bits, else ``data``. With ``rmp`` on a nested walk, every reference's host page
    and the data page are checked (AMD APM Vol. 2 §15.36: the RMP is indexed by the
    system-physical address of each access of an SNP guest, table walks included)."""
    shift = features.maxphyaddr - features.keyid_bits
    kmask = (1 << features.keyid_bits) - 1
    shared = nested and bool(kmask) and ((data_hpa >> shift) & kmask) == 0
    walk = [
        "guest_pt"
        if r.dim == Dim.GUEST
        else ("shared" if shared and r.for_level == DATA else "ept")
        for r in references
    ]
    amask = (1 << shift) - 1
    pages = [(r.address & amask) >> 12 for r in references] + [(data_hpa & amask) >> 12]
    return WalkClasses(walk, "shared" if shared else "data", pages if rmp and nested else [])
