"""What ``KVM_RUN`` returned, decoded from ``struct kvm_run`` into typed values (the
``VcpuExit`` of kvm-ioctls). The backend (:mod:`eptlab.kvm.backend`) turns these into eptlab's
exit records where the meaning matches."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class IoOut:
    """An OUT instruction: ``data`` is what the guest wrote (``size`` bytes x count)."""

    port: int
    data: bytes


@dataclass(frozen=True, slots=True)
class IoIn:
    """An IN instruction: the VMM must supply ``size`` bytes (see VcpuFd.set_io_in)."""

    port: int
    size: int


@dataclass(frozen=True, slots=True)
class MmioWrite:
    """A guest write to guest-physical memory with no writable memslot (read-only slot or none);
    the write was not performed."""

    gpa: int
    data: bytes


@dataclass(frozen=True, slots=True)
class MmioRead:
    gpa: int
    size: int


@dataclass(frozen=True, slots=True)
class HltExit:
    pass


@dataclass(frozen=True, slots=True)
class ShutdownExit:
    """KVM_EXIT_SHUTDOWN: the guest triple-faulted (or otherwise shut down)."""


@dataclass(frozen=True, slots=True)
class FailEntry:
    hardware_reason: int
    cpu: int


@dataclass(frozen=True, slots=True)
class InternalError:
    suberror: int
    data: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SystemEvent:
    type: int


@dataclass(frozen=True, slots=True)
class DirtyRingFull:
    pass


@dataclass(frozen=True, slots=True)
class Interrupted:
    """KVM_RUN returned EINTR: a signal or ``immediate_exit`` kicked the vCPU out."""


@dataclass(frozen=True, slots=True)
class UnknownExit:
    reason: int


VcpuExit = (
    IoOut
    | IoIn
    | MmioWrite
    | MmioRead
    | HltExit
    | ShutdownExit
    | FailEntry
    | InternalError
    | SystemEvent
    | DirtyRingFull
    | Interrupted
    | UnknownExit
)
