"""fork on KVM: a copy-on-write snapshot and fork of a VM by the host kernel.

The parent's memory is a memfd mapped ``MAP_SHARED``. The parent runs (``write_set``: it stores
a snapshot pattern into every page the clones will later write), stops, and is forked: each
clone maps the same memfd ``MAP_PRIVATE`` and gets a new VM, memslots and a vCPU with the
parent's special registers. A clone's first write to a page makes the host kernel copy it (KVM
follows through its MMU notifiers), so the fork costs a mapping, not a copy.

Checked: isolation (a clone sees its own stores; the other clones and the memfd -- the
snapshot -- keep the snapshot value), and memory (``Private_Dirty`` of each clone's mapping in
``/proc/self/smaps`` is exactly its written pages).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from ...errors import ConfigError
from ..backend import PAGE, PARAM_AREA, KvmGuest
from ..fds import Kvm
from ..memory import GuestMemory
from .common import MAX_LIST, Row, WritePattern, flavour_columns, put_list, user_mode

SNAPSHOT = 0x5AB5_0000_0000_0000
CLONE = 0xC10E_0000_0000_0000


@dataclass(frozen=True)
class ForkParams:
    """Parameters of the KVM fork application."""
    guest_mibs: tuple[int, ...] = (256, 1024, 4096)
    clones: int = 2
    pages: int = 64  # pages each clone writes (distinct across clones)
    seed: int = 0
    guest_cpl: int = 3


@dataclass
class ForkOutcome:
    """One fork: time per clone, pages copied, isolation checks."""
    guest_mib: int
    fork_seconds: list[float]  # per clone
    isolated: bool
    pages_written: list[int]  # per clone
    private_bytes: list[int]  # per clone, Private_Dirty after its writes
    patterns: list[WritePattern]


def fork_once(kvm: Kvm, memory: int, clones: int, pages: int, seed: int, *,
              user: bool = True) -> ForkOutcome:
    """Fork a ``memory``-byte parent into ``clones`` clones that each write ``pages`` pages."""
    if clones < 1:
        raise ConfigError("clones", "must be at least 1")
    if (clones + 1) * pages > MAX_LIST:
        raise ConfigError("pages", f"(clones + 1) x pages must be at most {MAX_LIST}")
    union = WritePattern.random(memory, clones * pages, seed)
    patterns = union.split(clones)
    with GuestMemory(memory) as memfd_memory:
        parent = KvmGuest(kvm, memfd_memory, "write_set", own_memory=False, user=user)
        children: list[KvmGuest] = []
        try:
            lists = [put_list(parent, union.addresses)]
            for i, pattern in enumerate(patterns):  # the clones' orders are in the snapshot
                lists.append(put_list(parent, pattern.addresses,
                                      PARAM_AREA + 8 * len(union) + 8 * i * pages))
            parent.start(r8=lists[0], r9=len(union), r10=1, r11=SNAPSHOT)
            parent.run()
            sregs = parent.vcpu.get_sregs()

            fork_seconds = []
            for _ in range(clones):
                start = time.perf_counter()
                child = KvmGuest(kvm, memfd_memory.clone_private(), "write_set", load=False,
                                 user=user)
                child.vcpu.set_sregs(sregs)
                fork_seconds.append(time.perf_counter() - start)
                children.append(child)

            for i, (child, pattern) in enumerate(zip(children, patterns, strict=True)):
                child.start(r8=lists[i + 1], r9=len(pattern), r10=1, r11=CLONE + i)
                child.run()
            private = [child.memory.private_dirty_bytes() for child in children]
            isolated = _isolated(memfd_memory, children, patterns)
        finally:
            for child in children:
                child.close()
            parent.close()
    return ForkOutcome(memory >> 20, fork_seconds, isolated, [len(p) for p in patterns],
                       private, patterns)


def _isolated(snapshot: GuestMemory, children: list[KvmGuest],
              patterns: list[WritePattern]) -> bool:
    """Each clone reads its own value at its addresses; every other clone and the memfd read
    the snapshot's."""
    for i, pattern in enumerate(patterns):
        for address in map(int, pattern.addresses):
            if snapshot.file_read_u64(address) != SNAPSHOT:
                return False
            for j, child in enumerate(children):
                expected = CLONE + i if j == i else SNAPSHOT
                if child.memory.read_u64(address) != expected:
                    return False
    return True


class Fork:
    """VM fork through MAP_PRIVATE guest memory on KVM."""
    name = "fork"

    def rows(self, p: ForkParams) -> Iterator[Row]:
        """One row per guest size."""
        with Kvm.open() as kvm:
            for mib in p.guest_mibs:
                o = fork_once(kvm, mib << 20, p.clones, p.pages, p.seed,
                              user=user_mode(p.guest_cpl))
                yield {
                    "guest_mib": mib,
                    "clones": p.clones,
                    "fork_ms": round(1e3 * sum(o.fork_seconds) / len(o.fork_seconds), 3),
                    "isolated": o.isolated,
                    "pages_written": sum(o.pages_written),
                    "pages_copied": sum(o.private_bytes) // PAGE,
                    "private_mib_after_writes": round(sum(o.private_bytes) / (1 << 20), 3),
                    **flavour_columns(p.guest_cpl),
                }
