"""Processor state a translation depends on: guest control registers, the VMCS fields of EPT and
PML, and fixed CPU features. Plain data; the walker and the fast engine read them."""

from __future__ import annotations

from dataclasses import dataclass

from ..arch.ept import Eptp
from ..arch.mktme import KeyIdLayout
from ..arch.paging import Cr0, Cr4, Efer
from ..errors import ConfigError

PML_ENTRIES = 512


@dataclass(frozen=True, slots=True)
class CpuFeatures:
    """What this processor model supports (CPUID / IA32_VMX_EPT_VPID_CAP)."""

    maxphyaddr: int = 46
    ept_execute_only: bool = True
    advanced_ept_exit_info: bool = True  # exit-qualification bits 9-11 of EPT violations
    # TME-MK: upper physical-address bits repurposed as a key ID (IA32_TME_ACTIVATE[35:32]);
    # MAXPHYADDR still counts them, memory must fit below them (see eptlab.arch.mktme)
    keyid_bits: int = 0

    def __post_init__(self) -> None:
        if not 36 <= self.maxphyaddr <= 52:
            raise ConfigError("maxphyaddr", f"{self.maxphyaddr} is not in 36..52")
        KeyIdLayout(self.maxphyaddr, self.keyid_bits)  # refuses impossible keyid_bits

    @property
    def keyids(self) -> KeyIdLayout:
        """Where key IDs sit in host-physical addresses."""
        return KeyIdLayout(self.maxphyaddr, self.keyid_bits)

    def check_host_memory(self, size: int) -> None:
        """ConfigError unless ``size`` bytes of host memory fit below the key-ID bits."""
        self.keyids.check_memory(size)


@dataclass(slots=True)
class GuestState:
    """Guest registers that control paging (SDM Vol. 3A §4.1). IA-32e mode is required."""

    cr3: int
    cr0: int = Cr0.PE | Cr0.PG | Cr0.WP
    cr4: int = Cr4.PAE
    efer: int = Efer.LME | Efer.LMA | Efer.NXE
    pkru: int = 0
    rflags: int = 0x2

    def __post_init__(self) -> None:
        if not self.cr0 & Cr0.PG or not self.cr4 & Cr4.PAE or not self.efer & Efer.LMA:
            raise ConfigError(
                "GuestState", "eptlab models IA-32e paging: CR0.PG, CR4.PAE and EFER.LMA must be 1"
            )


@dataclass(slots=True)
class Vmcs:
    """The VMCS fields that govern translation: EPTP, VPID, mode-based execute control,
    page-modification logging (address of the 4 KiB log and the 16-bit index), and the VT-rp
    controls (tertiary processor-based controls: bit 1 "enable HLAT", bit 2 "EPT paging-write
    control", bit 3 "guest-paging verification"; the HLAT pointer and the HLAT prefix size).

    Only the reference walker models the VT-rp controls; the fast engine refuses a VMCS that
    sets them (:meth:`eptlab.mmu.engine.Engine.run`)."""

    eptp: Eptp
    vpid: int = 1
    mbec: bool = False
    pml_enabled: bool = False
    pml_address: int = 0
    pml_index: int = PML_ENTRIES - 1
    hlat: bool = False  # SDM Vol. 3A §4.5.1: HLAT paging for linear addresses in the range
    hlatp: int = 0  # guest-physical address of the HLAT PML4 table (CR3 format)
    hlat_prefix_size: int = 0  # 0: every linear address; 1: those with bit 63 set
    paging_write: bool = False  # EPT leaf bit 58 (PWA) allows paging writes (SDM §29.3.3.2)
    guest_paging_verification: bool = False  # EPT leaf bit 57 (VGP) checks the walk's PWA

    @property
    def vt_rp(self) -> bool:
        """Whether any VT-rp control (HLAT, paging-write, guest-paging verification) is on."""
        return self.hlat or self.paging_write or self.guest_paging_verification

    def __post_init__(self) -> None:
        if self.hlat_prefix_size not in (0, 1):
            # SDM Vol. 3A §4.5.1: behaviour is defined for a maximum HLAT prefix size of 1
            raise ConfigError("Vmcs.hlat_prefix_size", f"{self.hlat_prefix_size} is not 0 or 1")
        if self.hlatp % 4096:
            raise ConfigError("Vmcs.hlatp", f"{self.hlatp:#x} is not 4 KiB aligned")
        if self.pml_enabled and not self.eptp.ad_enabled:
            raise ConfigError("Vmcs.pml_enabled", "PML needs EPT accessed/dirty flags (EPTP bit 6)")
        if self.pml_address % 4096:
            raise ConfigError("Vmcs.pml_address", f"{self.pml_address:#x} is not 4 KiB aligned")
