"""Configuration of what the translation hardware caches and what it costs.

Defaults follow a recent Intel server core (Skylake-SP/Ice Lake class): 64-entry 4-way L1 DTLB
for 4 KiB pages, 32-entry 2 MiB and 4-entry 1 GiB L1 DTLBs, 128-entry 8-way L1 ITLB, a
1536-entry 12-way STLB, paging-structure caches of 2 PML4E / 4 PDPTE / 32 PDE entries, a
48 KiB L1D, 1.25 MiB L2 and a shared LLC; memory encryption off. Every number is a field you
can change. Latencies and per-event cycles default to the active cost profile
(:mod:`eptlab.costs`); ``MmuConfig.from_profile(p)`` takes them from ``p`` explicitly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..costs import CostProfile, active_profile
from ..errors import ConfigError


@dataclass(frozen=True, slots=True)
class Assoc:
    """A set-associative structure: ``sets`` x ``ways`` entries, LRU replacement.
    ``sets=0`` disables it."""

    sets: int
    ways: int

    def __post_init__(self) -> None:
        if self.sets < 0 or self.ways < 1 or self.ways > 64:
            raise ConfigError("Assoc", f"sets={self.sets}, ways={self.ways} is not a valid shape")
        if self.sets & (self.sets - 1):
            raise ConfigError("Assoc.sets", f"{self.sets} is not a power of two")

    @property
    def entries(self) -> int:
        """Total entries: sets x ways."""
        return self.sets * self.ways


@dataclass(frozen=True, slots=True)
class TlbConfig:
    """TLBs and paging-structure caches of one vCPU (SDM Vol. 3A §4.10, Vol. 3C §29.4)."""

    l1d_4k: Assoc = Assoc(16, 4)
    l1d_2m: Assoc = Assoc(8, 4)
    l1d_1g: Assoc = Assoc(1, 4)
    l1i_4k: Assoc = Assoc(16, 8)
    l1i_2m: Assoc = Assoc(1, 8)
    l1i_1g: Assoc = Assoc(0, 1)
    stlb_4k: Assoc = Assoc(128, 12)
    stlb_2m: Assoc = Assoc(128, 12)
    stlb_1g: Assoc = Assoc(4, 4)
    # guest paging-structure caches, by the level of the entry they cache
    psc_pml5: Assoc = Assoc(1, 2)
    psc_pml4: Assoc = Assoc(1, 2)
    psc_pdpt: Assoc = Assoc(1, 4)
    psc_pd: Assoc = Assoc(1, 32)
    # guest-physical side: nested TLB (GPA -> HPA) and EPT paging-structure caches
    ntlb_4k: Assoc = Assoc(16, 4)
    ntlb_2m: Assoc = Assoc(8, 4)
    ntlb_1g: Assoc = Assoc(1, 4)
    epsc_pml5: Assoc = Assoc(1, 2)
    epsc_pml4: Assoc = Assoc(1, 2)
    epsc_pdpt: Assoc = Assoc(1, 4)
    epsc_pd: Assoc = Assoc(1, 16)

    @classmethod
    def disabled(cls) -> TlbConfig:
        """No translation caching at all: every access walks (the oracle's view)."""
        return cls(**{name: Assoc(0, 1) for name in cls.__dataclass_fields__})

    def structures(self) -> list[tuple[str, Assoc]]:
        """``(name, shape)`` of every structure, in field order."""
        return [(name, getattr(self, name)) for name in self.__dataclass_fields__]


@dataclass(frozen=True, slots=True)
class CacheLevel:
    """One level of the physically indexed data cache (64-byte lines, LRU)."""

    size: int
    ways: int
    latency: int  # cycles for a hit at this level

    def __post_init__(self) -> None:
        sets = self.size // (64 * self.ways) if self.ways > 0 else 0
        if self.size < 0 or (self.size and (sets < 1 or sets & (sets - 1))):
            raise ConfigError(
                "CacheLevel", f"size={self.size}, ways={self.ways} does not give 2^k sets"
            )

    @property
    def sets(self) -> int:
        """Number of sets (0 when the level is disabled)."""
        return self.size // (64 * self.ways) if self.size else 0


PREFETCHER_KINDS = ("off", "next-line", "stride")


@dataclass(frozen=True, slots=True)
class PrefetcherConfig:
    """A hardware data prefetcher, modelled on Intel's L2 streamer (Intel 64 and IA-32
    Architectures Optimization Reference Manual, "Data Prefetching": the streamer watches the
    requests that miss the L1 data cache, tracks streams within 4 KiB pages, prefetches lines
    ahead into the L2 and LLC, and never crosses a 4 KiB page boundary).

    ``kind``: ``off``; ``next-line`` (each L1 miss fetches the next ``degree`` lines after
    ``distance - 1`` skipped ones); ``stride`` (per 4 KiB page, IP-less: two successive equal
    line deltas confirm a stride, and each further miss of the stream fetches the ``degree``
    lines ``distance``, ``distance + 1``, ... strides ahead). ``streams`` pages are tracked per
    vCPU (LRU). ``l1_next_line`` adds the L1 DCU next-line prefetcher (an L1 miss fetches the
    next line of the same page into L1). Prefetches are off the critical path: no cycles are
    charged, but they fill lines (and evict others). Only data accesses train or trigger them:
    page-walk references are never prefetched.
    """

    kind: str = "stride"
    degree: int = 1  # prefetches take no time here: one line ahead keeps a stream in the L2
    distance: int = 1
    streams: int = 32
    l1_next_line: bool = False

    def __post_init__(self) -> None:
        if self.kind not in PREFETCHER_KINDS:
            raise ConfigError("PrefetcherConfig.kind", f"{self.kind!r} is not one of "
                              f"{', '.join(PREFETCHER_KINDS)}")
        for name, low, high in (("degree", 1, 63), ("distance", 1, 63), ("streams", 1, 256)):
            value = getattr(self, name)
            if not low <= value <= high:
                raise ConfigError(f"PrefetcherConfig.{name}", f"{value} is not in {low}..{high}")

    @classmethod
    def off(cls) -> PrefetcherConfig:
        """No hardware prefetcher."""
        return cls(kind="off")


_GEOMETRY = {
    "l1": (48 * 1024, 12),
    "l2": (1024 * 1024, 16),  # 1.25 MiB on the real part; 2^k sets here
    "llc": (32 * 1024 * 1024, 16),
}


def _level(name: str, profile: CostProfile) -> CacheLevel:
    size, ways = _GEOMETRY[name]
    return CacheLevel(size, ways, profile.cycles(f"{name}_latency"))


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Per-vCPU L1 and L2, a shared LLC, and DRAM. Walk references and data accesses both go
    through it, so walks hit or miss like data does. Data accesses also drive the prefetcher."""

    l1: CacheLevel = field(default_factory=lambda: _level("l1", active_profile()))
    l2: CacheLevel = field(default_factory=lambda: _level("l2", active_profile()))
    llc: CacheLevel = field(default_factory=lambda: _level("llc", active_profile()))
    dram_latency: int = field(default_factory=lambda: active_profile().cycles("dram_latency"))
    prefetcher: PrefetcherConfig = PrefetcherConfig()

    @classmethod
    def from_profile(cls, profile: CostProfile) -> CacheConfig:
        """The default geometry with ``profile``'s latencies."""
        return cls(
            _level("l1", profile),
            _level("l2", profile),
            _level("llc", profile),
            profile.cycles("dram_latency"),
        )

    @classmethod
    def disabled(cls) -> CacheConfig:
        """Every reference goes to DRAM (no caches, so nothing to prefetch into)."""
        none = CacheLevel(0, 1, 0)
        return cls(none, none, none, prefetcher=PrefetcherConfig.off())


KEYS = ("none", "host", "private")
"""Keys a reference class can be read with: ``none`` (plaintext), ``host`` (the TME / SME key
of the hypervisor's memory, KeyID 0) and ``private`` (the VM's own key: TME-MK KeyID, SEV ASID
key, TDX private HKID)."""

PRESETS = ("mktme", "sev-snp", "tdx")


@dataclass(frozen=True, slots=True)
class RmpConfig:
    """SEV-SNP's reverse-map (RMP) check (AMD APM Vol. 2 §15.36, "Secure Nested Paging"): the
    RMP entry of each host-physical 4 KiB page a guest's walk touches, 16 bytes at
    ``base + 0x4000 + (hpa >> 12) * 16`` (Linux Documentation/arch/x86/amd-memory-encryption.rst:
    RMP_BASE MSR, a 16 KiB bookkeeping region, then 16-byte entries), is read and checked.
    ``sets`` x ``ways`` is the RMP cache (0 sets: none, every check reads the table);
    ``lookup_cycles`` is what reading one entry costs. Defaults come from the cost profile."""

    sets: int = field(
        default_factory=lambda: max(1, _cycles("rmp_cache_entries") // _cycles("rmp_cache_ways"))
    )
    ways: int = field(default_factory=lambda: _cycles("rmp_cache_ways"))
    lookup_cycles: int = field(default_factory=lambda: _cycles("rmp_lookup_cycles"))
    base: int = 0

    def __post_init__(self) -> None:
        Assoc(self.sets, self.ways)  # a valid shape (sets a power of two, 1-64 ways)
        if self.lookup_cycles < 0:
            raise ConfigError("RmpConfig.lookup_cycles", "must be >= 0 cycles")

    @classmethod
    def uncached(cls, lookup_cycles: int | None = None) -> RmpConfig:
        """No RMP cache: every check reads the RMP entry."""
        cycles = _cycles("rmp_lookup_cycles") if lookup_cycles is None else lookup_cycles
        return cls(0, 1, cycles)

    def entry_address(self, hpa: int) -> int:
        """Host-physical address of the RMP entry of ``hpa``'s 4 KiB page."""
        return self.base + 0x4000 + (hpa >> 12) * 16


@dataclass(frozen=True, slots=True)
class Protection:
    """What a confidential VM adds to its memory references: which key each reference class is
    read with, which classes carry a MAC, and whether walks are RMP-checked.

    Classes: ``guest_pt`` (guest page-table reads), ``ept`` (EPT reads translating private
    memory: TDX's secure EPT), ``data`` (private data lines) and ``shared`` (data lines of
    shared memory, i.e. whose EPT leaf carries the host key ID 0, and the EPT reads that
    translate them: TDX's shared EPT). ``mac``: the keys whose lines carry a MAC checked on each
    read from DRAM (TDX: in the ECC/metadata bits, no extra access). ``rmp``: SEV-SNP's RMP check
    on every host-physical access of a nested walk and on the page it ends on.
    The walk is EPT's format in every preset; AMD's NPT format is not modelled."""

    name: str = "custom"
    guest_pt: str = "private"
    ept: str = "host"
    data: str = "private"
    shared: str = "host"
    mac: tuple[str, ...] = ()
    rmp: RmpConfig | None = None

    def __post_init__(self) -> None:
        for cls_ in ("guest_pt", "ept", "data", "shared"):
            if getattr(self, cls_) not in KEYS:
                raise ConfigError(f"Protection.{cls_}", f"{getattr(self, cls_)!r} is not one of "
                                  f"{', '.join(KEYS)}")
        for key in self.mac:
            if key not in ("host", "private"):
                raise ConfigError("Protection.mac", f"{key!r}: only encrypted keys carry a MAC")

    @classmethod
    def preset(cls, name: str, rmp: RmpConfig | None = None) -> Protection:
        """``mktme``: a TME-MK VM (its key on guest page tables and data; EPT and shared memory
        under the TME key, KeyID 0). ``sev-snp``: SEV-SNP (guest key on guest page tables and
        private data, nested tables and shared pages in the clear: host SME off; RMP checks).
        ``tdx``: TDX (private key with a MAC on guest page tables, the secure EPT and private
        data; shared memory and the shared EPT in the clear: KeyID 0 under TME bypass)."""
        if name == "mktme":
            return cls(name, "private", "host", "private", "host")
        if name == "sev-snp":
            return cls(name, "private", "none", "private", "none", rmp=rmp or RmpConfig())
        if name == "tdx":
            return cls(name, "private", "private", "private", "none", mac=("private",))
        raise ConfigError("preset", f"{name!r} is not one of {', '.join(PRESETS)}")

    def classes(self) -> dict[str, str]:
        """The key of each reference class."""
        return {c: getattr(self, c) for c in ("guest_pt", "ept", "data", "shared")}

    def encrypted(self) -> frozenset[str]:
        """The classes read with a key (decrypted when DRAM serves them)."""
        return frozenset(c for c, key in self.classes().items() if key != "none")

    def with_mac(self) -> frozenset[str]:
        """The classes whose lines carry a MAC."""
        return frozenset(c for c, key in self.classes().items() if key in self.mac)


@dataclass(frozen=True, slots=True)
class EncryptionConfig:
    """Memory encryption at the memory controller (Intel TME/TME-MK, AMD SME/SEV).

    The controller decrypts every line it reads from DRAM; lines in the caches are plaintext.
    So every reference served by DRAM, a page-walk read or a data line (a write's
    write-allocate fill included), costs ``decrypt_latency`` more, and ``integrity_latency``
    more again when a MAC is fetched and checked with each line (integrity-protected modes).
    Nothing else changes: which level serves a reference is the same with and without
    encryption. AES-XTS cannot start before the ciphertext arrives, so the decryption is not
    overlapped with the DRAM access. All DRAM is encrypted (TME with one key, or TME-MK with a
    key per VM and the TME key for the hypervisor's own memory, EPT tables included). Not
    modelled: encryption of write-backs (off the critical path; the cache model keeps no dirty
    lines), a MAC cache or integrity tree, the KeyID-0 TME bypass.
    """

    decrypt_latency: int = 0  # cycles added to each line read from DRAM (0: no encryption)
    integrity_latency: int = 0  # cycles of a MAC fetch and check per DRAM line (0: none)
    # a confidential VM's classes, MACs and RMP checks (None: every DRAM line pays the flat
    # penalty, in the walk kernel; set: the engine's protection pass prices each class)
    protection: Protection | None = None

    def __post_init__(self) -> None:
        if self.protection is not None and self.protection.mac and not self.integrity_latency:
            raise ConfigError("EncryptionConfig.integrity_latency",
                              f"{self.protection.name} checks MACs: give their latency")
        for name in ("decrypt_latency", "integrity_latency"):
            if getattr(self, name) < 0:
                raise ConfigError(f"EncryptionConfig.{name}", "must be >= 0 cycles")
        if self.integrity_latency and not self.decrypt_latency:
            raise ConfigError(
                "EncryptionConfig.integrity_latency", "integrity checking needs encryption on"
            )

    @classmethod
    def from_profile(cls, profile: CostProfile, *, integrity: bool = False) -> EncryptionConfig:
        """Encryption on, at ``profile``'s decrypt latency (and integrity latency if asked)."""
        return cls(
            profile.cycles("decrypt_latency"),
            profile.cycles("integrity_latency") if integrity else 0,
        )

    @property
    def enabled(self) -> bool:
        """Whether memory encryption is on (a decrypt latency is charged)."""
        return self.decrypt_latency > 0

    @property
    def dram_penalty(self) -> int:
        """Cycles added to every reference DRAM serves (flat model; 0 with a protection, whose
        pass prices each class instead)."""
        if self.protection is not None:
            return 0
        return self.decrypt_latency + self.integrity_latency


def _cycles(key: str) -> int:
    return active_profile().cycles(key)


@dataclass(frozen=True, slots=True)
class CostModel:
    """Cycles charged besides the cache hierarchy."""

    l1_tlb_hit: int = field(default_factory=lambda: _cycles("l1_tlb_hit_cycles"))  # overlapped
    stlb_hit: int = field(default_factory=lambda: _cycles("stlb_hit_cycles"))
    psc_lookup: int = field(default_factory=lambda: _cycles("psc_lookup_cycles"))
    walk_start: int = field(default_factory=lambda: _cycles("walk_start_cycles"))  # PMH dispatch

    @classmethod
    def from_profile(cls, profile: CostProfile) -> CostModel:
        """The cycle costs of ``profile``."""
        return cls(
            profile.cycles("l1_tlb_hit_cycles"),
            profile.cycles("stlb_hit_cycles"),
            profile.cycles("psc_lookup_cycles"),
            profile.cycles("walk_start_cycles"),
        )

    def as_dict(self) -> dict[str, int]:
        """The cycle costs by name."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class MmuConfig:
    """Everything the translation hardware caches and what it costs: TLBs and paging-structure
    caches, the data caches, the cycle costs, memory encryption."""
    tlb: TlbConfig = field(default_factory=TlbConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    cost: CostModel = field(default_factory=CostModel)
    encryption: EncryptionConfig = field(default_factory=EncryptionConfig)

    @property
    def dram_cycles(self) -> int:
        """What a reference served by DRAM costs: the access, then any decryption."""
        return self.cache.dram_latency + self.encryption.dram_penalty

    @classmethod
    def from_profile(cls, profile: CostProfile, tlb: TlbConfig | None = None) -> MmuConfig:
        """Default structures priced by ``profile`` (encryption off)."""
        return cls(
            tlb=TlbConfig() if tlb is None else tlb,
            cache=CacheConfig.from_profile(profile),
            cost=CostModel.from_profile(profile),
        )

    @classmethod
    def uncached(cls) -> MmuConfig:
        """No TLBs, no paging-structure caches: the engine walks exactly like the oracle."""
        return cls(tlb=TlbConfig.disabled())
