"""Memory encryption (Intel TME/TME-MK, AMD SME/SEV) under native and nested paging.

The memory controller decrypts every line read from DRAM; lines in the caches are plaintext.
The engine charges it as configuration (:class:`~eptlab.mmu.config.EncryptionConfig`): each
reference that DRAM serves, page-walk reads included, costs the decryption latency on top of
the DRAM latency. Since encryption changes no hit or miss, the same stream run with and without
it sees the same references served at the same levels, and

    extra cycles = (decrypt + integrity latency) x (walk references from DRAM
                                                     + data references from DRAM)

exactly (:attr:`Comparison.predicted_extra_cycles`). A two-dimensional walk reads up to 24
entries where a native walk reads 4, so the walk part of that sum, and with it the translation
part of the slowdown, grows under EPT.

Key IDs (TME-MK): a platform with ``keyid_bits`` gives an encrypted VM its key ID through the
top address bits of its EPT leaves (:mod:`eptlab.arch.mktme`); host memory must fit below them.
Native runs use the TME key (key ID 0), which needs no address bits.

Confidential VMs (``EncryptionConfig.protection``: the ``mktme``, ``sev-snp`` and ``tdx``
presets of :class:`~eptlab.mmu.config.Protection`) choose per reference class (guest page
tables, EPT, private data, shared memory) whether DRAM lines are decrypted and MAC-checked, and
whether SEV-SNP's RMP check applies to each host-physical access of a nested walk; the engine's
protection pass prices them (:mod:`eptlab.mmu.protection`), and then

    extra cycles = decrypt x lines of encrypted classes + MAC x lines with a MAC
                   + RMP lookup x RMP-cache misses

exactly, with every DRAM line classified once (:meth:`Comparison.check`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..arch.bits import PageSize
from ..errors import ConfigError
from ..mmu.config import CacheConfig, CacheLevel, EncryptionConfig, MmuConfig
from ..mmu.context import CpuFeatures
from ..mmu.engine import Accesses, Engine
from ..mmu.protection import ProtectionStats
from ..mmu.scenario import NestedSpace
from ..mmu.stats import VcpuStats
from ..traces.model import TraceChunk

MODES = ("native", "nested")
DRAM = 3  # index of DRAM in VcpuStats.walk_refs_served / data_served
LLC_WAYS = 16


@dataclass(frozen=True)
class Platform:
    """One machine: its LLC size, memory encryption and key-ID bits."""

    llc_mib: int = 32
    encryption: EncryptionConfig = EncryptionConfig()
    keyid_bits: int = 0
    maxphyaddr: int = 46

    def __post_init__(self) -> None:
        if self.llc_mib < 1:
            raise ConfigError("llc_mib", f"{self.llc_mib} is not a positive number of MiB")
        self.mmu()  # refuses LLC sizes that do not give 2^k sets
        self.features()  # refuses impossible key-ID widths

    def mmu(self) -> MmuConfig:
        default = CacheConfig()
        llc = CacheLevel(self.llc_mib << 20, LLC_WAYS, default.llc.latency)
        return MmuConfig(cache=CacheConfig(llc=llc), encryption=self.encryption)

    def features(self) -> CpuFeatures:
        return CpuFeatures(maxphyaddr=self.maxphyaddr, keyid_bits=self.keyid_bits)


def build_space(
    mode: str,
    platform: Platform,
    gva: int,
    length: int,
    *,
    host_memory: int,
    key_id: int = 0,
    guest_page: PageSize = PageSize.SIZE_4K,
    ept_page: PageSize = PageSize.SIZE_4K,
    seed: int = 0,
) -> NestedSpace:
    """``seed`` places memory under the aged layout. A guest address space mapping
    ``[gva, gva + length)`` (``gva`` 1 GiB aligned, ``length``
    whole 2 MiB regions) natively or under an EPT whose leaves carry ``key_id``; guest page
    tables are backed by the same EPT page size as data (a hypervisor backs all guest RAM
    alike)."""
    if mode not in MODES:
        raise ConfigError("mode", f"{mode!r} is not one of {', '.join(MODES)}")
    gib, region = PageSize.SIZE_1G.value, PageSize.SIZE_2M.value
    if gva % gib or length <= 0 or length % region:
        raise ConfigError("length", "map a 1 GiB-aligned range of whole 2 MiB regions")
    nested = mode == "nested"
    space = NestedSpace.create(
        use_ept=nested,
        host_memory=host_memory,
        guest_memory=host_memory,
        features=platform.features(),
        table_ept_page=ept_page if nested else PageSize.SIZE_4K,
        key_id=key_id if nested else 0,
        seed=seed,
    )
    whole = length - length % gib  # whole GiBs in 1 GiB pieces, the rest in 2 MiB ones
    if whole:
        space.map_range(gva, whole, guest_page, ept_page)
    if length - whole:
        space.map_range(gva + whole, length - whole, guest_page, ept_page)
    return space


def run_stream(
    space: NestedSpace, platform: Platform, chunks: Iterable[TraceChunk], *, warmup: int = 0
) -> VcpuStats:
    """Run the chunks on a fresh engine (cold TLBs and caches) for one vCPU and return the
    statistics of all but the first ``warmup`` accesses (those warm the TLBs and caches). Every
    access must be mapped (an exit or a fault is a RuntimeError)."""
    return run_measured(space, platform, chunks, warmup=warmup)[0]


def run_measured(
    space: NestedSpace, platform: Platform, chunks: Iterable[TraceChunk], *, warmup: int = 0
) -> tuple[VcpuStats, ProtectionStats]:
    """:func:`run_stream`, with the protection pass's counters of the same accesses."""
    engine = Engine(space.memory, platform.mmu(), space.features)
    engine.add_vcpu(space.guest, space.vmcs)
    position = 0
    for chunk in chunks:
        n = len(chunk)
        cuts = [0, warmup - position, n] if position < warmup < position + n else [0, n]
        for lo, hi in zip(cuts, cuts[1:], strict=False):
            if position + lo == warmup:
                engine.reset_stats()  # the warm-up ends here
            result = engine.run(Accesses.build(chunk.address[lo:hi], chunk.kind[lo:hi]))
            if not result.done:
                raise RuntimeError(f"unmapped access: {result.exit or result.fault}")
        position += n
    if position <= warmup:
        raise ConfigError("warmup", f"{warmup} leaves none of the {position} accesses to measure")
    return engine.stats(), engine.protection_stats()


