"""What a calibration records about the machine it ran on."""

from __future__ import annotations

import datetime
import platform
import re
from dataclasses import asdict, dataclass
from pathlib import Path

CACHE_DIR = Path("/sys/devices/system/cpu/cpu0/cache")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _size(text: str | None) -> int | None:
    """``48K`` / ``2048K`` / ``480M`` (sysfs cache sizes) in bytes."""
    match = re.fullmatch(r"(\d+)([KMG]?)", text or "")
    if match is None:
        return None
    return int(match[1]) << {"": 0, "K": 10, "M": 20, "G": 30}[match[2]]


def cache_sizes(root: Path = CACHE_DIR) -> dict[str, int]:
    """Data and unified cache sizes of CPU 0 by level name (l1d, l2, l3), from sysfs."""
    sizes: dict[str, int] = {}
    for index in sorted(root.glob("index*")):
        kind, level = _read(index / "type"), _read(index / "level")
        size = _size(_read(index / "size"))
        if size is None or level is None or kind == "Instruction":
            continue
        sizes["l1d" if level == "1" else f"l{level}"] = size
    return sizes


def cpu_model() -> str:
    fields: dict[str, str] = {}
    for line in (_read(Path("/proc/cpuinfo")) or "").splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
        if not line.strip():
            break
    name = fields.get("model name", platform.processor() or "unknown CPU")
    if "family" in "".join(fields):
        name += f" (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"
    return name


def hypervisor() -> str | None:
    """The hypervisor this machine runs under (``hypervisor`` CPUID flag), if any."""
    flags = next((line for line in (_read(Path("/proc/cpuinfo")) or "").splitlines()
                  if line.startswith("flags")), "")
    return "yes" if " hypervisor" in flags else None


@dataclass(frozen=True)
class HostInfo:
    hostname: str
    cpu: str
    caches: dict[str, int]
    virtual: bool
    date: str  # UTC, ISO 8601 (day)

    @property
    def label(self) -> str:
        """``hostname (CPU model)``: the ``host`` of every measured value."""
        return f"{self.hostname} ({self.cpu}{', a VM' if self.virtual else ''})"

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def host_info() -> HostInfo:
    return HostInfo(
        hostname=platform.node() or "unknown",
        cpu=cpu_model(),
        caches=cache_sizes(),
        virtual=hypervisor() is not None,
        date=datetime.datetime.now(datetime.UTC).date().isoformat(),
    )
