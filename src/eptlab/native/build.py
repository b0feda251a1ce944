"""Build ``measure.c`` with the system C compiler into a shared library, once per source
version, in a cache directory, and load it with ctypes.

The compiler is ``$CC`` or ``cc``; the library lives in ``$EPTLAB_CACHE/native/<hash>/`` (default
``~/.cache/eptlab/native/<hash>/``), the hash covering the source, the compiler and the flags, so
an edited source is rebuilt and an unchanged one is not. No binary is kept in git.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from ..errors import ToolchainError

SOURCE = "measure.c"
FLAGS = ("-O2", "-std=gnu11", "-fPIC", "-shared", "-Wall", "-Werror")
LIBRARY = "libeptnative.so"
_U64, _PTR, _SIZE = ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t
_P_U64 = ctypes.POINTER(ctypes.c_uint64)

# name -> (restype, argtypes) of every function of measure.c
SIGNATURES: dict[str, tuple[object, list[object]]] = {
    "ept_version": (ctypes.c_int, []),
    "ept_tsc_ghz": (ctypes.c_double, [_U64]),
    "ept_add_chain": (ctypes.c_int, [_U64, _U64, _P_U64]),
    "ept_cpuid_run": (ctypes.c_int, [_U64, _U64, _P_U64]),
    "ept_map": (_PTR, [_SIZE, ctypes.c_int]),
    "ept_unmap": (ctypes.c_int, [_PTR, _SIZE]),
    "ept_chase_build": (ctypes.c_int, [_PTR, _U64, _U64, _U64]),
    "ept_chase_run": (ctypes.c_int, [_PTR, _U64, _U64, _P_U64, _P_U64]),
    "ept_random_run": (ctypes.c_int, [_PTR, _U64, _U64, _U64, _U64, _P_U64, _P_U64]),
    "ept_deprand_run": (ctypes.c_int, [_PTR, _U64, _U64, _U64, _U64, _P_U64, _P_U64]),
    "ept_gups_run": (ctypes.c_int, [_PTR, _U64, _U64, _U64, _U64, _P_U64]),
    "ept_seq_run": (ctypes.c_int, [_PTR, _U64, _U64, _U64, _U64, _P_U64, _P_U64]),
    "ept_copy_run": (ctypes.c_int, [_PTR, _PTR, _U64, _U64, _U64, _P_U64]),
}


def source_path() -> Path:
    return Path(str(resources.files("eptlab.native") / SOURCE))


def compiler() -> list[str]:
    """The compiler command: ``$CC`` (may carry arguments) or ``cc``, resolved on PATH."""
    words = shlex.split(os.environ.get("CC") or "cc")
    path = shutil.which(words[0]) if words else None
    if path is None:
        name = words[0] if words else "$CC"
        raise ToolchainError(
            name, "C compiler not found: eptlab's native helpers (eptlab calibrate, "
            "model-vs-machine, the RTM probe) are compiled at run time; install gcc or clang, "
            "or set CC")
    return [path, *words[1:]]


def cache_dir() -> Path:
    base = os.environ.get("EPTLAB_CACHE") or os.path.join(Path.home(), ".cache", "eptlab")
    return Path(base) / "native"


def library_path() -> Path:
    """Path of the shared library, compiling it if the cache lacks this version."""
    return build_library(source_path(), FLAGS, LIBRARY)


def build_library(source: Path, flags: Sequence[str], library: str) -> Path:
    """``source`` (one C file) compiled with ``flags`` into the shared library ``library``
    under :func:`cache_dir`, once per source, compiler and flags (a hash of the three names its
    directory); ToolchainError when there is no compiler or it fails. Every C helper eptlab
    builds at run time goes through here (this module's, the RTM probe, the C walk limit)."""
    cc = compiler()
    text = source.read_bytes()
    digest = hashlib.sha256(text + "\0".join([*cc, *flags]).encode()).hexdigest()[:16]
    target = cache_dir() / digest / library
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        work = Path(tmp)
        (work / source.name).write_bytes(text)
        done = subprocess.run([*cc, *flags, "-o", library, source.name], cwd=work,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise ToolchainError(cc[0], f"compiling {source.name} failed ({done.returncode}): "
                                 f"{done.stderr.strip()}")
        os.replace(work / library, target)  # atomic: concurrent builders agree
    return target


_LIBS: dict[Path, ctypes.CDLL] = {}


def load() -> ctypes.CDLL:
    """The library with typed functions (built on first use, loaded once per process)."""
    path = library_path()
    if path not in _LIBS:
        lib = ctypes.CDLL(str(path))
        for name, (restype, argtypes) in SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        _LIBS[path] = lib
    return _LIBS[path]
