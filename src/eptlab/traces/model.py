"""What every trace reader yields."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..errors import ConfigError


@dataclass(frozen=True)
class TraceChunk:
    """A run of accesses: virtual addresses, kinds (0 read, 1 write, 2 fetch), sizes, and the
    instruction pointer of each access when the source gives one (``ip``; None: unknown).
    The engine's input (:class:`eptlab.mmu.engine.Accesses`) has no ip: it is context for the
    hypervisor's handlers, not for translation."""

    address: npt.NDArray[np.int64]
    kind: npt.NDArray[np.int8]
    size: npt.NDArray[np.int32]
    ip: npt.NDArray[np.int64] | None = None

    def __post_init__(self) -> None:
        if self.ip is not None and self.ip.shape != self.address.shape:
            raise ConfigError("ip", "needs one instruction pointer per access")

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
    """One chunk of ``parts``; it has ips when any part has (0 where a part had none)."""
    if len(parts) == 1:
        return parts[0]
    ip = None
    if any(p.ip is not None for p in parts):
        ip = np.concatenate(
            [p.ip if p.ip is not None else np.zeros(len(p), np.int64) for p in parts]
        ).astype(np.int64, copy=False)
    return TraceChunk(
        np.concatenate([p.address for p in parts]).astype(np.int64, copy=False),
        np.concatenate([p.kind for p in parts]).astype(np.int8, copy=False),
        np.concatenate([p.size for p in parts]).astype(np.int32, copy=False),
        ip,
    )


def _slice(c: TraceChunk, start: int, stop: int) -> TraceChunk:
    ip = None if c.ip is None else c.ip[start:stop]
    return TraceChunk(c.address[start:stop], c.kind[start:stop], c.size[start:stop], ip)
