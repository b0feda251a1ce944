"""The LLC slice hash: which slice of a sliced last-level cache a host-physical line goes to.

Intel client and small server parts with 2, 4 or 8 cores split the LLC into one slice per core
and pick a line's slice with a linear (XOR) function of its physical address bits. The functions
used here are the ones reverse-engineered with performance counters by C. Maurice, N. Le Scouarnec,
C. Neumann, A. Heen and A. Francillon, "Reverse Engineering Intel Last-Level Cache Complex
Addressing Using Performance Counters", RAID 2015 (Table 3: o0, o1, o2 over address bits 6-37;
2 cores: o0; 4 cores: o1 o0; 8 cores: o2 o1 o0). Parts with other core counts use non-linear
functions that are not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..errors import ConfigError

# Maurice et al., RAID 2015, Table 3: the physical address bits XORed into each slice bit.
O0 = (6, 10, 12, 14, 16, 17, 18, 20, 22, 24, 25, 26, 27, 28, 30, 32, 33, 35, 36)
O1 = (7, 11, 13, 15, 17, 19, 20, 21, 22, 23, 24, 26, 28, 29, 31, 33, 34, 35, 37)
O2 = (8, 12, 13, 16, 19, 22, 23, 26, 27, 30, 31, 34, 35, 36, 37)
SLICE_HASHES = ("off", "maurice-2", "maurice-4", "maurice-8")


def _mask(bits: tuple[int, ...]) -> int:
    return sum(1 << b for b in bits)


@dataclass(frozen=True)
class SliceHash:
    """A linear slice hash: slice bit ``i`` is the parity of ``hpa & masks[i]`` (no masks: one
    slice, ``off``)."""

    name: str
    masks: tuple[int, ...]

    @classmethod
    def named(cls, name: str) -> SliceHash:
        """``off`` or ``maurice-N`` for N = 2, 4, 8 cores (slices)."""
        functions = {"off": (), "maurice-2": (O0,), "maurice-4": (O0, O1),
                     "maurice-8": (O0, O1, O2)}
        if name not in functions:
            raise ConfigError("slice_hashes", f"{name!r} is not one of {', '.join(SLICE_HASHES)}")
        return cls(name, tuple(_mask(f) for f in functions[name]))

    @property
    def bits(self) -> int:
        """log2 of the slice count."""
        return len(self.masks)

    @property
    def slices(self) -> int:
        """How many slices."""
        return 1 << self.bits

    @property
    def input_mask(self) -> int:
        """Every address bit some slice bit depends on."""
        out = 0
        for m in self.masks:
            out |= m
        return out

    def of(self, hpa: int) -> int:
        """The slice of the line holding ``hpa``."""
        out = 0
        for i, m in enumerate(self.masks):
            out |= ((hpa & m).bit_count() & 1) << i
        return out

    def of_array(self, hpa: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
        """:meth:`of` for every element."""
        out = np.zeros(hpa.shape, np.int64)
        for i, m in enumerate(self.masks):
            parity = np.zeros(hpa.shape, np.uint64)
            for b in range(64):
                if m >> b & 1:
                    parity ^= (hpa >> np.uint64(b)) & np.uint64(1)
            out |= parity.astype(np.int64) << i
        return out
