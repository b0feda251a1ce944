"""Scripted mutation testing: apply each listed single-line bug to a copy of the tree, run the
tests chosen for it, and report which mutants the tests kill.

Usage (from the repository root; not part of CI):

    /work/main/.venv/bin/python tools/mutate.py mutation/known.toml [mutation/fresh.toml ...]
        [--only ID ...] [--jobs 1] [--json out.json]

A mutation file is TOML, one ``[[mutant]]`` table each::

    [[mutant]]
    id = "cache-no-touch"
    file = "src/eptlab/mmu/kernels/cache.py"
    original = "_touch(cache, heads, row, ways, hit, line)"   # exact text, once in the file
    replacement = "pass"
    tests = ["tests/mmu/test_lru_rings.py"]
    # or: pattern = 'regex' (must match exactly once) instead of original

The tree (tracked and untracked-but-not-ignored files under src/, tests/, examples/, guests/ and
benchmarks/, plus pyproject.toml)
is copied afresh for each mutant into $TMPDIR/eptlab-mutate-UID, so the working tree is never
touched (run one instance at a time).
Mutants under ``src/eptlab/mmu/kernels/`` run with ``NUMBA_DISABLE_JIT=1`` (the kernels then
run as plain Python: no minute of compilation per mutant); the others run compiled, from one
fixed copy directory so that numba's cache (keyed by the kernels' path and sources) is
compiled once and reused. Select fast tests for kernel mutants: the differential hypothesis
suites take minutes per mutant as plain Python. (As plain Python, numpy warns where the
compiled kernels wrap around silently, e.g. the frame table's multiplicative hash; those
RuntimeWarnings are ignored for kernel mutants.) Tests run under
``nice -n 19`` with ``-x`` (the first failure kills the mutant). A mutant whose original text
is not found is reported as ``stale`` (the source moved on: update the list). A control run of
each test selection on the unmutated tree must pass first, else the mutant is ``broken``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # --root replaces it (e.g. to measure main)
KERNELS = "src/eptlab/mmu/kernels/"
WORKDIR = Path(tempfile.gettempdir()) / f"eptlab-mutate-{os.getuid()}"  # --workdir replaces it
PYTHON = os.environ.get("MUTATE_PYTHON", sys.executable)


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    replacement: str
    tests: tuple[str, ...]
    original: str = ""
    pattern: str = ""
    note: str = ""


@dataclass
class Outcome:
    id: str
    status: str  # killed, survived, timeout, stale, broken
    seconds: float
    detail: str = ""


def load(paths: list[Path]) -> list[Mutant]:
    mutants: list[Mutant] = []
    for path in paths:
        data = tomllib.loads(path.read_text())
        for entry in data.get("mutant", []):
            entry["tests"] = tuple(entry["tests"])
            mutants.append(Mutant(**entry))
    ids = [m.id for m in mutants]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise SystemExit(f"duplicate mutant ids: {sorted(dup)}")
    return mutants


def mutate_text(text: str, m: Mutant) -> str | None:
    """The mutated source, or None when the original is not there exactly once."""
    if m.pattern:
        found = list(re.finditer(m.pattern, text, flags=re.MULTILINE))
        if len(found) != 1:
            return None
        return text[: found[0].start()] + found[0].expand(m.replacement) + text[found[0].end() :]
    if text.count(m.original) != 1:
        return None
    return text.replace(m.original, m.replacement)


def _files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "src", "tests",
         "examples", "guests", "benchmarks"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()
    return out + ["pyproject.toml"]


def _copy_tree(dest: Path, files: list[str]) -> None:
    for name in files:
        source = ROOT / name
        if not source.is_file():
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def _run_tests(tree: Path, tests: tuple[str, ...], kernel: bool, timeout: float) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=str(tree / "src"), PYTHONDONTWRITEBYTECODE="1")
    env.pop("CI", None)
    if kernel:
        env["NUMBA_DISABLE_JIT"] = "1"
    cmd = ["nice", "-n", "19", PYTHON, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
           "-p", "no:randomly", *(["-W", "ignore::RuntimeWarning"] if kernel else []), *tests]
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "timeout"
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return proc.returncode, lines[-1] if lines else ""


def run_one(m: Mutant, files: list[str], timeout: float, control: dict[tuple, str]) -> Outcome:
    start = time.monotonic()
    source = ROOT / m.file
    mutated = mutate_text(source.read_text(), m) if source.is_file() else None
    if mutated is None:
        return Outcome(m.id, "stale", 0.0, "original text not found exactly once")
    kernel = m.file.startswith(KERNELS)
    tests = tuple(t for t in m.tests if (ROOT / t.split("::")[0]).exists())  # file or folder
    if not tests:
        return Outcome(m.id, "survived", 0.0, "no selected test file exists in this tree")
    m = Mutant(**{**asdict(m), "tests": tests})
    # one fixed place for every copy: numba's cache is keyed by the kernels' path (and
    # sources), so unmutated kernels compile once there and are reused by the next mutants
    tree = WORKDIR
    shutil.rmtree(tree / "src", ignore_errors=True)
    shutil.rmtree(tree / "tests", ignore_errors=True)
    _copy_tree(tree, files)
    key = (m.tests, kernel)
    if key not in control:
        code, last = _run_tests(tree, m.tests, kernel, timeout)
        control[key] = "" if code == 0 else last or f"exit {code}"
    if control[key]:
        return Outcome(m.id, "broken", time.monotonic() - start,
                       f"the tests fail on the unmutated tree: {control[key]}")
    (tree / m.file).write_text(mutated)
    code, last = _run_tests(tree, m.tests, kernel, timeout)
    # a timeout is not a kill: on the shared machine it is more often slowness than a hang
    status = "survived" if code == 0 else "timeout" if code == -1 else "killed"
    return Outcome(m.id, status, time.monotonic() - start, last)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lists", nargs="+", type=Path)
    parser.add_argument("--only", nargs="*", default=[])
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--root", type=Path, help="the tree to mutate (default: this one)")
    parser.add_argument("--workdir", type=Path, help="where the copy goes (one per running tool)")
    args = parser.parse_args(argv)
    global ROOT, WORKDIR  # noqa: PLW0603
    if args.root:
        ROOT = args.root.resolve()
    if args.workdir:
        WORKDIR = args.workdir.resolve()
    mutants = load(args.lists)
    if args.only:
        mutants = [m for m in mutants if m.id in set(args.only)]
    files = _files()
    control: dict[tuple, str] = {}
    outcomes: list[Outcome] = []
    for m in mutants:
        o = run_one(m, files, args.timeout, control)
        outcomes.append(o)
        print(f"{o.status:8} {o.seconds:6.1f}s  {m.id:32} {o.detail}", flush=True)
    judged = [o for o in outcomes if o.status in ("killed", "survived")]
    killed = sum(o.status == "killed" for o in judged)
    score = killed / len(judged) if judged else 0.0
    print(f"score: {killed}/{len(judged)} killed = {score:.0%}"
          f" ({len(outcomes) - len(judged)} timed out, stale or broken)")
    if args.json:
        args.json.write_text(json.dumps([asdict(o) for o in outcomes], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
