"""Build the bare-metal VMX harness (``harness/``) with the system toolchain, write a disk image
holding it and a list of cases, run Bochs on it and read back one JSON line per case.

No binary is kept in git: the harness is compiled on first use into a cache directory keyed by
a hash of its sources (``$EPTLAB_CACHE`` or ``~/.cache/eptlab``, like the KVM guests). Bochs
always runs under a timeout.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import EptlabError, ToolchainError
from .cases import CASE_MAGIC, Case

KERNEL_SECTORS = 64
CASE_HEADER_LBA = 128
SECTOR = 512
DISK_CYLINDER = 16 * 63 * SECTOR  # Bochs derives a flat image's geometry from whole cylinders
CPU_MODELS = {"tigerlake": True, "corei7_icelake_u": True, "corei7_skylake_x": False}
"""Bochs 2.7 models that report EPT with A/D flags, PML, 2 MiB and 1 GiB pages (none has
LA57, mode-based execute control or advanced EPT exit information), and whether each has
protection keys (CPUID PKU; skylake_x lacks it, so its CR4.PKE cannot be set)."""
DEFAULT_CPU = "tigerlake"

CFLAGS = [
    "-m64", "-O2", "-ffreestanding", "-fno-pic", "-fno-pie", "-mno-red-zone",
    "-mgeneral-regs-only", "-fno-stack-protector", "-fcf-protection=none",
    "-fno-asynchronous-unwind-tables", "-nostdlib", "-Wall", "-Wextra", "-Werror",
]  # fmt: skip


class BochsError(EptlabError):
    """Bochs is missing, failed, timed out, or the harness reported a fatal error."""


@dataclass(frozen=True)
class Harness:
    boot: bytes
    kernel: bytes


def sources_dir() -> Path:
    return Path(str(resources.files("eptlab.oracle") / "harness"))


def _cache_dir() -> Path:
    base = os.environ.get("EPTLAB_CACHE") or os.path.join(Path.home(), ".cache", "eptlab")
    return Path(base) / "oracle"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ToolchainError(name, "not found on PATH: the Bochs harness needs gcc and binutils")
    return path


def _run(args: list[str], cwd: Path) -> None:
    done = subprocess.run([_tool(args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise ToolchainError(args[0], f"failed ({done.returncode}): {done.stderr.strip()}")


def build_harness() -> Harness:
    """The boot sector and the harness binary, compiled if the cache lacks them."""
    src = sources_dir()
    digest = hashlib.sha256()
    for path in sorted(src.iterdir()):
        if path.suffix in (".S", ".c", ".ld"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    target = _cache_dir() / digest.hexdigest()[:16]
    boot, kernel = target / "boot.bin", target / "harness.bin"
    if not (boot.exists() and kernel.exists()):
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target) as tmp:
            t = Path(tmp)
            _run(["gcc", *CFLAGS, "-c", str(src / "harness.c"), "-o", "harness.o"], t)
            _run(["gcc", *CFLAGS, "-c", str(src / "entry.S"), "-o", "entry.o"], t)
            _run(
                ["ld", "-nostdlib", "-static", "-no-pie", "--no-warn-rwx-segments",
                 "-T", str(src / "link.ld"), "-o", "harness.elf", "entry.o", "harness.o"],
                t,
            )  # fmt: skip
            _run(["objcopy", "-O", "binary", "harness.elf", "harness.bin"], t)
            _run(["as", "--defsym", f"KERNEL_SECTORS={KERNEL_SECTORS}", str(src / "boot.S"),
                  "-o", "boot.o"], t)  # fmt: skip
            _run(["ld", "-Ttext=0x7c00", "--oformat", "binary", "-e", "_boot", "-o", "boot.bin",
                  "boot.o"], t)  # fmt: skip
            os.replace(t / "harness.bin", kernel)
            os.replace(t / "boot.bin", boot)
    harness = Harness(boot.read_bytes(), kernel.read_bytes())
    if len(harness.boot) != SECTOR or len(harness.kernel) > KERNEL_SECTORS * SECTOR:
        raise ToolchainError("ld", f"harness too large ({len(harness.kernel)} bytes)")
    return harness


def disk_image(harness: Harness, cases: Sequence[Case | bytes]) -> bytes:
    """Boot sector, harness, then at LBA 128 a header sector and the case records (cases or
    their :meth:`Case.record` bytes)."""
    records = b"".join(c if isinstance(c, bytes) else c.record() for c in cases)
    sectors = -(-len(records) // SECTOR)
    image = bytearray(harness.boot + harness.kernel.ljust(KERNEL_SECTORS * SECTOR, b"\0"))
    image = image.ljust(CASE_HEADER_LBA * SECTOR, b"\0")
    image += struct.pack("<3Q", CASE_MAGIC, len(cases), sectors).ljust(SECTOR, b"\0")
    image += records.ljust(sectors * SECTOR, b"\0")
    return bytes(image.ljust(-(-len(image) // DISK_CYLINDER) * DISK_CYLINDER, b"\0"))


BOCHSRC = """\
megs: 512
cpu: model={cpu}, ips=200000000
romimage: file={bios}
vgaromimage: file={vga_bios}
display_library: term
ata0-master: type=disk, path={image}, mode=flat
boot: disk
port_e9_hack: enabled=1
log: {log}
panic: action=fatal
error: action=report
clock: sync=none
speaker: enabled=0
sound: driver=dummy
"""


BIOS = Path("/usr/share/bochs/BIOS-bochs-latest")  # package bochsbios
VGA_BIOS = Path("/usr/share/bochs/VGABIOS-lgpl-latest")  # a link into package vgabios


def missing() -> str | None:
    """What of Bochs is not installed (None: all of it): the emulator, its BIOSes, and the
    terminal display plugin (package bochs-term; Debian's build has no "nogui" display)."""
    if shutil.which("bochs") is None:
        return "bochs"
    if not BIOS.exists() or not VGA_BIOS.exists():
        return "bochsbios/vgabios"
    if not list(Path("/usr/lib").glob("*/bochs/plugins/libbx_term_gui.so*")):
        return "bochs-term"
    return None


def bochs_available() -> bool:
    return missing() is None


def run_bochs(
    cases: Sequence[Case | bytes], *, cpu: str = DEFAULT_CPU, timeout: float = 600.0
) -> tuple[dict[str, object], dict[int, dict[str, object]]]:
    """Run the cases (or their records) in one Bochs boot; returns the harness's VMX
    capability line and the result line of each case by case id."""
    if (what := missing()) is not None:
        raise BochsError(
            f"{what} not installed: apt-get install bochs bochs-term bochsbios vgabios"
        )
    harness = build_harness()
    with tempfile.TemporaryDirectory(prefix="eptlab-bochs-") as tmp:
        t = Path(tmp)
        (t / "disk.img").write_bytes(disk_image(harness, cases))
        (t / "rc").write_text("c\n")
        (t / "bochsrc").write_text(
            BOCHSRC.format(
                cpu=cpu, image=t / "disk.img", log=t / "bochs.log", bios=BIOS, vga_bios=VGA_BIOS
            )
        )
        env = {**os.environ, "TERM": "xterm"}
        try:
            done = subprocess.run(
                ["bochs", "-q", "-f", str(t / "bochsrc"), "-rc", str(t / "rc")],
                cwd=t, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, env=env,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            message = f"bochs did not finish {len(cases)} cases in {timeout:.0f} s"
            raise BochsError(message) from None
        lines = done.stdout.decode("latin-1").splitlines()
        log_tail = (t / "bochs.log").read_text(errors="replace")[-2000:] if (
            t / "bochs.log").exists() else ""
    vmx: dict[str, object] = {}
    results: dict[int, dict[str, object]] = {}
    finished = False
    for line in lines:
        start = line.find('{"')
        if start < 0:
            continue
        try:
            record = json.loads(line[start:])
        except json.JSONDecodeError:
            continue
        if "fatal" in record:
            raise BochsError(f"harness: {record}")
        if "vmx" in record:
            vmx = record["vmx"]
        elif "done" in record:
            finished = True
        elif "id" in record:
            results[int(record["id"])] = record
    if not finished:
        raise BochsError(f"bochs stopped before the harness finished; log tail:\n{log_tail}")
    return vmx, results
