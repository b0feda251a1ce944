"""Where things live in the guest's address spaces (Linux x86-64 conventions) and how much
address-space layout randomization moves them."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

KERNEL_TEXT_FLOOR = 0xFFFF_FFFF_8000_0000  # the kernel image is placed in the top 1 GiB...
KERNEL_TEXT_WINDOW = 1 << 30  # ...at a 2 MiB-aligned slot chosen by KASLR
DIRECT_MAP_BASE = 0xFFFF_8880_0000_0000  # all of guest-physical memory, mapped for the kernel
USER_PROGRAM_BASE = 0x0000_5555_5555_4000  # position-independent executables start here
USER_MMAP_TOP = 0x0000_7F00_0000_0000  # mmap regions grow down from here
USER_STACK_TOP = 0x0000_7FFF_FFFF_F000


@dataclass(frozen=True)
class AslrConfig:
    """Bits of entropy of each randomized base (0 disables it). Defaults follow Linux x86-64:
    28 bits for mmap, 22 for the stack, 13 for the heap (brk), 30 for the program (PIE),
    9 for the kernel image (512 slots of 2 MiB)."""

    mmap_bits: int = 28
    stack_bits: int = 22
    heap_bits: int = 13
    program_bits: int = 30
    kernel_bits: int = 9

    def __post_init__(self) -> None:
        limits = {
            "mmap_bits": 30,
            "stack_bits": 30,
            "heap_bits": 20,
            "program_bits": 30,
            "kernel_bits": 9,
        }
        for name, limit in limits.items():
            value = getattr(self, name)
            if not 0 <= value <= limit:
                raise ConfigError(f"AslrConfig.{name}", f"{value} is not in 0..{limit}")


@dataclass(frozen=True)
class KernelImage:
    """Sizes of the guest kernel image's regions (multiples of 2 MiB, mapped with 2 MiB pages
    as Linux does): code is read-execute, rodata read-only, data read-write."""

    code: int = 16 << 20
    rodata: int = 8 << 20
    data: int = 4 << 20

    def __post_init__(self) -> None:
        for name in ("code", "rodata", "data"):
            if getattr(self, name) <= 0 or getattr(self, name) % (2 << 20):
                raise ConfigError(f"KernelImage.{name}", "must be a positive multiple of 2 MiB")
