"""The guest OS model: processes, demand paging, ASLR, a kernel image, a page cache."""

from .kernel import File, GuestKernel, Process, Region
from .layout import DIRECT_MAP_BASE, AslrConfig, KernelImage

__all__ = [
    "DIRECT_MAP_BASE",
    "AslrConfig",
    "File",
    "GuestKernel",
    "KernelImage",
    "Process",
    "Region",
]
