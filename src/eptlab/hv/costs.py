"""Cycles charged for hypervisor work the translation engine does not model. One place, so
every application prices an exit, an INVEPT, an EPT edit and a copy the same way, and turns
cycles into time with the same clock.

The numbers come from the cost profile (:mod:`eptlab.costs`): :func:`hv_costs` reads the active
one (or the one given) each time it is called, so ``with use_profile(p):`` changes every price.
The old module constants (``VMEXIT_CYCLES``, ...) still resolve, to the *active* profile's
value at the moment they are read; import :func:`hv_costs` in new code instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..costs import CostProfile, active_profile


@dataclass(frozen=True, slots=True)
class HvCosts:
    """The hypervisor's prices, in cycles (and the clock that turns them into time)."""

    vmexit: int  # VM exit + VM entry round trip, handler dispatch included
    invept: int  # the instruction; refill walks are counted by the engine
    ept_edit: int  # read-modify-write of one EPT entry
    copy_bytes_per_cycle: float  # memcpy / memset bandwidth
    frame_alloc: int  # taking a frame from the host allocator
    cycles_per_us: float  # the clock: converts modelled cycles into modelled time
    emulate: int  # fetch + decode a trapped access, check it, perform or refuse it

    @classmethod
    def from_profile(cls, profile: CostProfile) -> HvCosts:
        """The hypervisor costs of ``profile``."""
        return cls(
            vmexit=profile.cycles("vmexit_cycles"),
            invept=profile.cycles("invept_cycles"),
            ept_edit=profile.cycles("ept_edit_cycles"),
            copy_bytes_per_cycle=profile["copy_bytes_per_cycle"],
            frame_alloc=profile.cycles("frame_alloc_cycles"),
            cycles_per_us=profile["clock_ghz"] * 1_000,
            emulate=profile.cycles("emulate_cycles"),
        )

    def copy_cycles(self, size: int) -> int:
        """Cycles to copy (or zero) ``size`` bytes."""
        return int(size // self.copy_bytes_per_cycle)


def hv_costs(profile: CostProfile | None = None) -> HvCosts:
    """The prices of ``profile``, or of the active profile."""
    return HvCosts.from_profile(active_profile() if profile is None else profile)


_LEGACY = {
    "VMEXIT_CYCLES": "vmexit",
    "INVEPT_CYCLES": "invept",
    "EPT_EDIT_CYCLES": "ept_edit",
    "COPY_BYTES_PER_CYCLE": "copy_bytes_per_cycle",
    "FRAME_ALLOC_CYCLES": "frame_alloc",
    "CYCLES_PER_US": "cycles_per_us",
    "EMULATE_CYCLES": "emulate",
}


def __getattr__(name: str) -> Any:
    if name in _LEGACY:
        return getattr(hv_costs(), _LEGACY[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
