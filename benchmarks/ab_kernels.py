"""A/B of engine versions in one process, for a loaded machine.

Each version's ``eptlab`` package is copied under its own name (``eptlab_<label>``), the bench
streams are built once, and the versions (and the C limit) run interleaved: in a rotating order,
each repetition with new engines (new arrays, so their placement in the host's caches varies).
Times are this thread's CPU time (``time.thread_time``): time spent descheduled on a shared
machine does not count (its caches are still shared). Printed per stream: the best rate of each
version and of C, each version's fraction of C, and the speed-up of each version over the first
as the median (and range) of the ratios of their times in the same repetition. The statistics
of every version are compared with the first's (a version that changes them is flagged).

    PYTHONPATH=src .venv/bin/python benchmarks/ab_kernels.py base=main new=. ctl=main \\
        --workloads seq4k,random,seq64 --accesses 200000 --reps 16

A version is ``label=REF`` (a commit or branch of this repository, via ``git archive``) or
``label=.`` (this working tree's ``src/eptlab``), optionally ``+PATCH`` (a diff applied to the
copy, e.g. ``nostats=.+nostats.diff``: a variant made only to be measured). A second copy of the
first version (``ctl`` above) shows how much two identical builds differ: placement of the
compiled code alone moves a stream by up to about 5 %. Copies live in
``$TMPDIR/eptlab-ab/<label>-<digest>``, so numba's cache of each is kept between runs.
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
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from eptlab import bench, bench_limit
from eptlab.arch.bits import PageSize
from eptlab.mmu.scenario import NestedSpace

ROOT = Path(__file__).resolve().parent.parent


def _tree_bytes(ref: str) -> bytes:
    """A tar of ``src/eptlab`` at ``ref`` (or of the working tree for ``.``)."""
    if ref == ".":
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(
                ROOT / "src" / "eptlab",
                arcname="src/eptlab",
                filter=lambda t: None if "__pycache__" in t.name else t,
            )
        return buf.getvalue()
    command = ["git", "-C", str(ROOT), "archive", ref, "src/eptlab"]
    return subprocess.run(command, check=True, capture_output=True).stdout


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
            patch_file = str(Path(patch).resolve())
            subprocess.run(["patch", "-p1", "-s", "-d", str(work), "-i", patch_file], check=True)
        (work / "src" / "eptlab").rename(home / name)
        shutil.rmtree(work)
    sys.path.insert(0, str(home))
    for sub in ("mmu.config", "mmu.engine"):
        importlib.import_module(f"{name}.{sub}")
    return importlib.import_module(name)


@dataclass
class Stream:
    """One bench stream and the space it runs in."""

    space: NestedSpace
    gva: npt.NDArray[np.int64]
    kind: npt.NDArray[np.int8]

    def engine(self, mod: ModuleType) -> tuple[Any, Any, Any]:
        """A new engine of version ``mod`` with its kernels loaded; its batch; INVEPT type."""
        eng = mod.mmu.engine
        space = self.space
        engine = eng.Engine(space.memory, mod.mmu.config.MmuConfig(), space.features)
        engine.add_vcpu(space.guest, space.vmcs)
        engine.run(eng.Accesses.build(self.gva[:1000], self.kind[:1000]))  # compile or load
        return engine, eng.Accesses.build(self.gva, self.kind), eng.InveptType.ALL_CONTEXT


def measure(versions: dict[str, ModuleType], stream: Stream, reps: int) -> str:
    """One Markdown row: the versions and C on ``stream``, interleaved ``reps`` times."""
    labels = list(versions)
    first, others = labels[0], labels[1:]
    space = stream.space
    assert space.vmcs is not None
    tlb = versions[first].mmu.config.MmuConfig().tlb
    limit = bench_limit.CLimit(
        space.memory, space.guest, space.vmcs, space.features.maxphyaddr, tlb
    )
    best = {label: float("inf") for label in [*labels, "C"]}
    paired: dict[str, list[float]] = {label: [] for label in others}
    stats: dict[str, npt.NDArray[np.int64]] = {}
    for r in range(reps):
        took = {}
        for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
            engine, batch, invept = stream.engine(versions[label])
            engine.invept(invept)
            engine.flush_caches()
            engine.reset_stats()
            start = time.thread_time()
            assert engine.run(batch).done
            took[label] = time.thread_time() - start
            best[label] = min(best[label], took[label])
            stats[label] = engine.stats_rows.copy()
        for label in others:
            paired[label].append(took[first] / took[label])
        limit.reset()
        start = time.thread_time()
        limit.run(stream.gva, stream.kind)
        best["C"] = min(best["C"], time.thread_time() - start)
    n = len(stream.gva)
    rate = {label: n / seconds / 1e6 for label, seconds in best.items()}
    cells = [f"{rate[v]:.3f} M" for v in [*labels, "C"]]
    cells += [f"{rate[v] / rate['C']:.3f}" for v in labels]
    for v in others:
        differs = "" if np.array_equal(stats[first], stats[v]) else ", statistics differ"
        cells.append(f"{np.median(paired[v]):.3f} ({min(paired[v]):.2f}-{max(paired[v]):.2f}"
                     f"{differs})")
    return " | ".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("versions", nargs="+", help="label=REF[+PATCH]")
    parser.add_argument("--workloads", default="seq64,seq4k,random")
    parser.add_argument("--accesses", type=int, default=200_000)
    parser.add_argument("--reps", type=int, default=16)
    args = parser.parse_args()
    versions = {}
    for item in args.versions:
        label, _, spec = item.partition("=")
        versions[label] = load_version(label, spec)
    labels = list(versions)
    head = [*labels, "C", *(f"{v}/C" for v in labels), *(f"{v}/{labels[0]}" for v in labels[1:])]
    print(f"| stream | {' | '.join(head)} |")
    print("|---" * (1 + len(head)) + "|")
    for workload in args.workloads.split(","):
        space = bench._space(bench.footprint(workload), PageSize.SIZE_4K, PageSize.SIZE_4K)
        gva, kind = next(bench.synthetic_stream(workload, args.accesses, args.accesses, 0))
        print(f"| {workload} | {measure(versions, Stream(space, gva, kind), args.reps)} |")


if __name__ == "__main__":
    main()
