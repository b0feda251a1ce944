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
        if (directory / f"{name}.json").exists() and (directory / f"{name}.parquet").exists():
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


def build_report(out: Path, experiments: list[str] | None = None) -> Path:
    """Write ``out/report.html`` from the results in ``out``; returns its path."""
    out = Path(out)
    sections = collect(out, experiments)
    model = model_section(out, sections)
    path = out / "report.html"
    path.write_text(render([*sections, model], root=out, subtitle=subtitle(sections)))
    return path


__all__ = ["Section", "build_report", "collect"]
