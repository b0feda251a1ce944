"""The HTML report: every experiment's question, parameters, reading, figures and table in one
self-contained page (``out/report.html``), built from the files the runs left in ``out/``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..experiments.registry import names
from .html import render
from .model import (
    ARCHITECTURAL,
    MEASURED,
    SIMULATED,
    flavour_label,
    measured_words,
    model_section,
    profile_summary,
    simulated_words,
    subtitle,
)
from .sections import Section, experiment_section, kvm_section, walks_section

WALKS_PROVENANCE = (
    "Memory-reference counts of eptlab's reference walker, which follows the SDM; no cost "
    "profile is involved."
)


def collect(out: Path, experiments: list[str] | None = None) -> list[Section]:
    """Sections for the walk tour, every experiment that has results under ``out``, and the
    KVM experiments' results (``out/kvm-*``) in one section."""
    sections = []
    if (out / "walks.json").exists():
        walks = walks_section(out / "walks.json")
        sections.append(replace(walks, kind=ARCHITECTURAL, provenance=WALKS_PROVENANCE))
    for name in experiments or names():
        directory = out / name
        present = (directory / f"{name}.json").exists() and (directory / f"{name}.parquet").exists()
        if present and result_status(directory) in ("complete", None):  # never a partial one
            profile = profile_summary(directory, name)
            sections.append(
                replace(
                    experiment_section(name, directory),
                    kind=SIMULATED,
                    provenance=simulated_words(profile),
                    profile_name=str(profile["name"]) if profile else "",
                )
            )
    if list(out.glob("kvm-*/kvm-*.json")):
        kvm = kvm_section(out)
        first = kvm.tables[0][1]
        sections.append(
            replace(
                kvm,
                kind=MEASURED,
                provenance=measured_words(first),
                flavour=flavour_label(first),
            )
        )
    return sections


def result_status(directory: Path) -> str | None:
    """``"complete"`` or ``"partial"`` from a result's ``manifest.json``; None without one
    (a result written before manifests existed)."""
    from ..experiments.output import read_manifest

    manifest = read_manifest(directory)
    return None if manifest is None else str(manifest.get("status"))


def left_out(out: Path) -> list[str]:
    """One line for each result under ``out`` the report does not show or cannot vouch for:
    partial results (a run that did not finish) and results without a manifest."""
    from ..experiments.output import PARTIAL_SUFFIX

    notes = []
    for name in names():
        directory = out / name
        status = result_status(directory) if directory.is_dir() else "absent"
        if status == "partial":
            notes.append(f"{directory}: partial result (its manifest says so): left out")
        elif status is None and (directory / f"{name}.json").exists():
            notes.append(f"{directory}: no manifest.json (an older eptlab wrote it): shown as is")
        staging = out / (name + PARTIAL_SUFFIX)
        if staging.is_dir():
            notes.append(
                f"{staging}: an unfinished run (partial): left out; the report shows the last "
                "complete result, if any"
            )
    return notes


def build_report(out: Path, experiments: list[str] | None = None) -> Path:
    """Write ``out/report.html`` from the results in ``out``; returns its path."""
    out = Path(out)
    sections = collect(out, experiments)
    model = model_section(out, sections)
    path = out / "report.html"
    path.write_text(render([*sections, model], root=out, subtitle=subtitle(sections)))
    return path


__all__ = ["Section", "build_report", "collect", "left_out", "result_status"]