def dram_lines(stats: VcpuStats) -> tuple[int, int]:
    """(walk references, data references) that DRAM served: the lines decrypted."""
    return stats.walk_refs_served[DRAM], stats.data_served[DRAM]


@dataclass(frozen=True)
class Comparison:
    """The same stream on the same machine without and with encryption."""

    plain: VcpuStats
    encrypted: VcpuStats
    encryption: EncryptionConfig
    passed: ProtectionStats | None = None  # the protection pass's counters (with a protection)

    @property
    def same_references(self) -> bool:
        """Encryption changed no hit or miss (the precondition of the cost identity)."""
        return (
            self.plain.walk_refs_served == self.encrypted.walk_refs_served
            and self.plain.data_served == self.encrypted.data_served
            and self.plain.walks == self.encrypted.walks
        )

    @property
    def extra_cycles(self) -> int:
        return self.encrypted.cycles - self.plain.cycles

    @property
    def extra_translation_cycles(self) -> int:
        return self.encrypted.translation_cycles - self.plain.translation_cycles

    @property
    def extra_data_cycles(self) -> int:
        return self.encrypted.data_cycles - self.plain.data_cycles

    @property
    def predicted_extra_cycles(self) -> int:
        """The penalty per DRAM line times the DRAM lines, walk and data (flat model); with a
        protection, what its pass priced: decryptions, MACs and RMP lookups."""
        if self.encryption.protection is not None:
            p = self._passed()
            return (
                self.encryption.decrypt_latency * p.decrypted
                + self.encryption.integrity_latency * p.macs
                + p.rmp_cycles
            )
        walk, data = dram_lines(self.plain)
        return self.encryption.dram_penalty * (walk + data)

    def _passed(self) -> ProtectionStats:
        if self.passed is None:
            raise RuntimeError("a protected run needs its protection counters")
        return self.passed

    @property
    def slowdown_pct(self) -> float:
        return 100.0 * self.extra_cycles / self.plain.cycles if self.plain.cycles else 0.0

    @property
    def walk_share_pct(self) -> float | None:
        """Share of the extra cycles due to page-walk reads (None without extra cycles)."""
        if not self.extra_cycles:
            return None
        return 100.0 * self.extra_translation_cycles / self.extra_cycles

    def check(self) -> None:
        """The cost identity; a RuntimeError names what broke it."""
        if not self.same_references:
            raise RuntimeError("encryption changed which level served a reference")
        if self.extra_cycles != self.predicted_extra_cycles:
            raise RuntimeError(
                f"extra cycles {self.extra_cycles} != penalty x DRAM lines "
                f"{self.predicted_extra_cycles}"
            )
        walk, data = dram_lines(self.plain)
        if self.encryption.protection is not None:
            p = self._passed()
            if sum(p.lines) != walk + data:
                raise RuntimeError(f"classified {sum(p.lines)} DRAM lines of {walk + data}")
            if (self.extra_translation_cycles, self.extra_data_cycles) != (
                p.translation_cycles, p.data_cycles
            ):
                raise RuntimeError("translation/data cycles did not grow by the pass's split")
            return
        if self.extra_translation_cycles != self.encryption.dram_penalty * walk:
            raise RuntimeError("translation cycles did not grow by penalty x walk DRAM lines")
        if self.extra_data_cycles != self.encryption.dram_penalty * data:
            raise RuntimeError("data cycles did not grow by penalty x data DRAM lines")
