"""Build the guests in ``eptlab/kvm/guests/*.S`` with the system toolchain (GNU as, ld,
objcopy) into flat binaries, once per source version, in a cache directory.

No binary is kept in git: the first use assembles, later uses find the cached image (keyed by a
hash of the sources). The cache lives in ``$EPTLAB_CACHE`` or ``~/.cache/eptlab``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

from ..errors import ConfigError, ToolchainError

TOOLS = ("as", "ld", "objcopy")
LOAD_ADDRESS = 0x1000  # the image's first byte, guest-physical (and guest-virtual)


def sources_dir() -> Path:
    """Where the guests' sources are shipped (package data)."""
    return Path(str(resources.files("eptlab.kvm") / "guests"))


def available() -> list[str]:
    """Guest names (the ``.S`` files)."""
    return sorted(p.stem for p in sources_dir().glob("*.S"))


def cache_dir() -> Path:
    """Where built guests are kept (``$EPTLAB_CACHE`` or ``~/.cache/eptlab``)."""
    base = os.environ.get("EPTLAB_CACHE") or os.path.join(Path.home(), ".cache", "eptlab")
    return Path(base) / "guests"


def _source_hash(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.glob("*")):
        if path.suffix in (".S", ".inc"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ToolchainError(
            name, "not found on PATH: the KVM guests are assembled with GNU binutils "
            "(install binutils: as, ld, objcopy)"
        )
    return path


def _run(tool: str, args: list[str], cwd: Path) -> None:
    done = subprocess.run([_tool(tool), *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise ToolchainError(tool, f"failed ({done.returncode}): {done.stderr.strip()}")


def build(name: str) -> Path:
    """Path of the flat binary of guest ``name``, assembling it if the cache lacks it."""
    src_dir = sources_dir()
    source = src_dir / f"{name}.S"
    if not source.exists():
        raise ConfigError("guest", f"{name!r} is not one of {', '.join(available())}")
    target_dir = cache_dir() / _source_hash(src_dir)
    target = target_dir / f"{name}.bin"
    if target.exists():
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target_dir) as tmp:
        work = Path(tmp)
        for path in src_dir.glob("*"):
            if path.suffix in (".S", ".inc"):
                shutil.copy(path, work / path.name)
        _run("as", ["--64", "--defsym", f"LOAD_ADDRESS={LOAD_ADDRESS:#x}", "-I", str(work),
                    "-o", f"{name}.o", f"{name}.S"], work)
        _run("ld", ["-m", "elf_x86_64", "-nostdlib", "-static", "-Ttext", hex(LOAD_ADDRESS),
                    "-e", "_start", "-o", f"{name}.elf", f"{name}.o"], work)
        _run("objcopy", ["-O", "binary", "-j", ".text", f"{name}.elf", f"{name}.bin"], work)
        os.replace(work / f"{name}.bin", target)  # atomic: concurrent builders agree
    return target


def image(name: str) -> bytes:
    """The flat binary of guest ``name``, built on first use."""
    return build(name).read_bytes()
