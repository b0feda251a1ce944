"""The HTML report: every experiment's question, parameters, reading, figures and table in one
self-contained page (``out/report.html``), built from the files the runs left in ``out/``."""

from __future__ import annotations

from pathlib import Path

from ..experiments.registry import names
from .html import render
from .sections import Section, experiment_section, kvm_section, walks_section


def collect(out: Path, experiments: list[str] | None = None) -> list[Section]:
    """Sections for the walk tour, every experiment that has results under ``out``, and the
    KVM experiments' results (``out/kvm-*``) in one section."""
    sections = []
    if (out / "walks.json").exists():
        sections.append(walks_section(out / "walks.json"))
    for name in experiments or names():
        directory = out / name
        if (directory / f"{name}.json").exists() and (directory / f"{name}.parquet").exists():
            sections.append(experiment_section(name, directory))
    if list(out.glob("kvm-*/kvm-*.json")):
        sections.append(kvm_section(out))
    return sections


def build_report(out: Path, experiments: list[str] | None = None) -> Path:
    """Write ``out/report.html`` from the results in ``out``; returns its path."""
    out = Path(out)
    sections = collect(out, experiments)
    path = out / "report.html"
    path.write_text(render(sections, root=out))
    return path


__all__ = ["Section", "build_report", "collect"]
