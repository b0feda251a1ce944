"""What every trace reader yields."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..errors import ConfigError


@dataclass(frozen=True)
class TraceChunk:
    """A run of accesses: virtual addresses, kinds (0 read, 1 write, 2 fetch), sizes."""

    address: npt.NDArray[np.int64]
    kind: npt.NDArray[np.int8]
    size: npt.NDArray[np.int32]

    def __len__(self) -> int:
        return int(self.address.shape[0])


def rechunk(parts: Iterable[TraceChunk], chunk: int) -> Iterator[TraceChunk]:
    """Regroup a stream of chunks of any sizes into chunks of exactly ``chunk`` accesses (the
    last one may be shorter). Empty input chunks are dropped."""
    if chunk < 1:
        raise ConfigError("chunk", f"must be at least 1, got {chunk}")
    pending: list[TraceChunk] = []
    count = 0
    for part in parts:
        if len(part) == 0:
            continue
        pending.append(part)
        count += len(part)
        if count < chunk:
            continue
        whole = _concat(pending)
        start = 0
        while count - start >= chunk:
            yield _slice(whole, start, start + chunk)
            start += chunk
        pending = [_slice(whole, start, count)] if start < count else []
        count -= start
    if pending:
        yield _concat(pending)


def _concat(parts: list[TraceChunk]) -> TraceChunk:
    if len(parts) == 1:
        return parts[0]
    return TraceChunk(
        np.concatenate([p.address for p in parts]).astype(np.int64, copy=False),
        np.concatenate([p.kind for p in parts]).astype(np.int8, copy=False),
        np.concatenate([p.size for p in parts]).astype(np.int32, copy=False),
    )


def _slice(c: TraceChunk, start: int, stop: int) -> TraceChunk:
    return TraceChunk(c.address[start:stop], c.kind[start:stop], c.size[start:stop])
