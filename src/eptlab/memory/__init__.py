"""Physical memory (sparse 4 KiB frames in numpy arrays) and frame allocation."""

from .allocator import FrameAllocator
from .buddy import AgingConfig, BuddyAllocator
from .layout import LAYOUTS, LayoutConfig
from .physical import PhysicalMemory

__all__ = [
    "LAYOUTS",
    "AgingConfig",
    "BuddyAllocator",
    "FrameAllocator",
    "LayoutConfig",
    "PhysicalMemory",
]
