"""The explorer page: one self-contained HTML file (inline CSS and JavaScript, no network).

The page only displays: everything it shows (grid, references, removed references of every
cache scenario, the outcome bit by bit) is the JSON document of :func:`model.explorer_data`,
embedded in a ``<script type="application/json" id="walk-data">`` element.

Stable hooks for tests: ``.cell`` (one per reference, ``data-index``), ``.cell.current``,
``.cell.done``, ``.cell.removed``, ``.cell.exit``; buttons ``#prev``, ``#next``, ``#reset``;
scenario inputs ``#opt-GROUP-VALUE``; ``#removed-count[data-count]``; ``tr.ref`` rows;
``body[data-step]``.
"""

from __future__ import annotations

import html
import json

_MARK = "/*__WALK_DATA__*/"


def render_page(data: dict[str, object], title: str = "eptlab: two-dimensional walk") -> str:
    """The page for ``data`` (from :func:`~eptlab.explore.model.explorer_data`)."""
    payload = json.dumps(data, separators=(",", ":"))
    # inside <script>, "</" could close the element early: escape "<" and ">" as JSON allows
    payload = payload.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return _TEMPLATE.replace("__TITLE__", html.escape(title)).replace(_MARK, payload)


_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
:root {
  --bg: #f4f5f9; --panel: #ffffff; --ink: #1d2330; --muted: #6b7385; --line: #e2e5ee;
  --guest: #e8912d; --guest-soft: #fdf0e0; --guest-done: #f6c995;
  --ept: #3a78d8; --ept-soft: #e6effc; --ept-done: #a9c6f3;
  --current: #0f9d6b; --exit: #d2334a; --removed: #c9ccd4;
}
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
code, .mono { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace;
  font-size: 12.5px; }
