"""MkDocs hook: ``<!-- eptlab:experiment NAME -->`` in a page becomes the experiment's question
and its parameters table, read from the code (``eptlab.experiments.registry``), so the pages
cannot drift from the parameters the experiments take."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

MARKER = re.compile(r"<!-- eptlab:experiment (?P<name>[a-z0-9-]+) -->")


def _default(field: dataclasses.Field[Any]) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "(required)"
    if isinstance(value, tuple):
        return ", ".join(str(v) for v in value) or "(empty)"
    return repr(value) if isinstance(value, str) else str(value)


def experiment_block(name: str) -> str:
    """Markdown: the question, then a table of ``--set`` parameters with their defaults and the
    demo scale's overrides."""
    from eptlab.experiments.registry import get

    experiment = get(name)
    demo = getattr(experiment, "demo", {})
    lines = [
        f"**Question.** {experiment.question}",
        "",
        f"`eptlab run {name} [--set key=value ...]` takes these parameters "
        "(defaults of a full run; `make demo` uses the demo column):",
        "",
        "| parameter | default | demo |",
        "|---|---|---|",
    ]
    for field in dataclasses.fields(experiment.Params):
        shown = demo.get(field.name, "")
        lines.append(f"| `{field.name}` | `{_default(field)}` | {f'`{shown}`' if shown else ''} |")
    return "\n".join(lines) + "\n"


def on_page_markdown(markdown: str, **_: Any) -> str:
    return MARKER.sub(lambda m: experiment_block(m.group("name")), markdown)
