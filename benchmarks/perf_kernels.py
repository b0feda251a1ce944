"""Where the engine's CPU time goes inside its two compiled kernels, sampled with ``perf``:

    PYTHONPATH=src .venv/bin/python benchmarks/perf_kernels.py seq4k 300000 8

runs the bench stream (full model) for the given seconds under ``perf record -p`` (software
clock samples: no hardware counters are needed) and prints the share of samples in
``run_chunk`` (the batch loop, the TLB lookups and the data-cache model, all inlined), in the
argument copy of its call to ``walk_translate`` (the kernel bundles are passed by value, every
array as a struct of 7-9 words), in ``walk_translate`` (the two-dimensional walk with its
paging-structure caches, nested TLB, reference accounting and fills), and elsewhere (Python,
numpy, the kernel). Needs ``perf`` and ``objdump``; kernels loaded from numba's cache are
located through their object code, so the first run may compile them.
"""

from __future__ import annotations

import collections
import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from numba.core import codegen

_set = codegen.CodeLibrary._set_compiled_object


def _keep(self: Any, value: bytes) -> None:  # numba drops a cached object once loaded
    self.kept_object = value
    _set(self, value)  # type: ignore[no-untyped-call]


codegen.CodeLibrary._set_compiled_object = _keep  # type: ignore[method-assign]

from eptlab import bench  # noqa: E402
from eptlab.arch.bits import PageSize  # noqa: E402
from eptlab.mmu.config import MmuConfig  # noqa: E402
from eptlab.mmu.engine import Accesses, Engine, InveptType  # noqa: E402
from eptlab.mmu.kernels import run  # noqa: E402


def _disassemble(path: Path) -> list[str]:
    out = subprocess.run(["objdump", "-dr", "--no-show-raw-insn", str(path)],
                         capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def main(workload: str, n: int, seconds: float) -> None:
    space = bench._space(bench.footprint(workload), PageSize.SIZE_4K, PageSize.SIZE_4K)
    assert space.vmcs is not None
    gva, kind = next(bench.synthetic_stream(workload, n, n, 0))
    engine = Engine(space.memory, MmuConfig(), space.features)
    engine.add_vcpu(space.guest, space.vmcs)
    engine.run(Accesses.build(gva[:1000], kind[:1000]))
    batch = Accesses.build(gva, kind)

    cres = next(iter(run.run_chunk.overloads.values()))  # type: ignore[attr-defined]
    library = cres.library
    work = Path(tempfile.mkdtemp(prefix="perf-kernels-"))
    obj = work / "run_chunk.o"
    obj.write_bytes(library._compiled_object or library.kept_object)
    lines = _disassemble(obj)
    symbols = subprocess.run(["nm", "-S", str(obj)], capture_output=True, text=True).stdout
    name, size = next(
        (p[3], int(p[1], 16)) for p in (line.split() for line in symbols.splitlines())
        if len(p) == 4 and p[2] == "T" and p[3].startswith("_ZN6eptlab3mmu7kernels3run9run_")
    )
    start = library.get_pointer_to_function(name)
    # the call of walk_translate: a movabs relocated against it, the pushes of the arguments
    # before it, the call after it
    call_lo = call_hi = walk = 0
    for k, line in enumerate(lines):
        if "R_X86_64_64" in line and "walk_translate" in line:
            offset = int(line.split(":")[0], 16)
            walk = ctypes.c_uint64.from_address(start + offset).value
            j = k - 1  # the movabs; before it, the pushes of the arguments
            while "push" in lines[j - 1] or "movabs" in lines[j - 1]:
                j -= 1
            call_lo = int(lines[j].split(":")[0], 16)
            call_hi = offset + 16
            break

    data = work / "perf.data"
    perf = subprocess.Popen(["perf", "record", "-F", "4000", "-p", str(os.getpid()),
                             "-o", str(data)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(1)
    begin = time.time()
    while time.time() - begin < seconds:
        engine.invept(InveptType.ALL_CONTEXT)
        engine.flush_caches()
        engine.reset_stats()
        engine.run(batch)
    perf.send_signal(signal.SIGINT)
    perf.wait()
    ips = subprocess.run(["perf", "script", "-i", str(data), "-F", "ip"],
                         capture_output=True, text=True).stdout.split()
    share: collections.Counter[str] = collections.Counter()
    for text in ips:
        ip = int(text, 16)
        if call_lo <= ip - start < call_hi:
            share["call of walk_translate (argument copy)"] += 1
        elif 0 <= ip - start < size:
            share["run_chunk (TLB lookups, data caches, prefetcher, loop)"] += 1
        elif walk and 0 <= ip - walk < 64 * 1024:  # walk_translate is about 28 KiB of code
            share["walk_translate"] += 1
        else:
            share["elsewhere"] += 1
    total = sum(share.values())
    for part, count in share.most_common():
        print(f"| {workload} | {part} | {100 * count / total:.0f} % |")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else 8.0)
