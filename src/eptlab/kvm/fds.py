"""One class per KVM file descriptor: :class:`Kvm` (/dev/kvm), :class:`VmFd`, :class:`VcpuFd`.

Each method performs one ioctl, raises :class:`~eptlab.errors.KvmError` naming the ioctl and the
errno when it fails, and returns a typed value. Every object is a context manager and also
closes on garbage collection (``weakref.finalize``), so descriptors and mappings are released
deterministically, also when a run ends in an error.

Ioctls go through libc's ``ioctl`` by ctypes (which releases the GIL and reports errno as is:
``KVM_RUN`` interrupted by a signal returns ``EINTR`` instead of being retried).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as errno_mod
import mmap
import os
import struct
import weakref
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from ..errors import KvmError, KvmUnavailable
from . import abi
from .vcpu_exit import (
    DirtyRingFull,
    FailEntry,
    HltExit,
    InternalError,
    Interrupted,
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    ShutdownExit,
    SystemEvent,
    UnknownExit,
    VcpuExit,
)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int

MAX_RETRIES = 1000
"""Calls in a row that may return EAGAIN (or EINTR, or no progress) before the ioctl is given up
on with a ``KvmError`` instead of spinning: ``KVM_PRE_FAULT_MEMORY`` and ``KVM_RUN``."""

Arg = ctypes.Structure | ctypes.Array[Any] | int | None


def ioctl(fd: int, name: str, arg: Arg = None) -> int:
    """``ioctl(fd, IOCTLS[name], arg)``: a structure is passed by address, an int by value.
    Returns the ioctl's non-negative result or raises ``KvmError(name, errno)``."""
    if isinstance(arg, ctypes.Structure | ctypes.Array):
        pointer: int | None = ctypes.addressof(arg)
    else:
        pointer = arg
    result: int = _libc.ioctl(fd, abi.IOCTLS[name], pointer)
    if result < 0:
        raise KvmError(name, ctypes.get_errno())
    return result


def buffer_address(m: mmap.mmap) -> int:
    """Address of an mmap's first byte (the buffer export is dropped at once)."""
    view = ctypes.c_char.from_buffer(m)
    address = ctypes.addressof(view)
    del view
    return address


class _Fd:
    """A file descriptor closed exactly once: by :meth:`close`, ``with``, or the collector."""

    kind = "fd"
    _finalizer: weakref.finalize[Any, Any]

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ioctl(self, name: str, arg: Arg = None) -> int:
        if self.closed:
            raise KvmError(name, errno_mod.EBADF, f"the {self.kind} is closed")
        return ioctl(self.fd, name, arg)


class StatsFd(_Fd):
    """The binary statistics of a VM or vCPU (KVM_GET_STATS_FD, Documentation/virt/kvm/api.rst
    "KVM_GET_STATS_FD"): counters by name, read with pread."""

    kind = "stats fd"

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        header = os.pread(fd, struct.calcsize(abi.STATS_HEADER), 0)
        _, name_size, count, _, desc_offset, self._data_offset = struct.unpack(
            abi.STATS_HEADER, header)
        step = struct.calcsize(abi.STATS_DESC) + name_size
        table = os.pread(fd, count * step, desc_offset)
        self._fields: list[tuple[str, int, int]] = []  # name, offset, values
        for i in range(count):
            _, _, size, offset, _ = struct.unpack_from(abi.STATS_DESC, table, i * step)
            raw = table[i * step + struct.calcsize(abi.STATS_DESC) : (i + 1) * step]
            self._fields.append((raw.split(b"\0")[0].decode(), offset, size))

    def read(self) -> dict[str, int]:
        """Every single-value counter, by name (histograms are left out)."""
        end = max((offset + 8 * size for _, offset, size in self._fields), default=0)
        data = os.pread(self.fd, end, self._data_offset)
        return {name: struct.unpack_from("<Q", data, offset)[0]
                for name, offset, size in self._fields if size == 1}


