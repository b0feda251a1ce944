"""The KVM userspace ABI, x86-64: ctypes structures and ioctl numbers from ``linux/kvm.h``.

Structures only, no behaviour. Layouts follow ``include/uapi/linux/kvm.h`` and
``arch/x86/include/uapi/asm/kvm.h``; each structure's size is checked at import time against the
kernel's (a wrong field would otherwise corrupt the ioctl silently). Ioctl numbers are declared
as one table, :data:`IOCTLS`, built with the ``_IO``/``_IOR``/``_IOW``/``_IOWR`` encoding of
``include/uapi/asm-generic/ioctl.h``.
"""

from __future__ import annotations

import ctypes
from enum import IntEnum, IntFlag

KVMIO = 0xAE
API_VERSION = 12
PAGE_SIZE = 4096

# -- ioctl number encoding (asm-generic/ioctl.h) -------------------------------------------------

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return direction << 30 | size << 16 | KVMIO << 8 | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, size: int) -> int:
    return _ioc(_IOC_READ, nr, size)


def _iow(nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


# -- structures ---------------------------------------------------------------------------------

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


class UserspaceMemoryRegion(ctypes.Structure):
    """struct kvm_userspace_memory_region."""

    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class MemFlag(IntFlag):
    """Flags of a memory slot (``struct kvm_userspace_memory_region``)."""
    LOG_DIRTY_PAGES = 1 << 0
    READONLY = 1 << 1


REG_NAMES = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags",
)


class Regs(ctypes.Structure):
    """struct kvm_regs (x86)."""

    _fields_ = [(name, u64) for name in REG_NAMES]


class Segment(ctypes.Structure):
    """struct kvm_segment."""

    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class Dtable(ctypes.Structure):
    """struct kvm_dtable (GDTR / IDTR)."""

    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class Sregs(ctypes.Structure):
    """struct kvm_sregs (x86)."""

    _fields_ = [
        ("cs", Segment),
        ("ds", Segment),
        ("es", Segment),
        ("fs", Segment),
        ("gs", Segment),
        ("ss", Segment),
        ("tr", Segment),
        ("ldt", Segment),
        ("gdt", Dtable),
        ("idt", Dtable),
        ("cr0", u64),
        ("cr2", u64),
        ("cr3", u64),
        ("cr4", u64),
        ("cr8", u64),
        ("efer", u64),
        ("apic_base", u64),
        ("interrupt_bitmap", u64 * 4),
    ]


class CpuidEntry2(ctypes.Structure):
    """struct kvm_cpuid_entry2."""

    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


CPUID_MAX_ENTRIES = 256


class Cpuid2(ctypes.Structure):
    """struct kvm_cpuid2 with room for :data:`CPUID_MAX_ENTRIES` entries."""

    _fields_ = [("nent", u32), ("padding", u32), ("entries", CpuidEntry2 * CPUID_MAX_ENTRIES)]


class DirtyLog(ctypes.Structure):
    """struct kvm_dirty_log."""

    _fields_ = [("slot", u32), ("padding", u32), ("dirty_bitmap", u64)]


class EnableCap(ctypes.Structure):
    """struct kvm_enable_cap."""

    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class DirtyGfn(ctypes.Structure):
    """struct kvm_dirty_gfn: one dirty-ring entry."""

    _fields_ = [("flags", u32), ("slot", u32), ("offset", u64)]


class DirtyGfnFlag(IntFlag):
    """Flags of a dirty-ring entry (``struct kvm_dirty_gfn``)."""
    DIRTY = 1 << 0
    RESET = 1 << 1


DIRTY_LOG_PAGE_OFFSET = 64  # KVM_DIRTY_LOG_PAGE_OFFSET: ring pages in the vCPU mmap


class PreFaultMemory(ctypes.Structure):
    """struct kvm_pre_fault_memory."""

    _fields_ = [("gpa", u64), ("size", u64), ("flags", u64), ("padding", u64 * 5)]


# -- struct kvm_run -----------------------------------------------------------------------------


class RunIo(ctypes.Structure):
    """``kvm_run.io``: a port I/O exit."""
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32),
                ("data_offset", u64)]


