"""The translation hardware: the reference walker (the oracle) and, later, the fast engine."""

from .context import CpuFeatures, GuestState, Vmcs
from .walker import DATA, Dim, FlagWrite, Reference, ReferenceWalker, Translation

__all__ = [
    "DATA",
    "CpuFeatures",
    "Dim",
    "FlagWrite",
    "GuestState",
    "Reference",
    "ReferenceWalker",
    "Translation",
    "Vmcs",
]
