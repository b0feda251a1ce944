"""An AnC-style cache attacker in the guest, the victim it watches, and its inference.

Threat model (AnC, "ASLR on the line", Gras et al., NDSS 2017, moved into a VM): the attacker is
code in the guest that can make a victim in the same guest access its secret (a page whose
guest-physical address is randomized), flush the TLBs and translation caches before that access
(so the processor walks), and prime+probe a physically indexed last-level cache. After AnC's
"sliding" step it knows which cache set each reference of the walk touched and which set the
data access touched: one set index per reference, each of which is, with probability ``noise``,
replaced by a random set (other activity, misattribution). It knows the guest's layout (the
direct map), the walk's shape, the hypervisor's layout *policy* (and, for a linear layout, its
offset, learned from its own pages), but none of the random choices. It does not know where the
page-table pages (guest or EPT) are.

What a set index reveals. The index of a physically indexed cache is host-physical address
bits 6 .. 6+log2(sets)-1 (:class:`SetIndex`).

* Bits 6-11 lie inside a 4 KiB page. For a paging-structure entry they are the upper six bits
  of the table index, i.e. address bits of what is being translated (SDM Vol. 3A §4.5: a guest
  entry's address holds linear-address bits in 11:3; Vol. 3C §29.3.2: an EPT entry's address
  holds guest-physical-address bits in 11:3). That is the classic AnC leak: no EPT layout hides
  it, and the EPT walk adds its own (guest-physical bits of the data GPA).
* Bits 12 and up of the data access's HPA are host frame bits: the EPT layout decides them
  (:meth:`eptlab.apps.ept_layout.EptLayout.known_hpa`).

Inference (:class:`Attacker`): a posterior over every candidate slot of the secret, from the
exact likelihood of the projected observations: for each reference the attacker predicts the
set-index bits it can (``mask``) for every candidate; an observed index agrees with a candidate
with probability ``(1 - noise) + noise * 2**-bits(mask)``, disagrees with ``noise *
2**-bits(mask)``. References whose prediction is the same for every candidate carry no
information and are skipped. The entropy left is the Shannon entropy of the posterior; the
attacker's guess is uniform among the most likely candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..arch.access import Access
from ..arch.bits import PAGE_SIZE, PageSize
from ..errors import ConfigError, EptlabError
from ..guest import DIRECT_MAP_BASE, GuestKernel
from ..mmu.config import CacheConfig, CacheLevel, MmuConfig
from ..mmu.walker import DATA, ReferenceWalker, Translation
from .ept_layout import EptLayout, LaidOutVm, boot

CHANNELS = ("data", "walk+data")
LINE_SHIFT = 6  # 64-byte lines
ENTRY_OFFSET_MASK = 0xFF8  # bits 11:3 of a paging-structure entry's address: the table index
MAX_SECRET_BITS = 16

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class SetIndex:
    """The set index of a physically indexed cache with ``sets`` sets of 64-byte lines: HPA
    bits 6 .. 6+log2(sets)-1 (no slice hashing)."""

    sets: int

    def __post_init__(self) -> None:
        if self.sets < 2 or self.sets & (self.sets - 1) or self.sets > 1 << 24:
            raise ConfigError("llc_sets", f"{self.sets} is not a power of two in 2..2^24")

    @classmethod
    def of_cache(cls, level: CacheLevel) -> SetIndex:
        return cls(level.sets)

    @property
    def bits(self) -> int:
        return self.sets.bit_length() - 1

    @property
    def hpa_bits(self) -> tuple[int, int]:
        """Lowest and highest HPA bit of the index."""
        return LINE_SHIFT, LINE_SHIFT + self.bits - 1

    @property
    def label(self) -> str:
        lo, hi = self.hpa_bits
        return f"{lo}-{hi}"

    def of(self, hpa: int) -> int:
        return (hpa >> LINE_SHIFT) & (self.sets - 1)

    def project(self, hpa_mask: int, hpa_value: U64) -> tuple[int, U64]:
        """The set-index bits of a partly known HPA: ``(mask, value)`` over index bits."""
        mask = (hpa_mask >> LINE_SHIFT) & (self.sets - 1)
        return mask, (hpa_value >> np.uint64(LINE_SHIFT)) & np.uint64(mask)


@dataclass(frozen=True)
class Target:
    """The victim's secret: a region placed at a random one of ``2**bits`` slots of
    ``granule`` bytes in a guest-physical window, read at ``offset`` through the direct map
    (its physmap address is ``DIRECT_MAP_BASE + GPA``, so learning the GPA defeats it).

    ``granule`` 4 KiB stands for a kernel object or key page placed anywhere; 2 MiB for a
    physically randomized kernel image (Linux physical KASLR uses 2 MiB-aligned slots)."""

    granule: PageSize
    bits: int
    offset: int = 0

    def __post_init__(self) -> None:
        if self.granule not in (PageSize.SIZE_4K, PageSize.SIZE_2M):
            raise ConfigError("target", f"granule {self.granule.label} is not 4k or 2m")
        if not 1 <= self.bits <= MAX_SECRET_BITS:
            raise ConfigError("secret_bits", f"{self.bits} is not in 1..{MAX_SECRET_BITS}")
        if not 0 <= self.offset < self.granule or self.offset % 8:
            raise ConfigError("offset", f"{self.offset} is not an aligned offset in the granule")

    @classmethod
    def named(cls, name: str, bits: int) -> Target:
        try:
            granule = PageSize.parse(name)
        except ValueError:
            raise ConfigError("targets", f"{name!r} is not 4k or 2m") from None
        return cls(granule, bits)

    @property
    def label(self) -> str:
        return self.granule.label

    @property
    def size(self) -> int:
        return int(self.granule) << self.bits

    @property
    def window(self) -> int:
        """GPA of slot 0: above the guest kernel's own allocations, aligned to the window, so
        the slot number is GPA bits log2(granule) .. log2(granule)+bits-1."""
        return max(int(PageSize.SIZE_1G), self.size)

    @property
    def memory(self) -> int:
        """Guest memory the VM needs (whole 2 MiB pages)."""
        return self.window + max(self.size, int(PageSize.SIZE_2M))

    def gpa(self, slot: int) -> int:
        return self.window + slot * int(self.granule) + self.offset

    def gva(self, slot: int) -> int:
        return DIRECT_MAP_BASE + self.gpa(slot)

    def candidate_gpas(self) -> U64:
        """The GPA the victim reads, for every slot."""
        slots = np.arange(1 << self.bits, dtype=np.uint64)
        return np.uint64(self.window + self.offset) + slots * np.uint64(int(self.granule))

    def candidate_gvas(self) -> U64:
        """The direct-map address the victim reads, for every slot."""
        return self.candidate_gpas() + np.uint64(DIRECT_MAP_BASE)


@dataclass(frozen=True)
class Probe:
    """A reference as the attacker knows it: its place in the walk. ``dim`` is ``data`` (the
    access itself), ``guest`` or ``ept``; ``level`` the paging level of the entry read;
    ``for_level`` (EPT) the guest level whose entry is being located, 0 for the data GPA."""

    dim: str
    level: int
    for_level: int


@dataclass(frozen=True)
class VictimAccess:
    """One access of the victim as the hardware made it: its probes (the data access first,
    then the walk's references in order) and the host-physical address each one read."""

    probes: tuple[Probe, ...]
    hpas: tuple[int, ...]

    @classmethod
    def from_translation(cls, t: Translation) -> VictimAccess:
        if t.hpa is None:
            raise EptlabError(f"the victim's access to {t.gva:#x} did not complete")
        probes = [Probe("data", 0, 0)]
        hpas = [t.hpa]
        for ref in t.references:
            probes.append(Probe(ref.dim.value, ref.level, ref.for_level))
            hpas.append(ref.address)
        return cls(tuple(probes), tuple(hpas))


@dataclass
class Victim:
    """A guest whose secret sits at ``slot``, in a VM laid out by a policy."""

    laid: LaidOutVm
    kernel: GuestKernel
    target: Target
    slot: int

    @classmethod
    def boot(
        cls, layout: EptLayout, target: Target, slot: int, *, seed: int, extra_memory: int = 0
    ) -> Victim:
        """Boot the VM and the guest kernel, place the secret at ``slot`` and let the victim
        write it once through the direct map (backing its page, mapping the direct map).
        ``extra_memory`` more bytes of guest memory follow the target's (an attacker's buffer,
        from GPA ``target.memory``)."""
        if not 0 <= slot < 1 << target.bits:
            raise ConfigError("slot", f"{slot} is not in 0..{(1 << target.bits) - 1}")
        # the walker reads host memory directly: the engine (which performs the victim's
        # first write) needs no data-cache model here
        laid = boot(layout, target.memory + extra_memory, seed=seed,
                    mmu=MmuConfig(cache=CacheConfig.disabled()))
        # one aged guest layout for every trial (the secret's frame is placed explicitly below;
        # aging anew for each trial's seed would dominate the run)
        kernel = GuestKernel(laid.vm, seed=seed, layout_seed=0)
        base = target.gpa(slot) - target.offset
        kernel.frames.alloc_at(base, target.granule)
        process = kernel.spawn("victim")
        vcpu = laid.vm.add_vcpu(cr3=process.cr3)
        kernel.switch_to(vcpu, process)
        vcpu.write_u64(target.gva(slot), 0x5EC2E7)
        return cls(laid, kernel, target, slot)

    @property
    def gpa(self) -> int:
        return self.target.gpa(self.slot)

    def access(self) -> VictimAccess:
        """The victim's read of its secret with every translation cache flushed (the attacker
        evicted them), as the reference walker makes it."""
        vcpu = self.laid.vm.vcpus[0]
        walker = ReferenceWalker(
            self.laid.hv.host.memory, vcpu.guest, vcpu.vmcs, self.laid.hv.features
        )
        return VictimAccess.from_translation(walker.translate(self.target.gva(self.slot),
                                                              Access.READ))


@dataclass(frozen=True)
class NoiseDraws:
    """The random part of ``count`` measurements of up to ``width`` references: which set
    indices are replaced (``flips``) and by what (``values``, reduced modulo the set count)."""

    flips: npt.NDArray[np.bool_]
    values: U64

    @classmethod
    def draw(cls, rng: np.random.Generator, count: int, width: int, noise: float) -> NoiseDraws:
        if not 0.0 <= noise <= 1.0:
            raise ConfigError("noise", f"{noise} is not a probability")
        flips = rng.random((count, width)) < noise
        values = rng.integers(0, 1 << 62, (count, width), dtype=np.int64).astype(np.uint64)
        return cls(flips, values)


def observe(access: VictimAccess, index: SetIndex, draws: NoiseDraws) -> I64:
    """``count`` prime+probe measurements of ``access``: per measurement, the set index each
    reference touched, or a random one where the draw says the measurement went wrong."""
    width = len(access.hpas)
    if draws.flips.shape[1] < width:
        raise ConfigError("NoiseDraws", f"drawn for {draws.flips.shape[1]} references, not {width}")
    true = np.array([index.of(h) for h in access.hpas], np.int64)
    random = (draws.values[:, :width] & np.uint64(index.sets - 1)).astype(np.int64)
    return np.where(draws.flips[:, :width], random, true[None, :])


@dataclass(frozen=True)
class Belief:
    """The attacker's posterior after ``observations`` measurements; ``scores`` rank the
    candidates (log-posterior up to a constant)."""

    observations: int
    entropy_bits: float
    guesses: I64  # the candidate slots of highest posterior probability
    scores: npt.NDArray[np.float64]

    def success(self, slot: int) -> float:
        """Probability that a uniform pick among the best guesses is ``slot``."""
        return 1.0 / len(self.guesses) if slot in set(self.guesses.tolist()) else 0.0

    def rank(self, slot: int) -> float:
        """Expected position of ``slot`` when guessing in order of posterior (ties broken
        uniformly): 1 when it is the single best guess."""
        s = self.scores[slot]
        return 1 + float((self.scores > s).sum()) + (float((self.scores == s).sum()) - 1) / 2


@dataclass(frozen=True)
class _Feature:
    column: int  # index of the probe in the observations
    mask: int  # set-index bits the attacker predicts
    predicted: I64  # per candidate
    weight: float  # log-likelihood ratio of an agreeing observation


class Attacker:
    """Bayesian inference of the secret's slot from set-index observations of ``probes``.

    Uses the probes of ``channel``: ``data`` (the data access only) or ``walk+data`` (every
    reference of the walk too)."""

    def __init__(
        self,
        target: Target,
        layout: EptLayout,
        offset: int | None,
        index: SetIndex,
        probes: tuple[Probe, ...],
        *,
        channel: str,
        noise: float,
        maxphyaddr: int = 46,
    ) -> None:
        if channel not in CHANNELS:
            raise ConfigError("channels", f"{channel!r} is not one of {', '.join(CHANNELS)}")
        if not 0.0 <= noise <= 1.0:
            raise ConfigError("noise", f"{noise} is not a probability")
        self.target, self.layout, self.offset = target, layout, offset
        self.index, self.noise, self.maxphyaddr = index, noise, maxphyaddr
        self.candidates = target.candidate_gpas()
        self.features: list[_Feature] = []
        for column, probe in enumerate(probes):
            if channel == "data" and probe.dim != "data":
                continue
            hpa_mask, hpa_value = self.predict(probe)
            mask, value = index.project(hpa_mask, hpa_value)
            predicted = value.astype(np.int64)
            if mask == 0 or np.all(predicted == predicted[0]):
                continue  # the same for every candidate: no information
            self.features.append(_Feature(column, mask, predicted, self._weight(mask)))

    def predict(self, probe: Probe) -> tuple[int, U64]:
        """The HPA bits of ``probe``'s reference the attacker can predict for each candidate:
        ``(mask, values)``."""
        gpas = self.candidates
        if probe.dim == "data":
            return self.layout.known_hpa(gpas, self.offset, self.maxphyaddr)
        if probe.dim == "guest":
            translated = self.target.candidate_gvas()  # the linear address being walked
        elif probe.dim == "ept" and probe.for_level == DATA:
            translated = gpas
        else:
            # an EPT entry on the way to a guest paging-structure entry: its GPA lies in a
            # guest page-table page the attacker cannot place
            return 0, np.zeros_like(gpas)
        shift = np.uint64(PAGE_SIZE.bit_length() - 1 + 9 * (probe.level - 1))
        table_index = (translated >> shift) & np.uint64(511)
        return ENTRY_OFFSET_MASK, table_index << np.uint64(3)

    def _weight(self, mask: int) -> float:
        chance = self.noise * 2.0 ** -bin(mask).count("1")
        if chance == 0.0:
            return float("inf")
        return float(np.log((1.0 - self.noise + chance) / chance))

    @property
    def leaky_probes(self) -> list[int]:
        """Columns of the probes whose set index depends on the secret."""
        return [f.column for f in self.features]

    def beliefs(self, observations: I64, checkpoints: tuple[int, ...]) -> list[Belief]:
        """The posterior after the first ``k`` observations, for each ``k`` in
        ``checkpoints``."""
        if any(k < 0 or k > len(observations) for k in checkpoints):
            raise ConfigError("observations", f"checkpoints {checkpoints} exceed the "
                              f"{len(observations)} observations made")
        n = len(self.candidates)
        agree = [np.zeros(n, np.int64) for _ in self.features]
        out: dict[int, Belief] = {}
        done = 0
        for k in sorted(set(checkpoints)):
            for row in observations[done:k]:
                for f, count in zip(self.features, agree, strict=True):
                    count += f.predicted == (int(row[f.column]) & f.mask)
            done = k
            out[k] = self._belief(k, agree)
        return [out[k] for k in checkpoints]

    def _belief(self, k: int, agree: list[I64]) -> Belief:
        n = len(self.candidates)
        if k == 0 or not self.features:
            return Belief(k, float(np.log2(n)), np.arange(n, dtype=np.int64), np.zeros(n))
        if self.noise == 0.0:  # only candidates that explain every observation remain
            consistent = np.ones(n, bool)
            for count in agree:
                consistent &= count == k
            alive = np.flatnonzero(consistent)
            return Belief(k, float(np.log2(max(1, len(alive)))), alive.astype(np.int64),
                          consistent.astype(np.float64))
        score = np.zeros(n, np.float64)
        for f, count in zip(self.features, agree, strict=True):
            score += f.weight * count
        best = score.max()
        p = np.exp(score - best)
        p /= p.sum()
        nz = p[p > 0]
        entropy = float(-(nz * np.log2(nz)).sum())
        return Belief(k, max(0.0, entropy), np.flatnonzero(score == best).astype(np.int64), score)