class RunMmio(ctypes.Structure):
    """``kvm_run.mmio``: an MMIO exit."""
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class RunFailEntry(ctypes.Structure):
    """``kvm_run.fail_entry``: a failed VM entry."""
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class RunInternal(ctypes.Structure):
    """``kvm_run.internal``: a KVM internal error."""
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class RunSystemEvent(ctypes.Structure):
    """``kvm_run.system_event``: shutdown, reset, crash."""
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class RunExit(ctypes.Union):
    """The union of ``kvm_run``'s exit payloads."""
    _fields_ = [
        ("io", RunIo),
        ("mmio", RunMmio),
        ("fail_entry", RunFailEntry),
        ("internal", RunInternal),
        ("system_event", RunSystemEvent),
        ("hardware_exit_reason", u64),
        ("padding", ctypes.c_char * 256),
    ]


class Run(ctypes.Structure):
    """The head of struct kvm_run (the shared page of a vCPU): what the backend decodes."""

    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("exit", RunExit),
    ]


class ExitReason(IntEnum):
    """KVM_EXIT_* (the values of kvm_run.exit_reason)."""

    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    NMI = 16
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24
    DIRTY_RING_FULL = 31
    MEMORY_FAULT = 39


IO_IN, IO_OUT = 0, 1


class Cap(IntEnum):
    """KVM_CAP_* numbers used here."""

    USER_MEMORY = 3
    SET_TSS_ADDR = 4
    READONLY_MEM = 81
    IMMEDIATE_EXIT = 136
    MANUAL_DIRTY_LOG_PROTECT2 = 168
    DIRTY_LOG_RING = 192
    DIRTY_LOG_RING_ACQ_REL = 223
    PRE_FAULT_MEMORY = 236


# -- the ioctl table ----------------------------------------------------------------------------

IOCTLS: dict[str, int] = {
    # on /dev/kvm
    "KVM_GET_API_VERSION": _io(0x00),
    "KVM_CREATE_VM": _io(0x01),
    "KVM_CHECK_EXTENSION": _io(0x03),
    "KVM_GET_VCPU_MMAP_SIZE": _io(0x04),
    "KVM_GET_SUPPORTED_CPUID": _iowr(0x05, 8),
    # on a VM
    "KVM_CREATE_VCPU": _io(0x41),
    "KVM_GET_DIRTY_LOG": _iow(0x42, ctypes.sizeof(DirtyLog)),
    "KVM_SET_USER_MEMORY_REGION": _iow(0x46, ctypes.sizeof(UserspaceMemoryRegion)),
    "KVM_SET_TSS_ADDR": _io(0x47),
    "KVM_ENABLE_CAP": _iow(0xA3, ctypes.sizeof(EnableCap)),
    "KVM_RESET_DIRTY_RINGS": _io(0xC7),
    # on a vCPU
    "KVM_RUN": _io(0x80),
    "KVM_GET_REGS": _ior(0x81, ctypes.sizeof(Regs)),
    "KVM_SET_REGS": _iow(0x82, ctypes.sizeof(Regs)),
    "KVM_GET_SREGS": _ior(0x83, ctypes.sizeof(Sregs)),
    "KVM_SET_SREGS": _iow(0x84, ctypes.sizeof(Sregs)),
    "KVM_SET_CPUID2": _iow(0x90, 8),
    "KVM_PRE_FAULT_MEMORY": _iowr(0xD5, ctypes.sizeof(PreFaultMemory)),
    "KVM_GET_TSC_KHZ": _io(0xA3),
    # on a VM or a vCPU
    "KVM_GET_STATS_FD": _io(0xCE),
}

STATS_HEADER = "<6I"  # flags, name_size, num_desc, id_offset, desc_offset, data_offset
STATS_DESC = "<IhHII"  # flags, exponent, size, offset, bucket_size; then name[name_size]

# the kernel's sizes (checked: a wrong layout must not reach an ioctl)
_SIZES = {
    UserspaceMemoryRegion: 32,
    Regs: 144,
    Segment: 24,
    Dtable: 16,
    Sregs: 312,
    CpuidEntry2: 40,
    DirtyLog: 16,
    EnableCap: 104,
    DirtyGfn: 16,
    PreFaultMemory: 64,
}
for _struct, _size in _SIZES.items():
    assert ctypes.sizeof(_struct) == _size, (_struct.__name__, ctypes.sizeof(_struct), _size)
assert Sregs.cr0.offset == 224 and Sregs.efer.offset == 264
assert Run.exit.offset == 32
