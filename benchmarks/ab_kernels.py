"""A/B of engine versions in one process: each version's ``eptlab`` package is copied under its own
name (``eptlab_<label>``), the bench streams are built once, and the versions (and the C limit)
run interleaved (in a rotating order, each repetition with new engines), best of ``--reps``, so machine load hits them alike; the speed-up of each
version over the first is also given as the median (and range) of the ratios of their times
in the same repetition, which a loaded machine disturbs less than the best times do. Times
are the CPU time of this thread (``time.thread_time``), so time spent descheduled on a shared
machine does not count (its caches are still shared). The statistics of every
version are compared with the first's after each stream (they must be equal).

    PYTHONPATH=src .venv/bin/python benchmarks/ab_kernels.py base=main new=. \
        --workloads seq4k,random,seq64 --accesses 400000 --reps 5

A version is ``label=REF`` (a git commit or branch of this repository, via ``git archive``),
``label=.`` (this working tree's ``src/eptlab``), optionally ``+PATCH`` (a diff applied to the
copy, e.g. ``nostats=.+/tmp/nostats.diff``: a variant made for measuring only). Copies live in
``$TMPDIR/eptlab-ab/<label>-<digest>`` so that numba's cache of each is kept between runs.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from types import ModuleType

import numpy as np

from eptlab import bench, bench_limit
from eptlab.arch.bits import PageSize

ROOT = Path(__file__).resolve().parent.parent


def _tree_bytes(ref: str) -> bytes:
    """A tar of ``src/eptlab`` at ``ref`` (or of the working tree for ``.``)."""
    if ref == ".":
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(ROOT / "src" / "eptlab", arcname="src/eptlab",
                    filter=lambda t: None if "__pycache__" in t.name else t)
        return buf.getvalue()
    return subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "src/eptlab"], check=True, capture_output=True
    ).stdout


def load_version(label: str, spec: str) -> ModuleType:
    """Import the version ``spec`` (``REF`` or ``REF+PATCH``) as the package ``eptlab_<label>``."""
    ref, _, patch = spec.partition("+")
    tar = _tree_bytes(ref)
    patch_text = Path(patch).read_bytes() if patch else b""
    digest = hashlib.sha256(tar + patch_text).hexdigest()[:12]
    home = Path(tempfile.gettempdir()) / "eptlab-ab" / f"{label}-{digest}"
    name = f"eptlab_{label}"
    if not (home / name).exists():
        work = home / "work"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
            archive.extractall(work, filter="data")
        if patch:
            subprocess.run(["patch", "-p1", "-s", "-d", str(work), "-i", str(Path(patch).resolve())],
                           check=True)
        (work / "src" / "eptlab").rename(home / name)
        shutil.rmtree(work)
    sys.path.insert(0, str(home))
    for sub in ("mmu.config", "mmu.engine"):
        importlib.import_module(f"{name}.{sub}")
    return importlib.import_module(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("versions", nargs="+", help="label=REF[+PATCH]")
    parser.add_argument("--workloads", default="seq64,seq4k,random")
    parser.add_argument("--accesses", type=int, default=400_000)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    versions = {}
    for item in args.versions:
        label, _, spec = item.partition("=")
        versions[label] = load_version(label, spec)
    first = next(iter(versions))
    others = [v for v in versions if v != first]
    print(f"| stream | {' | '.join(versions)} | C | " +
          " | ".join(f"{v}/C" for v in versions) +
          "".join(f" | {v}/{first} (median, range)" for v in others) + " |")
    print("|---" * (2 + 2 * len(versions) + len(others)) + "|")
    for workload in args.workloads.split(","):
        space = bench._space(bench.footprint(workload), PageSize.SIZE_4K, PageSize.SIZE_4K)
        assert space.vmcs is not None
        gva, kind = next(bench.synthetic_stream(workload, args.accesses, args.accesses, 0))

        def fresh(mod: ModuleType) -> tuple[object, object, object]:
            """A new engine of version ``mod`` (new arrays: their placement in the host's
            caches changes from one repetition to the next), its kernels loaded."""
            eng = mod.mmu.engine
            engine = eng.Engine(space.memory, mod.mmu.config.MmuConfig(), space.features)
            engine.add_vcpu(space.guest, space.vmcs)
            engine.run(eng.Accesses.build(gva[:1000], kind[:1000]))  # compile or load
            return engine, eng.Accesses.build(gva, kind), eng.InveptType.ALL_CONTEXT

        engines = {label: fresh(mod) for label, mod in versions.items()}
        limit = bench_limit.CLimit(space.memory, space.guest, space.vmcs,
                                   space.features.maxphyaddr, versions[next(iter(versions))]
                                   .mmu.config.MmuConfig().tlb)
        best = {label: float("inf") for label in [*engines, "C"]}
        paired: dict[str, list[float]] = {label: [] for label in others}
        order = list(engines)
        for r in range(args.reps):
            took = {}
            for label in order[r % len(order):] + order[: r % len(order)]:  # rotate the order
                engines[label] = fresh(versions[label])
                engine, batch, invept = engines[label]
                engine.invept(invept)
                engine.flush_caches()
                engine.reset_stats()
                start = time.thread_time()
                assert engine.run(batch).done
                took[label] = time.thread_time() - start
                best[label] = min(best[label], took[label])
            for label in others:
                paired[label].append(took[first] / took[label])
            limit.reset()
            start = time.thread_time()
            limit.run(gva, kind)
            best["C"] = min(best["C"], time.thread_time() - start)
        rows = [engine.stats_rows for engine, _, _ in engines.values()]
        same = all(np.array_equal(rows[0], r) for r in rows[1:])
        rate = {label: args.accesses / s / 1e6 for label, s in best.items()}
        print(f"| {workload} | " + " | ".join(f"{rate[v]:.3f} M" for v in versions) +
              f" | {rate['C']:.3f} M | " +
              " | ".join(f"{rate[v] / rate['C']:.3f}" for v in versions) +
              "".join(f" | {np.median(paired[v]):.3f} ({min(paired[v]):.2f}-{max(paired[v]):.2f})"
                      for v in others) +
              (" |" if same else " | STATISTICS DIFFER |"))


if __name__ == "__main__":
    main()
