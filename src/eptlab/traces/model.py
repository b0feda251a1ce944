"""What every trace reader yields."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class TraceChunk:
    """A run of accesses: virtual addresses, kinds (0 read, 1 write, 2 fetch), sizes."""

    address: npt.NDArray[np.int64]
    kind: npt.NDArray[np.int8]
    size: npt.NDArray[np.int32]

    def __len__(self) -> int:
        return int(self.address.shape[0])