class Kvm(_Fd):
    """/dev/kvm."""

    kind = "/dev/kvm"

    @classmethod
    def open(cls, path: str | None = None) -> Kvm:
        """Open ``path`` (default ``$EPTLAB_KVM_DEVICE`` or /dev/kvm)."""
        path = path or os.environ.get("EPTLAB_KVM_DEVICE") or "/dev/kvm"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise KvmUnavailable(f"cannot open {path}: {exc.strerror}") from exc
        kvm = cls(fd)
        try:
            version = kvm.api_version()
        except KvmError as exc:  # it opened, but it is not KVM (e.g. /dev/null)
            kvm.close()
            raise KvmUnavailable(f"{path} is not a KVM device: {exc}") from exc
        if version != abi.API_VERSION:
            kvm.close()
            raise KvmUnavailable(f"KVM API version {version}, expected {abi.API_VERSION}")
        return kvm

    def api_version(self) -> int:
        """KVM_GET_API_VERSION."""
        return self._ioctl("KVM_GET_API_VERSION")

    def check_extension(self, cap: int) -> int:
        """0 when the capability is absent; otherwise its value (often 1, sometimes a size)."""
        return self._ioctl("KVM_CHECK_EXTENSION", int(cap))

    def vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE: bytes to map of a vCPU fd (``kvm_run`` and rings)."""
        return self._ioctl("KVM_GET_VCPU_MMAP_SIZE")

    def supported_cpuid(self) -> abi.Cpuid2:
        """KVM_GET_SUPPORTED_CPUID: the CPUID leaves KVM can offer a guest."""
        cpuid = abi.Cpuid2(nent=abi.CPUID_MAX_ENTRIES)
        self._ioctl("KVM_GET_SUPPORTED_CPUID", cpuid)
        return cpuid

    def create_vm(self) -> VmFd:
        """KVM_CREATE_VM: a new VM fd."""
        vm = VmFd(self._ioctl("KVM_CREATE_VM", 0), 0)  # owned (closed on error) from here
        try:
            vm.vcpu_mmap_size = self.vcpu_mmap_size()
        except BaseException:
            vm.close()
            raise
        return vm


class VmFd(_Fd):
    """One VM."""

    kind = "VM fd"

    def __init__(self, fd: int, vcpu_mmap_size: int) -> None:
        super().__init__(fd)
        self.vcpu_mmap_size = vcpu_mmap_size

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM: 0 when ``cap`` is missing."""
        return self._ioctl("KVM_CHECK_EXTENSION", int(cap))

    def set_user_memory_region(
        self, slot: int, gpa: int, size: int, userspace_addr: int, flags: int = 0
    ) -> None:
        """Create, change or (``size=0``) delete memslot ``slot``."""
        region = abi.UserspaceMemoryRegion(slot, int(flags), gpa, size, userspace_addr)
        self._ioctl("KVM_SET_USER_MEMORY_REGION", region)

    def enable_cap(self, cap: int, *args: int) -> None:
        """KVM_ENABLE_CAP with up to four arguments."""
        enable = abi.EnableCap(cap=int(cap))
        for i, value in enumerate(args):
            enable.args[i] = value
        self._ioctl("KVM_ENABLE_CAP", enable)

    def get_dirty_log(self, slot: int, pages: int) -> npt.NDArray[np.uint8]:
        """The slot's dirty bitmap (one bit per 4 KiB page, sized here), cleared by reading."""
        bitmap = np.zeros(((pages + 63) // 64) * 8, np.uint8)
        log = abi.DirtyLog(slot=slot, dirty_bitmap=bitmap.ctypes.data)
        self._ioctl("KVM_GET_DIRTY_LOG", log)
        return bitmap

    def reset_dirty_rings(self) -> int:
        """Re-protect the pages harvested from every vCPU's dirty ring; returns how many."""
        return self._ioctl("KVM_RESET_DIRTY_RINGS")

    def stats(self) -> StatsFd:
        """KVM_GET_STATS_FD: the VM's binary statistics."""
        return StatsFd(self._ioctl("KVM_GET_STATS_FD"))

    def create_vcpu(self, index: int = 0) -> VcpuFd:
        """KVM_CREATE_VCPU: a new vCPU fd with its ``kvm_run`` mapped."""
        return VcpuFd(self._ioctl("KVM_CREATE_VCPU", index), self.vcpu_mmap_size)


def dirty_pages(bitmap: npt.NDArray[np.uint8]) -> npt.NDArray[np.int64]:
    """Page numbers (within the slot) whose bit is set in a KVM dirty bitmap (LSB first)."""
    bits = np.unpackbits(bitmap, bitorder="little")
    return np.flatnonzero(bits).astype(np.int64)


class _Mapping:
    """An mmap and the ctypes views into it; views are dropped before the unmap."""

    def __init__(self, m: mmap.mmap) -> None:
        self.mmap = m
        self.views: list[object] = []

    def release(self) -> None:
        self.views.clear()
        with contextlib.suppress(BufferError):  # a view still held elsewhere: unmapped with it
            self.mmap.close()


def _release(mappings: list[_Mapping], fd: int) -> None:
    for mapping in mappings:
        mapping.release()
    mappings.clear()
    os.close(fd)


class VcpuFd(_Fd):
    """One vCPU, with its shared ``kvm_run`` page mapped."""

    kind = "vCPU fd"

    def __init__(self, fd: int, mmap_size: int) -> None:
        self.fd = fd
        self._mappings: list[_Mapping] = []
        self._finalizer = weakref.finalize(self, _release, self._mappings, fd)
        try:
            run_map = _Mapping(mmap.mmap(fd, mmap_size, mmap.MAP_SHARED,
                                         mmap.PROT_READ | mmap.PROT_WRITE))
        except OSError as exc:
            self.close()
            raise KvmError("mmap(vcpu)", exc.errno or 0) from exc
        self._mappings.append(run_map)
        self._run = abi.Run.from_buffer(run_map.mmap)
        run_map.views.append(self._run)
        self._run_mmap = run_map.mmap
        self._run_number = abi.IOCTLS["KVM_RUN"]

    def close(self) -> None:
        """Unmap ``kvm_run`` and close the fd."""
        self.__dict__.pop("_run", None)  # our view of kvm_run must go before the unmap
        self._finalizer()

    # -- running --------------------------------------------------------------------------------

    @property
    def immediate_exit(self) -> bool:
        """``kvm_run.immediate_exit``: KVM_RUN returns at once (EINTR) when set."""
        return bool(self._run.immediate_exit)

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        """``kvm_run.immediate_exit``: KVM_RUN returns at once (EINTR) when set."""
        self._run.immediate_exit = int(value)

    def run(self) -> VcpuExit:
        """KVM_RUN until the next exit to userspace, decoded. EINTR is :class:`Interrupted`;
        EAGAIN is retried, at most :data:`MAX_RETRIES` times in a row (then ``KvmError``)."""
        if self.closed:
            raise KvmError("KVM_RUN", errno_mod.EBADF, "the vCPU fd is closed")
        for _ in range(MAX_RETRIES):
            if _libc.ioctl(self.fd, self._run_number, None) >= 0:
                return self._decode()
            err = ctypes.get_errno()
            if err == errno_mod.EINTR or (err == errno_mod.EAGAIN and self.immediate_exit):
                return Interrupted()
            if err != errno_mod.EAGAIN:
                raise KvmError("KVM_RUN", err)
        raise KvmError("KVM_RUN", errno_mod.EAGAIN,
                       f"returned EAGAIN {MAX_RETRIES} times in a row; the vCPU cannot run")

    def _decode(self) -> VcpuExit:
        run = self._run
        reason = run.exit_reason
        if reason == abi.ExitReason.IO:
            io = run.exit.io
            if io.direction == abi.IO_OUT:
                n = io.size * io.count
                return IoOut(io.port, bytes(self._run_mmap[io.data_offset : io.data_offset + n]))
            return IoIn(io.port, io.size)
        if reason == abi.ExitReason.MMIO:
            mmio = run.exit.mmio
            if mmio.is_write:
                return MmioWrite(mmio.phys_addr, bytes(mmio.data)[: mmio.len])
            return MmioRead(mmio.phys_addr, mmio.len)
        if reason == abi.ExitReason.HLT:
            return HltExit()
        if reason == abi.ExitReason.SHUTDOWN:
            return ShutdownExit()
        if reason == abi.ExitReason.FAIL_ENTRY:
            fail = run.exit.fail_entry
            return FailEntry(fail.hardware_entry_failure_reason, fail.cpu)
        if reason == abi.ExitReason.INTERNAL_ERROR:
            internal = run.exit.internal
            return InternalError(internal.suberror, tuple(internal.data[: min(internal.ndata, 16)]))
        if reason == abi.ExitReason.SYSTEM_EVENT:
            return SystemEvent(run.exit.system_event.type)
        if reason == abi.ExitReason.DIRTY_RING_FULL:
            return DirtyRingFull()
        if reason == abi.ExitReason.INTR:
            return Interrupted()
        return UnknownExit(reason)

    def set_io_in(self, data: bytes) -> None:
        """The bytes an IN instruction reads (call before the next run)."""
        offset = self._run.exit.io.data_offset
        self._run_mmap[offset : offset + len(data)] = data

    # -- registers ------------------------------------------------------------------------------

    def get_regs(self) -> abi.Regs:
        """KVM_GET_REGS."""
        regs = abi.Regs()
        self._ioctl("KVM_GET_REGS", regs)
        return regs

    def set_regs(self, regs: abi.Regs) -> None:
        """KVM_SET_REGS."""
        self._ioctl("KVM_SET_REGS", regs)

    def get_sregs(self) -> abi.Sregs:
        """KVM_GET_SREGS."""
        sregs = abi.Sregs()
        self._ioctl("KVM_GET_SREGS", sregs)
        return sregs

    def set_sregs(self, sregs: abi.Sregs) -> None:
        """KVM_SET_SREGS."""
        self._ioctl("KVM_SET_SREGS", sregs)

    def set_cpuid2(self, cpuid: abi.Cpuid2) -> None:
        """KVM_SET_CPUID2."""
        self._ioctl("KVM_SET_CPUID2", cpuid)

    def stats(self) -> StatsFd:
        """KVM_GET_STATS_FD: the vCPU's binary statistics."""
        return StatsFd(self._ioctl("KVM_GET_STATS_FD"))

    def tsc_khz(self) -> int:
        """The guest's TSC frequency in kHz (``KVM_GET_TSC_KHZ``): converts its RDTSC deltas."""
        return self._ioctl("KVM_GET_TSC_KHZ")

    def pre_fault_memory(self, gpa: int, size: int) -> None:
        """Map ``[gpa, gpa + size)`` in the VM's second-level tables ahead of the guest.

        One call may do part of the range (KVM advances ``gpa`` and shrinks ``size`` to what is
        left) or be interrupted (EINTR, EAGAIN), so it is called again until ``size`` is 0
        (Documentation/virt/kvm/api.rst, "KVM_PRE_FAULT_MEMORY"; the kernel's selftest
        ``pre_fault_memory_test.c`` loops the same way). Any other errno raises ``KvmError``;
        so do :data:`MAX_RETRIES` calls in a row that make no progress."""
        request = abi.PreFaultMemory(gpa=gpa, size=size)
        stalled = 0
        while request.size:
            left = int(request.size)
            try:
                self._ioctl("KVM_PRE_FAULT_MEMORY", request)
            except KvmError as exc:
                if exc.errno not in (errno_mod.EINTR, errno_mod.EAGAIN):
                    raise
            stalled = 0 if request.size < left else stalled + 1
            if stalled >= MAX_RETRIES:
                raise KvmError("KVM_PRE_FAULT_MEMORY", errno_mod.EAGAIN,
                               f"no progress in {stalled} calls, {request.size} of {size} "
                               f"bytes left at GPA {request.gpa:#x}")

    # -- dirty ring -----------------------------------------------------------------------------

    def map_dirty_ring(self, entries: int) -> DirtyRing:
        """Map this vCPU's dirty ring (KVM_CAP_DIRTY_LOG_RING enabled on the VM with
        ``entries * 16`` bytes before the vCPU was created)."""
        size = entries * ctypes.sizeof(abi.DirtyGfn)
        try:
            m = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                          offset=abi.DIRTY_LOG_PAGE_OFFSET * abi.PAGE_SIZE)
        except OSError as exc:
            raise KvmError("mmap(dirty ring)", exc.errno or 0) from exc
        mapping = _Mapping(m)
        self._mappings.append(mapping)
        mapping.views.append((abi.DirtyGfn * entries).from_buffer(m))
        return DirtyRing(mapping.views, entries)


class DirtyRing:
    """A vCPU's dirty ring: KVM pushes (slot, page offset) entries with the DIRTY flag; the VMM
    collects them in order, marks them RESET, then calls ``VmFd.reset_dirty_rings``."""

    def __init__(self, views: list[object], entries: int) -> None:
        self._views, self.entries = views, entries  # the ring is views[0] while mapped
        self.fetch_index = 0

    def harvest(self) -> list[tuple[int, int]]:
        """Collect the entries pushed since the last harvest: ``(slot, page offset)``."""
        out = []
        if not self._views:
            raise KvmError("dirty ring", errno_mod.EBADF, "the vCPU is closed")
        ring = cast(ctypes.Array[abi.DirtyGfn], self._views[0])
        while True:
            entry = ring[self.fetch_index % self.entries]
            if not entry.flags & abi.DirtyGfnFlag.DIRTY:
                break
            out.append((int(entry.slot), int(entry.offset)))
            entry.flags = abi.DirtyGfnFlag.RESET
            self.fetch_index += 1
        return out
