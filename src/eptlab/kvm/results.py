"""Running the KVM applications for the demo and the report: is KVM here, run one application
with overrides, and keep its rows as files (``OUT/kvm/NAME.json``, ``.csv``, ``.parquet``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import KvmUnavailable
from ..experiments.base import apply_overrides, params_dict
from .apps import APPS, get

Row = dict[str, Any]


def unavailable() -> str | None:
    """Why /dev/kvm cannot be used here, or None when it opens."""
    from .fds import Kvm

    try:
        Kvm.open().close()
    except KvmUnavailable as exc:
        return str(exc)
    return None


def run_app(name: str, overrides: dict[str, str] | None = None) -> tuple[dict[str, Any], list[Row]]:
    """Run application ``name``; returns ``(params as a dict, rows)``."""
    app, params_type = get(name)
    params = apply_overrides(params_type, overrides or {})
    return params_dict(params), list(app.rows(params))


def save(out: Path, name: str, params: dict[str, Any], rows: list[Row]) -> list[Path]:
    """Write ``{command, params, rows}`` as JSON plus the rows as CSV and Parquet."""
    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows)
    paths = [out / f"{name}.json", out / f"{name}.csv", out / f"{name}.parquet"]
    paths[0].write_text(json.dumps({"command": name, "params": params, "rows": rows}, indent=1))
    table.to_csv(paths[1], index=False)
    table.to_parquet(paths[2], index=False)
    return paths


def paging_words(tdp: object) -> str:
    """A ``tdp`` column value (bool, numpy bool, None or NaN) in words."""
    if tdp is None or pd.isna(tdp):
        return "paging unknown"
    return "TDP on" if bool(tdp) else "shadow paging"


def names() -> list[str]:
    return list(APPS)


def summary_figure(out: Path) -> Path | None:
    """One figure of the KVM results in ``out`` (fork time by guest size, dirty-logging cost by
    mode, trap-rotation detection by trapped fraction), saved as ``out/kvm.png``; None when
    none of those results is there."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    tables = {
        name: pd.read_parquet(out / f"{name}.parquet")
        for name in ("fork", "dirty-log", "trap-rotation")
        if (out / f"{name}.parquet").exists()
    }
    if not tables:
        return None
    figure = Figure(figsize=(4.2 * len(tables), 3.6))
    axes = figure.subplots(1, len(tables), squeeze=False)[0]
    for ax, (name, t) in zip(axes, tables.items(), strict=True):
        if name == "fork":
            ax.plot(t.guest_mib, t.fork_ms, "o-")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("guest MiB")
            ax.set_ylabel("fork ms (measured)")
            ax.set_title("fork: memfd + MAP_PRIVATE clones")
        elif name == "dirty-log":
            ax.bar(t["mode"], t.us_per_write, color="tab:blue")
            inside = t.get("kvm_exits_per_write", t.exits_per_write)  # older results lack it
            for i, (us, ex, kx) in enumerate(zip(t.us_per_write, t.exits_per_write, inside,
                                                 strict=True)):
                ax.annotate(f"{ex:g} to VMM, {kx:.2g} in KVM\nexits/write", (i, us),
                            ha="center", va="bottom", fontsize=8)
            ax.set_ylabel("us per write (measured)")
            ax.set_title("dirty logging vs trapping writes")
        else:
            ax.plot(t.trap_fraction, t.detection_rate, "o-", label="measured")
            ax.plot([0, 1], [0, 1], ":", color="grey", label="fraction trapped")
            ax.set_xlabel("fraction of memory write-protected")
            ax.set_ylabel("wild writes detected")
            ax.set_title("trap rotation")
            ax.legend(fontsize=8)
    first = next(iter(tables.values()))
    paging = paging_words(first.tdp.iloc[0])
    figure.suptitle(f"On real KVM ({first.kvm_module.iloc[0]}, {paging}): measured")
    figure.tight_layout()
    path = out / "kvm.png"
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return path
