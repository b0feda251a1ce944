"""Trace readers and writers: real program traces as chunks of numpy arrays (addresses, access
kinds, sizes), streamed. Formats: valgrind lackey text, ChampSim binary (plain, xz, gzip) and
eptlab's native format; ``record`` makes a native trace of a real program."""

from ..errors import RecordError
from .champsim import read_champsim
from .info import TraceInfo, detect_format, open_trace, summarize
from .lackey import read_lackey
from .model import TraceChunk
from .native import read_native, write_native
from .record import record

__all__ = [
    "RecordError",
    "TraceChunk",
    "TraceInfo",
    "detect_format",
    "open_trace",
    "read_champsim",
    "read_lackey",
    "read_native",
    "record",
    "summarize",
    "write_native",
]
