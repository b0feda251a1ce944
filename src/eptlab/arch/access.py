"""The kind of a memory access and the privilege it is made at."""

from __future__ import annotations

from enum import IntEnum


class Access(IntEnum):
    """What the access does (the numba engine uses these integer values)."""

    READ = 0
    WRITE = 1
    FETCH = 2

    @classmethod
    def parse(cls, text: str) -> Access:
        """The access named ``read``, ``write`` or ``fetch`` (any case); ValueError otherwise."""
        try:
            return cls[text.upper()]
        except KeyError:
            raise ValueError(f"unknown access {text!r} (expected read, write or fetch)") from None


class Mode(IntEnum):
    """Privilege of the access: supervisor (CPL < 3) or user (CPL = 3), SDM Vol. 3A §4.6."""

    SUPERVISOR = 0
    USER = 1