header { padding: 18px 28px 6px; }
header h1 { margin: 0 0 4px; font-size: 22px; font-weight: 650; letter-spacing: -0.01em; }
header .sub { color: var(--muted); }
header .sub b { color: var(--ink); }
header code { background: #e9ebf2; padding: 2px 6px; border-radius: 5px; }
.toolbar { display: flex; align-items: center; gap: 8px; padding: 10px 28px 4px; }
button { font: inherit; border: 1px solid #c8cdd9; background: #fff; color: var(--ink);
  padding: 6px 14px; border-radius: 8px; cursor: pointer; }
button:hover:not(:disabled) { border-color: var(--ept); color: var(--ept); }
button:disabled { opacity: 0.45; cursor: default; }
button#next { background: var(--ink); color: #fff; border-color: var(--ink); }
button#next:hover:not(:disabled) { background: #33405a; color: #fff; }
#counter { margin-left: 10px; font-weight: 600; }
.hint { color: var(--muted); margin-left: 6px; }
.layout { display: grid; grid-template-columns: 600px minmax(0, 1fr);
  gap: 18px; padding: 12px 28px 28px; align-items: start; }
.col { display: flex; flex-direction: column; gap: 18px; min-width: 0; }
.panel { overflow-x: auto; background: var(--panel); border: 1px solid var(--line);
  border-radius: 12px; padding: 14px 16px 16px; box-shadow: 0 1px 2px rgba(20, 30, 60, 0.05); }
.panel h2 { margin: 0 0 10px; font-size: 13px; text-transform: uppercase;
  letter-spacing: 0.06em; color: var(--muted); font-weight: 650; }
/* the grid */
#grid { display: grid; gap: 6px; }
.colhead, .rowhead { font-size: 12px; color: var(--muted); display: flex; align-items: center; }
.colhead { justify-content: center; text-align: center; font-weight: 600; padding-bottom: 2px; }
.rowhead { justify-content: flex-end; padding-right: 6px; font-weight: 650; color: var(--ink); }
.rowhead.data { color: var(--ept); }
.cell, .slot { height: 58px; border-radius: 9px; display: flex; flex-direction: column;
  align-items: center; justify-content: center; position: relative; }
.cell { cursor: pointer; border: 2px solid transparent; }
.cell.ept { background: var(--ept-soft); color: #234a86; }
.cell.guest { background: var(--guest-soft); color: #7a4309; }
.cell .num { font-size: 17px; font-weight: 700; line-height: 1.1; }
.cell .lbl { font-size: 10.5px; opacity: 0.8; white-space: nowrap; }
.cell.ept.done { background: var(--ept-done); }
.cell.guest.done { background: var(--guest-done); }
.cell.done .num::after { content: " \\2713"; font-size: 12px; }
.cell.current { border-color: var(--current); box-shadow: 0 0 0 4px rgba(15, 157, 107, 0.25);
  transform: scale(1.04); z-index: 1; }
.cell.removed { background: repeating-linear-gradient(135deg, #eceef2 0 6px, #e2e4ea 6px 12px);
  color: #9aa0ad; }
.cell.removed .num { text-decoration: line-through; }
.cell.exit { border-color: var(--exit); background: #fbe3e6; color: var(--exit); }
.cell.exit .num::after { content: " \\2716"; }
.slot { border: 1.5px dashed var(--line); color: #aab0bd; font-size: 10.5px; text-align: center; }
.slot.data { border: 1.5px solid #b9d0f2; color: #2b5aa8; background: #f5f9ff; font-weight: 600; }
.slot.data.reached { background: #dff5ea; border-color: var(--current); color: #0b6b49; }
.legend { display: flex; flex-wrap: wrap; gap: 14px; margin-top: 12px; color: var(--muted);
  font-size: 12px; }
.sw { display: inline-block; width: 14px; height: 14px; border-radius: 4px;
  vertical-align: -2px; margin-right: 5px; border: 2px solid transparent; }
.sw.guest { background: var(--guest-soft); } .sw.ept { background: var(--ept-soft); }
.sw.done { background: var(--ept-done); } .sw.cur { border-color: var(--current); }
.sw.rem { background: #e2e4ea; } .sw.exit { border-color: var(--exit); background: #fbe3e6; }
/* detail */
dl.kv { display: grid; grid-template-columns: max-content 1fr; gap: 3px 14px; margin: 0; }
dl.kv dt { color: var(--muted); }
dl.kv dd { margin: 0; word-break: break-all; }
#detail .headline { font-size: 15px; font-weight: 650; margin-bottom: 8px; }
#detail .idle { color: var(--muted); }
#detail .stop { margin-top: 8px; color: var(--exit); font-weight: 650; }
/* scenarios */
.group { display: grid; grid-template-columns: 118px 1fr; gap: 8px; padding: 5px 0;
  border-bottom: 1px solid #f0f1f5; align-items: baseline; }
.group .gt { font-weight: 600; font-size: 12.5px; line-height: 1.25; }
.group .opts { display: flex; flex-wrap: wrap; gap: 2px 14px; }
.group label { display: inline-flex; align-items: center; gap: 4px; cursor: pointer;
  white-space: nowrap; }
.group label.off { color: #aab0bd; cursor: not-allowed; }
.group .n { color: var(--muted); font-size: 12px; }
#na-notes { color: var(--muted); font-size: 12px; margin-top: 6px; }
#removed-count { margin-top: 8px; padding: 8px 10px; border-radius: 8px; background: #f1f3f8; }
#removed-count b { font-size: 15px; }
/* references */
table.refs { border-collapse: collapse; width: 100%; font-size: 12px; }
table.refs th { text-align: left; color: var(--muted); font-weight: 600; font-size: 11.5px;
  border-bottom: 1px solid var(--line); padding: 4px 6px; position: sticky; top: 0;
  background: var(--panel); }
table.refs td { padding: 3px 5px; border-bottom: 1px solid #f0f1f5; white-space: nowrap; }
table.refs td.flags { white-space: normal; color: var(--muted); min-width: 90px; }
tr.ref { cursor: pointer; }
tr.ref:hover td { background: #f7f8fb; }
tr.ref .tag { display: inline-block; min-width: 42px; text-align: center; border-radius: 5px;
  padding: 0 5px; font-size: 11px; font-weight: 650; }
tr.ref.guest .tag { background: var(--guest-soft); color: #7a4309; }
tr.ref.ept .tag { background: var(--ept-soft); color: #234a86; }
tr.ref.done td { color: #59606f; }
tr.ref.current td { background: #e2f6ee !important; font-weight: 600; }
tr.ref.removed td { color: #b4b8c2; text-decoration: line-through; }
tr.ref.exit td { background: #fbe3e6; }
/* outcome */
#outcome .title { font-size: 16px; font-weight: 700; margin-bottom: 8px; }
#outcome.bad .title { color: var(--exit); }
#outcome.good .title { color: var(--current); }
#outcome .note { color: var(--muted); margin-top: 6px; }
table.bits { border-collapse: collapse; margin-top: 10px; font-size: 12.5px; }
table.bits th, table.bits td { padding: 2px 10px 2px 0; text-align: left; }
table.bits th { color: var(--muted); font-weight: 600; font-size: 11.5px; }
table.bits tr.set td { font-weight: 700; }
table.bits tr.set td.v { color: var(--exit); }
table.bits tr.clear td { color: #9aa0ad; }
table.bits td.m { font-weight: 400; color: var(--muted); font-size: 12px; }
table.bits tr.set td.m { color: var(--ink); }
</style>
</head>
<body data-step="0">
<header>
  <h1 id="title">Two-dimensional walk</h1>
  <div class="sub" id="subtitle"></div>
</header>
<div class="toolbar">
  <button id="reset" title="Reset (Home)">&#8634; Reset</button>
  <button id="prev" title="Previous reference (&#8592;)">&#9664; Prev</button>
  <button id="next" title="Next reference (&#8594;)">Next &#9654;</button>
  <span id="counter"></span><span class="hint">&#8592; &#8594; keys step, Home resets;
  click a cell or a row to jump</span>
</div>
<div class="layout">
  <div class="col">
    <section class="panel"><h2>Walk grid: guest levels &times; EPT levels</h2>
      <div id="grid"></div>
      <div class="legend">
        <span><i class="sw guest"></i>guest entry read</span>
        <span><i class="sw ept"></i>EPT entry read</span>
        <span><i class="sw done"></i>done</span>
        <span><i class="sw cur"></i>current</span>
        <span><i class="sw rem"></i>removed by a cache</span>
        <span><i class="sw exit"></i>walk stops here</span>
      </div>
    </section>
    <section class="panel" id="detail"><h2>Current reference</h2><div id="detail-body"></div>
    </section>
    <section class="panel" id="scenario"><h2>Cache scenario: what a hit removes</h2>
      <div id="groups"></div><div id="na-notes"></div>
      <div id="removed-count" data-count="0"></div>
    </section>
  </div>
  <div class="col">
    <section class="panel"><h2>References, in walk order</h2>
      <table class="refs" id="refs"><thead><tr><th>#</th><th>cell</th><th>entry read</th>
      <th>on behalf of</th><th>GPA</th><th>entry HPA</th><th>value</th><th>flags</th>
      </tr></thead><tbody></tbody></table>
    </section>
    <section class="panel" id="outcome"><h2>Outcome</h2><div id="outcome-body"></div></section>
  </div>
</div>
<script type="application/json" id="walk-data">/*__WALK_DATA__*/</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("walk-data").textContent);
const refs = D.references;
const N = refs.length;
const $ = (sel) => document.querySelector(sel);
const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};

const choice = Object.assign({}, D.initial_choice);
let removed = new Set();
let active = [];      // indices of the references the walk still makes, in order
let step = 0;         // how many of them are done or current

function scenarioKey() { return D.groups.map((g) => choice[g.key]).join("-"); }

function applyScenario() {
  const keep = step > 0 ? active[step - 1] : null;
  removed = new Set(D.scenarios[scenarioKey()] || []);
  active = refs.map((r) => r.index).filter((i) => !removed.has(i));
  step = keep === null ? 0 : active.filter((i) => i <= keep).length;
}

// -- building the page ------------------------------------------------------------------
function buildHeader() {
  const s = D.summary;
  $("#subtitle").innerHTML = "";
  const sub = $("#subtitle");
  sub.append(`${s.access} of GVA `, el("b", "mono", s.gva), ": ",
    el("b", "", `${s.count} memory references`),
    ` (${s.rows} rows \\u00d7 ${s.ept_columns} EPT levels + the guest entry)  `,
    el("code", "", D.command));
}

function buildGrid() {
  const grid = $("#grid");
  const cols = D.columns.length;
  grid.style.gridTemplateColumns = `96px repeat(${cols}, minmax(0, 1fr))`;
  grid.append(el("div", "colhead", ""));
  for (const c of D.columns) grid.append(el("div", "colhead", c.label));
  const at = new Map();
  for (const c of D.cells) at.set(`${c.row},${c.col}`, c);
  const slots = new Map();
  for (const s of D.slots) slots.set(`${s.row},${s.col}`, s);
  D.rows.forEach((row, r) => {
    grid.append(el("div", "rowhead" + (row.for_level === 0 ? " data" : ""),
      row.for_level === 0 ? "data GPA" : `guest ${row.label}`));
    for (let c = 0; c < cols; c++) {
      const cell = at.get(`${r},${c}`);
      if (cell) {
        const ref = refs[cell.index];
        const div = el("div", `cell ${ref.dim}`);
        div.dataset.index = cell.index;
        div.id = `cell-${cell.index}`;
        div.title = `#${cell.index + 1} ${ref.entry} for ${ref.for}\\n` +
          `${ref.gpa_role} ${ref.gpa}\\nentry at HPA ${ref.hpa}\\nvalue ${ref.value}`;
        div.append(el("span", "num", String(cell.index + 1)), el("span", "lbl", cell.label));
        div.addEventListener("click", () => jumpTo(cell.index));
        grid.append(div);
      } else {
        const s = slots.get(`${r},${c}`);
        const kind = s ? s.kind : "absent";
        const text = { data: "data access", unreached: "not reached", absent: "" }[kind];
        const div = el("div", `slot ${kind}`, text);
        if (kind === "data") div.id = "data-slot";
        if (kind === "absent") div.title = "no entry at this level: a large page ends the walk";
        grid.append(div);
      }
    }
  });
}

function buildRefs() {
  const body = $("#refs tbody");
  for (const r of refs) {
    const tr = el("tr", `ref ${r.dim}`);
    tr.id = `ref-${r.index}`;
    tr.dataset.index = r.index;
    const tag = el("span", "tag", r.label);
    const cells = [String(r.index + 1), tag, r.entry, r.for, r.gpa, r.hpa, r.value, r.flags];
    cells.forEach((c, k) => {
      const td = el("td", k >= 4 && k <= 6 ? "mono" : (k === 7 ? "flags" : ""));
      if (typeof c === "string") td.textContent = c; else td.append(c);
      tr.append(td);
    });
    tr.addEventListener("click", () => jumpTo(r.index));
    body.append(tr);
  }
}

function buildGroups() {
  const box = $("#groups");
  for (const g of D.groups) {
    const opts = D.options.filter((o) => o.group === g.key);
    if (!opts.length) continue;
    const div = el("div", "group");
    div.append(el("div", "gt", g.title));
    const box2 = el("div", "opts");
    div.append(box2);
    const binary = opts.length === 1 && opts[0].value === 1;
    const add = (value, text, available, why, n) => {
      const label = el("label", available ? "" : "off");
      const input = document.createElement("input");
      input.type = binary ? "checkbox" : "radio";
      input.name = `grp-${g.key}`;
      input.id = `opt-${g.key}-${value}`;
      input.value = value;
      input.disabled = !available;
      input.checked = binary ? choice[g.key] === 1 : choice[g.key] === value;
      if (!available) label.title = why;
      input.addEventListener("change", () => {
        choice[g.key] = binary ? (input.checked ? 1 : 0) : value;
        applyScenario();
        render();
      });
      label.append(input, text);
      if (n !== null) label.append(el("span", "n", available ? `\\u2212${n}` : "(n/a)"));
      box2.append(label);
    };
    if (!binary) add(0, "none", true, "", null);
    for (const o of opts) add(o.value, o.label, o.available, o.why, o.removes);
    box.append(div);
  }
  for (const o of D.options.filter((o) => !o.available)) {
    const title = D.groups.find((g) => g.key === o.group).title;
    $("#na-notes").append(el("div", "", `\u2715 ${title}, ${o.label}: not offered, ${o.why}.`));
  }
}

function buildOutcome() {
  const o = D.outcome;
  const box = $("#outcome");
  box.className = "panel " + (o.kind === "translated" ? "good" : "bad");
  const body = $("#outcome-body");
  body.append(el("div", "title", o.title));
  const dl = el("dl", "kv");
  for (const [k, v] of o.details) dl.append(el("dt", "", k), el("dd", "mono", v));
  if (o.at !== null) {
    dl.append(el("dt", "", "stops at"),
      el("dd", "", `reference #${o.at + 1} (${refs[o.at].label}: ${refs[o.at].entry})`));
  }
  body.append(dl);
  if (o.note) body.append(el("div", "note", o.note));
  if (o.bits.length) {
    const t = el("table", "bits");
    t.id = "bits";
    const head = el("tr");
    head.append(el("th", "", "bit"), el("th", "", o.bits_title), el("th", "", "value"),
      el("th", "", "meaning"));
    t.append(head);
    for (const b of o.bits) {
      const tr = el("tr", b.value ? "set" : "clear");
      tr.append(el("td", "mono", String(b.bit)), el("td", "mono", b.name),
        el("td", "v", String(b.value)), el("td", "m", b.meaning));
      t.append(tr);
    }
    body.append(t);
  }
}

// -- state -> view -----------------------------------------------------------------------
function render() {
  const current = step > 0 ? active[step - 1] : null;
  const done = new Set(active.slice(0, Math.max(0, step - 1)));
  const exitAt = D.outcome.at;
  // the walk ends where it stops: the exit shows once its last reference is reached (an
  // accessed-flag write that faults points back at an earlier guest entry)
  const exitReached = exitAt !== null && active.length > 0 && step === active.length;
  for (const i of refs.map((r) => r.index)) {
    const nodes = [document.getElementById(`cell-${i}`), document.getElementById(`ref-${i}`)];
    for (const node of nodes) {
      if (!node) continue;
      node.classList.toggle("current", i === current);
      node.classList.toggle("done", done.has(i));
      node.classList.toggle("removed", removed.has(i));
      node.classList.toggle("exit", exitReached && i === exitAt);
    }
  }
  const dataSlot = document.getElementById("data-slot");
  if (dataSlot) dataSlot.classList.toggle("reached", step === active.length);
  document.body.dataset.step = String(step);
  $("#prev").disabled = step === 0;
  $("#next").disabled = step === active.length;
  $("#counter").textContent = `step ${step} / ${active.length}` +
    (removed.size ? `  (${removed.size} of ${N} removed)` : "");
  const rc = $("#removed-count");
  rc.dataset.count = String(removed.size);
  rc.innerHTML = "";
  rc.append(el("b", "", String(removed.size)), ` of ${N} references removed: the walk makes `,
    el("b", "", String(active.length)));
  renderDetail(current);
}

function renderDetail(current) {
  const body = $("#detail-body");
  body.innerHTML = "";
  if (current === null) {
    const text = !N ? "The walk reads no entry: see the outcome."
      : active.length ? `Press Next (\\u2192) to start: the walk makes ${active.length} references.`
      : "No reference is left: the cache scenario removes the whole walk.";
    body.append(el("div", "idle", text));
    return;
  }
  const r = refs[current];
  body.append(el("div", "headline", `#${r.index + 1}: ${r.entry} (${r.label})`));
  const dl = el("dl", "kv");
  const rows = [["on behalf of", r.for], [r.gpa_role, r.gpa], ["entry at HPA", r.hpa],
    ["value read", r.value], ["flags", r.flags]];
  for (const [k, v] of rows) dl.append(el("dt", "", k), el("dd", "mono", v));
  body.append(dl);
  if (current === D.outcome.at) {
    body.append(el("div", "stop", `The walk stops here: ${D.outcome.title}.`));
  }
}

function go(n) { step = Math.max(0, Math.min(active.length, n)); render(); }
function jumpTo(index) {
  const k = active.indexOf(index);
  if (k >= 0) go(k + 1);
}

$("#next").addEventListener("click", () => go(step + 1));
$("#prev").addEventListener("click", () => go(step - 1));
$("#reset").addEventListener("click", () => go(0));
document.addEventListener("keydown", (e) => {
  if (e.target && e.target.tagName === "INPUT") return;
  if (e.key === "ArrowRight" || e.key === "ArrowDown") { go(step + 1); e.preventDefault(); }
  else if (e.key === "ArrowLeft" || e.key === "ArrowUp") { go(step - 1); e.preventDefault(); }
  else if (e.key === "Home" || e.key === "Escape") { go(0); e.preventDefault(); }
});

buildHeader();
buildGrid();
buildRefs();
buildGroups();
buildOutcome();
applyScenario();
step = Math.min(D.initial_step, active.length);
render();
</script>
</body>
</html>
"""
