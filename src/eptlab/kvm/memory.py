"""Guest memory for KVM: a memfd mapped into this process (shared, or private for clones).

A clone maps the parent's memfd ``MAP_PRIVATE``: the host kernel copies a page on the first
write to it (and KVM's MMU notifiers keep the VM's second-level tables in step), so a fork
costs a mapping, and only written pages consume memory. ``Private_Dirty`` of the mapping in
``/proc/self/smaps`` counts them.
"""

from __future__ import annotations

import mmap
import os
import struct
import weakref

from ..errors import ConfigError
from .fds import buffer_address

MAP_NORESERVE = 0x4000  # linux: no swap reservation for a private writable mapping
MADV_POPULATE_WRITE = 23  # linux 5.14: fault the range in, writable, now
PAGE = 4096


def _release(m: mmap.mmap, fd: int | None) -> None:
    m.close()
    if fd is not None:
        os.close(fd)


class GuestMemory:
    """``size`` bytes of guest-physical memory from offset 0 of a memfd."""

    def __init__(self, size: int, *, memfd: int | None = None, private: bool = False,
                 name: str = "eptlab-guest") -> None:
        if size <= 0 or size % PAGE:
            raise ConfigError("memory", f"{size} is not a positive multiple of 4 KiB")
        owned = memfd is None
        fd = os.memfd_create(name, os.MFD_CLOEXEC) if memfd is None else memfd
        try:
            if owned:
                os.ftruncate(fd, size)
            flags = (mmap.MAP_PRIVATE | MAP_NORESERVE) if private else mmap.MAP_SHARED
            m = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            if owned:
                os.close(fd)
            raise
        self.size, self.fd, self.private, self.mmap = size, fd, private, m
        self.address = buffer_address(m)
        self._finalizer = weakref.finalize(self, _release, m, fd if owned else None)

    def clone_private(self) -> GuestMemory:
        """A copy-on-write view of this memory: the same memfd, mapped ``MAP_PRIVATE``."""
        return GuestMemory(self.size, memfd=self.fd, private=True)

    def close(self) -> None:
        """Unmap and close the memfd."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        """Whether the memory has been released."""
        return not self._finalizer.alive

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- access from the host -------------------------------------------------------------------

    def write(self, gpa: int, data: bytes) -> None:
        """Write ``data`` at ``gpa``."""
        self.mmap[gpa : gpa + len(data)] = data

    def read(self, gpa: int, size: int) -> bytes:
        """``size`` bytes at ``gpa``."""
        return self.mmap[gpa : gpa + size]

    def read_u64(self, gpa: int) -> int:
        """The little-endian 8-byte word at ``gpa``."""
        value: int = struct.unpack_from("<Q", self.mmap, gpa)[0]
        return value

    def write_u64(self, gpa: int, value: int) -> None:
        """Write the little-endian 8-byte word ``value`` at ``gpa``."""
        struct.pack_into("<Q", self.mmap, gpa, value & (1 << 64) - 1)

    def file_read_u64(self, gpa: int) -> int:
        """The value in the memfd itself (what a snapshot holds), bypassing this mapping."""
        value: int = struct.unpack("<Q", os.pread(self.fd, 8, gpa))[0]
        return value

    def populate_write(self, gpa: int, size: int) -> None:
        """Fault ``[gpa, gpa + size)`` in, writable, from the host (``MADV_POPULATE_WRITE``)."""
        self.mmap.madvise(MADV_POPULATE_WRITE, gpa, size)

    # -- accounting -----------------------------------------------------------------------------

    def smaps(self) -> dict[str, int]:
        """This mapping's ``/proc/self/smaps`` fields, in bytes (kB fields) or counts."""
        start = f"{self.address:x}-"
        fields: dict[str, int] = {}
        with open("/proc/self/smaps") as f:
            found = False
            for line in f:
                if not found:
                    found = line.startswith(start)
                    continue
                key, _, rest = line.partition(":")
                if " " in key or not rest:  # the next mapping's header line
                    break
                parts = rest.split()
                if parts and parts[0].isdigit():
                    scale = 1024 if len(parts) > 1 and parts[1] == "kB" else 1
                    fields[key] = int(parts[0]) * scale
        return fields

    def private_dirty_bytes(self) -> int:
        """Bytes of this mapping the host copied (``Private_Dirty`` in smaps)."""
        return self.smaps().get("Private_Dirty", 0)
