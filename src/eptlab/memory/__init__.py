"""Physical memory (sparse 4 KiB frames in numpy arrays) and frame allocation."""

from .allocator import FrameAllocator
from .physical import PhysicalMemory

__all__ = ["FrameAllocator", "PhysicalMemory"]
