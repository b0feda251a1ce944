"""What a calibration run measures, and how much of it: the full plan and the quick one."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30


def curve_footprints(smallest: int, largest: int, fine_until: int) -> tuple[int, ...]:
    """16 KiB, 16 KiB x sqrt(2), ... up to ``fine_until`` (half-octave steps, rounded to 64
    bytes), then doubling up to ``largest``."""
    out, size = [], smallest
    while size <= largest:
        out.append(size)
        if size < fine_until:
            half = int(size * 2**0.5) // 64 * 64
            if half < min(2 * size, largest + 1) and half > size:
                out.append(half)
        size *= 2
    return tuple(sorted(set(out)))


def at_least_four_llc(llc: int, floor: int = 64 * MIB) -> int:
    """The smallest power of two >= 4 x the LLC (and >= ``floor``)."""
    size = floor
    while size < 4 * llc:
        size *= 2
    return size


@dataclass(frozen=True)
class Plan:
    """Sizes are bytes. ``memory_fraction`` caps any one buffer at that share of MemAvailable
    (read just before mapping it); sizes beyond it are skipped with the reason."""

    curve: tuple[int, ...]
    curve_accesses: int
    walk_sizes: tuple[int, ...]
    walk_accesses: int
    copy_bytes: int
    repeats: int
    kvm: bool = True
    kvm_exits: int = 2_000
    kvm_trap_pages: int = 512
    kvm_harvest_pages: int = 2_048
    kvm_fork_mibs: tuple[int, ...] = (1024, 4096)
    memory_fraction: float = 0.6
    quick_mode: bool = False
    seed: int = 1

    def __post_init__(self) -> None:
        if self.repeats < 2:
            raise ConfigError("repeats", "a spread needs at least 2 repeats")
        if len(self.curve) < 4:
            raise ConfigError("curve", "at least 4 footprints (one per level)")
        if not 0 < self.memory_fraction <= 0.9:
            raise ConfigError("memory_fraction", f"{self.memory_fraction} is not in (0, 0.9]")

    @classmethod
    def full(cls, llc: int, *, kvm: bool = True, walk_max: int = 4 * GIB) -> Plan:
        """16 KiB to >= 4 x LLC; the walk penalty over 1 GiB .. ``walk_max`` (powers of 2)."""
        walk = tuple(s for s in (GIB, 2 * GIB, 4 * GIB, 8 * GIB, 16 * GIB) if s <= walk_max)
        return cls(curve=curve_footprints(16 * KIB, at_least_four_llc(llc), 64 * MIB),
                   curve_accesses=65_536, walk_sizes=walk, walk_accesses=262_144,
                   copy_bytes=GIB, repeats=5, kvm=kvm)

    @classmethod
    def quick(cls, *, kvm: bool = True) -> Plan:
        """Seconds, for tests: 16 KiB to 64 MiB, the walk at 64 MiB, small KVM runs. Its
        DRAM and walk figures are not this host's (64 MiB is not beyond every LLC)."""
        return cls(curve=curve_footprints(16 * KIB, 64 * MIB, 0), curve_accesses=8_192,
                   walk_sizes=(64 * MIB,), walk_accesses=16_384, copy_bytes=16 * MIB,
                   repeats=3, kvm=kvm, kvm_exits=500, kvm_trap_pages=64,
                   kvm_harvest_pages=512, kvm_fork_mibs=(64, 256), quick_mode=True)

    @property
    def buffer_bytes(self) -> int:
        """One buffer per page size holds the curve, the walk footprints and both copy halves."""
        return max(max(self.curve), max(self.walk_sizes, default=0), 2 * self.copy_bytes)
