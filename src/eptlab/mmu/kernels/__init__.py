"""numba kernels of the fast translation engine.

The rule of this package: kernels take and return numpy arrays and scalars only, never Python
objects, and hold no policy (what to do about an exit is the hypervisor's business). The loop
over a chunk of accesses lives inside :func:`run.run_chunk`. The Python side
(:mod:`eptlab.mmu.engine`) owns the state objects, packs them into the arrays described in
:mod:`layout`, and turns status codes into exit records.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import numba


def _cache_dir() -> Path:
    """numba's on-disk cache checks only the stamp of the file that defines a function, not of
    the modules it calls; keying the directory by the sources of every kernel (and the numba
    version) makes any change to any kernel recompile them all."""
    digest = hashlib.sha256(numba.__version__.encode())
    here = Path(__file__).parent
    package = here.parent.parent
    sources = sorted(here.glob("*.py")) + sorted((package / "arch").glob("*.py"))
    for source in sources + [package / "memory" / "physical.py", package / "mmu" / "context.py"]:
        digest.update(source.read_bytes())
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "eptlab" / f"numba-{digest.hexdigest()[:16]}"


if not os.environ.get("NUMBA_CACHE_DIR"):
    numba.config.CACHE_DIR = str(_cache_dir())

# The one place where kernel compilation options live. ``_nrt=False``: kernels allocate nothing
# and so need no reference counting (which, on every call, costs two atomic operations per
# array argument). ``inline_kernel`` is for the small helpers of the hot paths.
kernel = functools.partial(numba.njit, cache=True, _nrt=False)
inline_kernel = functools.partial(numba.njit, cache=True, _nrt=False, inline="always")
