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


def names() -> list[str]:
    return list(APPS)
