"""Cost profiles: every constant that turns simulated events into cycles or time, with its
source (measured, cited or assumed). Sits below ``memory`` and ``mmu``: imports nothing of
eptlab but ``errors``."""

from .active import active_profile, load_profile, use_profile
from .profile import SOURCE_KINDS, CostProfile, CostValue, Source, SourceKind

__all__ = [
    "SOURCE_KINDS",
    "CostProfile",
    "CostValue",
    "Source",
    "SourceKind",
    "active_profile",
    "load_profile",
    "use_profile",
]
