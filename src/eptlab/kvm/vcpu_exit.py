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
    """KVM_EXIT_MMIO, a read."""
    gpa: int
    size: int


@dataclass(frozen=True, slots=True)
class HltExit:
    """KVM_EXIT_HLT."""
    pass


@dataclass(frozen=True, slots=True)
class ShutdownExit:
    """KVM_EXIT_SHUTDOWN: the guest triple-faulted (or otherwise shut down)."""


@dataclass(frozen=True, slots=True)
class FailEntry:
    """KVM_EXIT_FAIL_ENTRY: the hardware refused the VM entry."""
    hardware_reason: int
    cpu: int


@dataclass(frozen=True, slots=True)
class InternalError:
    """KVM_EXIT_INTERNAL_ERROR (e.g. an instruction KVM cannot emulate)."""
    suberror: int
    data: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SystemEvent:
    """KVM_EXIT_SYSTEM_EVENT."""
    type: int


@dataclass(frozen=True, slots=True)
class DirtyRingFull:
    """KVM_EXIT_DIRTY_RING_FULL: harvest the ring and reset it."""
    pass


@dataclass(frozen=True, slots=True)
class Interrupted:
    """KVM_RUN returned EINTR: a signal or ``immediate_exit`` kicked the vCPU out."""


@dataclass(frozen=True, slots=True)
class UnknownExit:
    """An exit reason this layer does not decode."""
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
