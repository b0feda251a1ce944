"""The one exception hierarchy of eptlab.

Errors are values with context: each carries the fields a user needs to find the problem
(which entry, which field, which file and line) and keeps its cause. The CLI turns them into a
one-line message and an exit status in one place (``eptlab.cli``).

Architectural events (a guest page fault, an EPT violation, an EPT misconfiguration) are *not*
exceptions: they are results (``eptlab.arch.exits``), because the hardware reports them to software.
"""

from __future__ import annotations


class EptlabError(Exception):
    """Base class of every error eptlab raises on purpose."""

    def __reduce__(self) -> tuple[object, ...]:
        """Pickle as message and fields (the subclasses' constructors take the fields, not the
        message), so an error raised in a worker process arrives whole in its parent."""
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(cls: type[EptlabError], args: tuple[object, ...], state: dict[str, object]) -> (
    EptlabError
):
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class ConfigError(EptlabError, ValueError):
    """An impossible or inconsistent configuration (names the field)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class EncodingError(EptlabError, ValueError):
    """A bit format was asked to hold a combination the architecture does not allow."""

    def __init__(self, format_name: str, field: str, message: str) -> None:
        super().__init__(f"{format_name}.{field}: {message}")
        self.format_name = format_name
        self.field = field


class ReservedBitsError(EncodingError):
    """Bits that are reserved in this format (at this level) are set."""

    def __init__(self, format_name: str, value: int, reserved: int) -> None:
        bits = [i for i in range(64) if (value & reserved) >> i & 1]
        super().__init__(format_name, "reserved", f"reserved bit(s) {bits} set in {value:#018x}")
        self.value = value
        self.reserved_mask = reserved


class MisconfiguredEptEntry(EncodingError):
    """An EPT entry value that the processor would answer with an EPT misconfiguration."""


class AddressError(EptlabError, ValueError):
    """An address that is misaligned, too wide, or outside a region."""


class MappingError(EptlabError):
    """A page-table builder was asked for a mapping that conflicts with an existing one."""


class OutOfMemory(EptlabError):
    """The frame allocator has no free block of the requested size."""


class TraceFormatError(EptlabError, ValueError):
    """A malformed trace: names the file and the line (text formats) or byte offset (binary)."""

    def __init__(self, path: object, where: int, message: str, *, unit: str = "line") -> None:
        super().__init__(
            f"{path}:{where}: {message}" if unit == "line" else f"{path}: byte {where}: {message}"
        )
        self.path, self.where, self.unit = path, where, unit


class RecordError(EptlabError):
    """valgrind is missing, or the recorded command could not run or failed."""

    def __init__(self, command: list[str], message: str, *, status: int | None = None) -> None:
        super().__init__(f"recording {' '.join(command)!r}: {message}")
        self.command, self.status = command, status


class KvmError(EptlabError):
    """A KVM ioctl (or the open of /dev/kvm) failed: names the ioctl and keeps the errno."""

    def __init__(self, ioctl: str, errno: int, detail: str = "") -> None:
        import os

        message = f"{ioctl}: {os.strerror(errno)} (errno {errno})"
        super().__init__(message + (f": {detail}" if detail else ""))
        self.ioctl, self.errno = ioctl, errno


class KvmUnavailable(EptlabError):
    """/dev/kvm does not open here (not Linux, no KVM module, or no permission)."""


class RtmUnavailable(EptlabError):
    """This processor cannot run Intel TSX transactions (CPUID.7.0:EBX bit 11 clear, or every
    trivial transaction aborts: TSX disabled), or the probe cannot be built. The CLI exits with
    status :data:`RTM_UNAVAILABLE_STATUS` (3) for it."""


RTM_UNAVAILABLE_STATUS = 3


class WatchdogUnavailable(EptlabError):
    """The KVM watchdog cannot stop a vCPU in this thread: the signal that interrupts
    ``KVM_RUN`` has no Python handler, and only the main thread can install one."""


class GuestError(EptlabError):
    """A KVM guest misbehaved: triple fault, internal error, watchdog deadline, unknown
    hypercall. Carries the exit record (or None) that showed it."""

    def __init__(self, guest: str, message: str, record: object = None) -> None:
        super().__init__(f"guest {guest}: {message}")
        self.guest, self.record = guest, record


class ToolchainError(EptlabError):
    """A guest could not be built: a tool (as, ld, objcopy) is missing or failed."""

    def __init__(self, tool: str, message: str) -> None:
        super().__init__(f"{tool}: {message}")
        self.tool = tool
