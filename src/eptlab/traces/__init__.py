"""Trace readers: real program traces as chunks of numpy arrays (addresses, access kinds)."""

from .lackey import read_lackey
from .model import TraceChunk

__all__ = ["TraceChunk", "read_lackey"]
