"""Multi-key memory encryption key IDs in host-physical addresses (Intel TME-MK, "MKTME").

Intel Architecture Memory Encryption Technologies Specification (doc. 336907), §4:
IA32_TME_ACTIVATE (MSR 982H) bits 35:32, MK_TME_KEYID_BITS, give K, the number of upper
physical-address bits repurposed as a key ID. CPUID.80000008H still reports MAXPHYADDR with those
bits included; the key ID occupies bits MAXPHYADDR-1 .. MAXPHYADDR-K of every physical address
and the memory behind it must fit in the MAXPHYADDR-K bits below (Linux lowers x86_phys_bits by
K; KVM does not treat the key-ID bits as reserved in EPT entries). Under EPT a hypervisor gives
a VM a key by writing the key ID into the top address bits of the VM's EPT leaves; guest
physical addresses carry no key ID. Key ID 0 is the TME (platform) key. Bit format only.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import AddressError, ConfigError
from .bits import PAGE_SHIFT

MAX_KEYID_BITS = 15  # MK_TME_KEYID_BITS is a 4-bit field


@dataclass(frozen=True, slots=True)
class KeyIdLayout:
    """Where the key ID sits in a ``maxphyaddr``-bit physical address with ``keyid_bits`` of
    key ID (0: no key IDs, every address is a plain frame address)."""

    maxphyaddr: int
    keyid_bits: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.keyid_bits <= MAX_KEYID_BITS:
            raise ConfigError(
                "keyid_bits", f"{self.keyid_bits} is not in 0..{MAX_KEYID_BITS} (a 4-bit field)"
            )
        if self.maxphyaddr - self.keyid_bits <= PAGE_SHIFT:
            raise ConfigError(
                "keyid_bits",
                f"{self.keyid_bits} key-ID bits leave no frame-number bits in a "
                f"{self.maxphyaddr}-bit physical address",
            )

    @property
    def shift(self) -> int:
        """Bit position of the key ID: the width of the usable physical address."""
        return self.maxphyaddr - self.keyid_bits

    @property
    def keys(self) -> int:
        """Key IDs there are (key ID 0, the TME key, included)."""
        return 1 << self.keyid_bits

    @property
    def max_memory(self) -> int:
        """Bytes of physical memory addressable below the key ID."""
        return 1 << self.shift

    def check_key(self, key_id: int) -> None:
        """Raise ConfigError unless ``key_id`` fits in the key-ID bits."""
        if not 0 <= key_id < self.keys:
            raise ConfigError(
                "key_id",
                f"{key_id} does not fit in {self.keyid_bits} key-ID bits (0..{self.keys - 1})",
            )

    def check_memory(self, size: int) -> None:
        """A memory of ``size`` bytes must fit below the key ID."""
        if size > self.max_memory:
            raise ConfigError(
                "host_memory",
                f"{size:#x} bytes do not fit in the {self.shift} physical-address bits that "
                f"{self.keyid_bits} key-ID bits leave of MAXPHYADDR {self.maxphyaddr}",
            )

    def compose(self, address: int, key_id: int) -> int:
        """``address`` (a plain physical address) tagged with ``key_id``."""
        self.check_key(key_id)
        if not 0 <= address < self.max_memory:
            raise AddressError(
                f"{address:#x} does not fit below the key ID (bit {self.shift} and up)"
            )
        return address | (key_id << self.shift)

    def key_id(self, address: int) -> int:
        """The key ID an address carries."""
        return (address >> self.shift) & (self.keys - 1)

    def strip(self, address: int) -> int:
        """The address without its key ID (what locates the line in DRAM)."""
        return address & (self.max_memory - 1)
