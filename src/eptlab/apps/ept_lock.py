"""What the VM's EPT editors share: the EPT lock and the pool of released host frames.

Every EPT editor takes :class:`EptLock` (the prefetch from scan to commit, the EPT-violation
handler, migration, the balloon, KSM merging). The simulation runs one thing at a time, so
"waiting for the lock" is modelled by letting the holder finish: a waiter that finds the lock held
by a prefetch between its scan and commit runs that prefetch's commit first (the holder finishes
its critical section while the waiter spins), then takes the lock; ``contended`` counts these
waits. Released frames go to the :class:`FramePool` (LIFO, like Linux's per-CPU free lists), so a
frame freed by one remap is soon given to another page: a stale translation then reaches another
page's data.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

from ..arch.bits import PAGE_SHIFT, PageSize
from ..errors import EptlabError
from ..hv.host import HostMemory


class LockHolder(Protocol):
    """Something that can hold the EPT lock across scheduling points and finish on demand."""

    name: str

    def finish_critical_section(self) -> None: ...


class EptLock:
    """The VM's EPT lock. ``enforced=False`` (the ``no_lock`` variant) makes it a no-op.

    Only a prefetch holds it across scheduling points (from scan to commit); every other editor
    holds it inside one synchronous call. A waiter lets the holder finish (see module docs)."""

    def __init__(self, enforced: bool = True) -> None:
        self.enforced = enforced
        self.holder: LockHolder | str | None = None
        self.acquisitions = 0
        self.contended = 0

    def acquire(self, who: LockHolder | str) -> None:
        if not self.enforced:
            return
        while self.holder is not None:
            holder = self.holder
            if isinstance(holder, str):
                raise EptlabError(f"EPT lock: {who!r} waits for {holder!r}, which cannot progress")
            self.contended += 1
            holder.finish_critical_section()
            if self.holder is holder:
                raise EptlabError(f"EPT lock: {holder.name} did not release the lock")
        self.holder = who
        self.acquisitions += 1

    def release(self, who: LockHolder | str) -> None:
        if not self.enforced:
            return
        if self.holder is not who:
            raise EptlabError(f"EPT lock released by {who!r}, held by {self.holder!r}")
        self.holder = None


class FramePool:
    """A LIFO cache of released 4 KiB host frames (the pool keeps the frame's last reference).

    :meth:`release` drops a mapping's reference: a frame still mapped elsewhere only loses the
    reference; a frame whose last mapping goes is parked here (up to ``capacity``) and handed
    out, zeroed, by the next :meth:`alloc` -- so freed frames are reused at once, as a real
    allocator's hot free lists do. Parked frames count as free for the checker."""

    def __init__(self, host: HostMemory, capacity: int = 64) -> None:
        self.host, self.capacity = host, capacity
        self._frames: list[int] = []
        self.reused = 0

    def alloc(self) -> int:
        if self._frames:
            hpa = self._frames.pop()
            self.host.memory.discard(hpa >> PAGE_SHIFT)  # zeroed for its new owner
            self.reused += 1
            return hpa
        return self.host.alloc(PageSize.SIZE_4K)

    def release(self, hpa: int) -> None:
        if self.host.refs(hpa) == 1 and len(self._frames) < self.capacity:
            self._frames.append(hpa)
        else:
            self.host.release(hpa)

    def held(self) -> Collection[int]:
        """HPAs of the parked frames."""
        return self._frames


__all__ = ["EptLock", "FramePool", "LockHolder"]
