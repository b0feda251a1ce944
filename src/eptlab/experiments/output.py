"""Where a run's files go, so that runs never mix and a result is either complete or says it
is not.

A run of experiment NAME into ``OUT`` writes everything into ``OUT.partial`` (beside ``OUT``),
whose ``manifest.json`` says ``"status": "partial"`` from the start. Only when every file is
written does the manifest say ``"complete"`` and the directory replace ``OUT`` (two renames:
the previous ``OUT`` is moved aside, then removed). An interrupted run therefore leaves the
previous complete result in ``OUT`` untouched and its own rows in ``OUT.partial``, labelled.

A run that asks to resume (``eptlab run --resume``) keeps the rows of every seed that finished
in ``OUT.partial`` (the manifest lists them, ``seeds_done``) when the parameters and the cost
profile are the same, and runs only the other seeds.

The location is checked before anything is computed: ``OUT`` must be a directory or not exist,
its parent must be creatable and writable, and an existing ``OUT`` must hold only a previous
result of the same experiment (so ``--out .`` cannot replace a folder of other files).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

MANIFEST = "manifest.json"
PARTIAL_SUFFIX = ".partial"


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` for a temporary name beside ``path``, then rename it to ``path``:
    ``path`` is either the complete file or absent (never 0 bytes or cut short)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, value: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(value, indent=1, default=str)))


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """A result directory's manifest, or None when it has none (or it does not parse)."""
    try:
        value = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _is_own(name: str, experiment: str) -> bool:
    """A file a run of ``experiment`` writes (also before manifests existed)."""
    stem = name.lstrip(".").split(".", 1)[0]
    return name == MANIFEST or stem == experiment or stem.startswith(experiment + "-") or (
        name.endswith(".png")
    )


def check_location(out: Path, experiment: str) -> None:
    """Refuse, before any compute, an output that cannot take this run's result."""
    if out.exists() and not out.is_dir():
        raise ConfigError("out", f"{out} exists and is not a directory")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if not _is_own(p.name, experiment))
        manifest = read_manifest(out)
        if manifest is not None and manifest.get("experiment") != experiment:
            raise ConfigError(
                "out", f"{out} holds a result of {manifest.get('experiment')!r}, not {experiment!r}"
            )
        if foreign:
            raise ConfigError(
                "out",
                f"{out} holds files that are not results of {experiment} ({foreign[0]!r}, ...): "
                "choose a new or empty directory",
            )
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError("out", f"{out}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError("out", f"{out}: cannot write in {ancestor}")


@dataclass
class RunOutput:
    """The staging directory of one run and its manifest."""

    out: Path
    experiment: str
    params: dict[str, Any]
    files: list[str] = field(default_factory=list)
    rows: int = 0
    profile: dict[str, Any] = field(default_factory=dict)  # CostProfile.summary()
    seeds_done: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.staging = self.out.with_name(self.out.name + PARTIAL_SUFFIX)
        self.created = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    @classmethod
    def open(
        cls,
        out: Path,
        experiment: str,
        params: dict[str, Any],
        profile: dict[str, Any] | None = None,
        *,
        resume: bool = False,
    ) -> tuple[RunOutput, list[dict[str, Any]]]:
        """Check ``out`` and create a fresh staging directory beside it; raises
        :class:`ConfigError` naming the path. A partial result left by an earlier interrupted
        run is replaced, or with ``resume`` the rows of its finished seeds are kept and
        returned (with their seeds in ``seeds_done``) if it ran the same parameters and
        profile (else :class:`ConfigError` says what differs)."""
        out = Path(out)
        check_location(out, experiment)
        run = cls(out, experiment, params, profile=profile or {})
        kept = run._resumable() if resume else []
        run.seeds_done = sorted({int(row["seed"]) for row in kept})
        run.rows = len(kept)
        try:
            if run.staging.is_dir() and not run.staging.is_symlink():
                shutil.rmtree(run.staging)
            run.staging.mkdir(parents=True)
            run.write_manifest("partial")
        except OSError as exc:
            raise ConfigError("out", f"{run.staging}: {exc.strerror or exc}") from None
        return run, kept

    def _resumable(self) -> list[dict[str, Any]]:
        """The rows of the finished seeds in the staging directory (none if there is none)."""
        manifest = read_manifest(self.staging)
        if manifest is None:
            return []
        for what, mine in (("experiment", self.experiment), ("params", self.params),
                           ("profile", self.profile)):
            theirs = json.loads(json.dumps(manifest.get(what), default=str))
            if theirs != json.loads(json.dumps(mine, default=str)):
                raise ConfigError(
                    "resume", f"{self.staging} holds a run with other {what}: run without "
                    "--resume to start afresh"
                )
        done = set(manifest.get("seeds_done") or [])
        path = self.staging / f"{self.experiment}.jsonl"
        rows = []
        if done and path.exists():
            lines = path.read_text().splitlines()
            for number, line in enumerate(lines, 1):
                try:
                    row = json.loads(line)
                except ValueError:  # the line being written when the run stopped
                    if number == len(lines):
                        break
                    raise ConfigError("resume", f"{path}:{number}: not a JSON row") from None
                if row.get("seed") in done:
                    rows.append(row)
        return rows

    def path(self, name: str) -> Path:
        """Where file ``name`` is written (in the staging directory) and recorded."""
        if name not in self.files:
            self.files.append(name)
        return self.staging / name

    def write_manifest(self, status: str, **extra: Any) -> None:
        from .. import __version__

        write_json(
            self.staging / MANIFEST,
            {
                "experiment": self.experiment,
                "params": self.params,
                "status": status,
                "rows": self.rows,
                "files": self.files,
                "seeds_done": self.seeds_done,
                "profile": self.profile,
                "created": self.created,
                "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "eptlab": __version__,
                **extra,
            },
        )

    def commit(self) -> list[str]:
        """Mark the result complete and move it into place; returns the final file paths."""
        self.write_manifest("complete")
        old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
        if self.out.exists():
            os.replace(self.out, old)
        os.replace(self.staging, self.out)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
        return [str(self.out / name) for name in self.files]

    def interrupted(self, why: str) -> str:
        """Label the staging directory partial; return what to tell the user."""
        self.write_manifest("partial", interrupted=why)
        previous = (
            f"the previous complete result in {self.out} is untouched"
            if (self.out / MANIFEST).exists() or self.out.exists()
            else f"nothing was written to {self.out}"
        )
        resume = (
            f"; its {len(self.seeds_done)} finished seed(s) are kept by a rerun with --resume"
            if self.seeds_done else ""
        )
        return (
            f"{self.experiment} {why}: kept {self.rows} finished row(s) in {self.staging} "
            f"(manifest says partial); {previous}{resume}"
        )
