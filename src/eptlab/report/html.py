"""One self-contained HTML page: styles inline, figures embedded as data URIs, no script and
no network. Opens from the file system as it is."""

from __future__ import annotations

import base64
import html
import platform
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from .sections import Section

MAX_ROWS = 60

STYLE = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d232b;
       max-width: 1180px; margin: 0 auto; padding: 0 24px 64px; background: #fbfbfa; }
header { border-bottom: 3px solid #2f6f9f; margin-bottom: 8px; }
h1 { font-size: 30px; margin: 28px 0 4px; } h1 small { color: #5b6b7a; font-weight: 400; }
h2 { font-size: 22px; margin: 44px 0 6px; padding-top: 12px; border-top: 1px solid #d8dde3; }
h3 { font-size: 15px; margin: 18px 0 6px; color: #3b4b5a; }
nav ol { columns: 2; column-gap: 56px; padding-left: 28px; }
nav a { color: #2f6f9f; text-decoration: none; }
.question { font-style: italic; color: #33475b; margin: 0 0 10px; }
.reading { background: #eef5fb; border-left: 4px solid #2f6f9f; padding: 8px 16px; }
.reading li { margin: 4px 0; }
.params code { background: #eceff2; padding: 1px 5px; border-radius: 3px; margin-right: 6px;
               display: inline-block; margin-bottom: 3px; font-size: 13px; }
.scroll { overflow-x: auto; max-height: 520px; overflow-y: auto; border: 1px solid #d8dde3; }
table.data { border-collapse: collapse; font-size: 12.5px; font-variant-numeric: tabular-nums; }
table.data th { position: sticky; top: 0; background: #e4e9ee; text-align: right;
                padding: 4px 8px; white-space: nowrap; }
table.data td { padding: 3px 8px; text-align: right; white-space: nowrap;
                border-top: 1px solid #eef0f2; }
table.data tr:nth-child(even) td { background: #f6f7f8; }
figure { margin: 14px 0; } figure img { max-width: 100%; border: 1px solid #e1e4e8; }
.files, footer { color: #5b6b7a; font-size: 13px; }
.glance li { margin: 6px 0; } .glance a { font-weight: 600; color: #2f6f9f; }
.provenance { font-size: 13px; color: #3b4b5a; background: #f1f1ec; padding: 4px 10px;
              border-left: 4px solid #9a8f5a; }
.notes li { margin: 4px 0; }
"""


def render(
    sections: Sequence[Section],
    *,
    root: Path,
    title: str = "eptlab report",
    subtitle: str = "second-level address translation",
) -> str:
    """The page for ``sections``; file links are relative to ``root`` (the report's folder)."""
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    toc = "".join(
        f'<li><a href="#{_e(s.key)}">{_e(s.title)}</a> &mdash; {_e(s.question)}</li>'
        for s in sections
    )
    body = "\n".join(_section(s, root) for s in sections)
    glance = "".join(
        f'<li><a href="#{_e(s.key)}">{_e(s.title)}</a>: {_e(s.interpretation[0])}</li>'
        for s in sections
        if s.interpretation
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title><style>{STYLE}</style></head>
<body><header><h1>{_e(title)} <small>{_e(subtitle)}</small></h1>
<p>Each section says where its numbers come from. <b>Simulated</b> numbers are computed by
eptlab's model: event counts (walks, references, exits) follow the architecture, and cycles and
times are those counts priced by a cost profile whose every value, with its source, is listed in
"Model and limits" at the end, together with what the model leaves out and which results hold
by construction. <b>Measured</b> numbers come from real KVM on this host, which names its
flavour. The sentences under each question are generated from the table below them.</p>
</header>
<section id="glance"><h2>At a glance</h2><ul class="glance">{glance}</ul></section>
<nav><h3>Contents</h3><ol>{toc}</ol></nav>
{body}
<footer><p>Generated {now} on {_e(platform.node())} ({_e(platform.platform())}, Python
{_e(platform.python_version())}).</p></footer>
</body></html>
"""


def _section(s: Section, root: Path) -> str:
    reading = "".join(f"<li>{_e(text)}</li>" for text in s.interpretation)
    params = "".join(f"<code>{_e(k)}={_e(_value(v))}</code>" for k, v in s.params.items())
    params_html = f'<p class="params">Parameters: {params}</p>' if params else ""
    tables = "".join(f"<h3>{_e(caption)}</h3>{_table(t)}" for caption, t in s.tables)
    figures = "".join(
        f'<figure><img alt="{_e(f.stem)}" src="{_data_uri(f)}"></figure>' for f in s.figures
    )
    links = ", ".join(f'<a href="{_e(_relative(f, root))}">{_e(f.name)}</a>' for f in s.files)
    files = f'<p class="files">Files: {links}</p>' if links else ""
    kind = f"<b>{_e(s.kind.capitalize())}.</b> " if s.kind else ""
    provenance = f'<p class="provenance">{kind}{_e(s.provenance)}</p>' if s.provenance else ""
    notes = "".join(
        f'<h3>{_e(caption)}</h3><ul class="notes">{"".join(f"<li>{_e(t)}</li>" for t in items)}'
        "</ul>"
        for caption, items in s.notes
        if items
    )
    return f"""<section id="{_e(s.key)}"><h2>{_e(s.title)}</h2>
{provenance}<p class="question">{_e(s.question)}</p>
<div class="reading"><ul>{reading}</ul></div>
{params_html}{figures}{tables}{notes}
{files}</section>"""


def _table(table: pd.DataFrame) -> str:
    shown = table.head(MAX_ROWS)
    note = (
        f"<p class='files'>First {MAX_ROWS} of {len(table)} rows; all of them are in the files."
        "</p>"
        if len(table) > MAX_ROWS
        else ""
    )
    text = shown.to_html(
        index=False, classes="data", border=0, na_rep="", float_format=_number, escape=True
    )
    return f'<div class="scroll">{text}</div>{note}'


def _number(value: float) -> str:
    if value != value:  # NaN
        return ""
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def _value(value: object) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return path.resolve().as_uri()


def _e(text: object) -> str:
    return html.escape(str(text))
