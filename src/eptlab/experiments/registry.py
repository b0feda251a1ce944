"""Every experiment, by name: ``name -> "module:Class"`` (imported when first needed)."""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import ConfigError

_EXPERIMENTS = {
    "nested-overhead": "eptlab.experiments.nested_overhead:NestedOverhead",
    "cow-fork": "eptlab.experiments.cow_fork:CowFork",
    "prefetch-hypercall": "eptlab.experiments.prefetch_hypercall:PrefetchHypercall",
    "integrity-monitor": "eptlab.experiments.integrity_monitor:IntegrityMonitor",
    "tsx-aborts": "eptlab.experiments.tsx_aborts:TsxAborts",
}


def _load(spec: str) -> Any:
    module, _, cls = spec.partition(":")
    return getattr(importlib.import_module(module), cls)


def experiments() -> dict[str, Any]:
    return {name: _load(spec) for name, spec in _EXPERIMENTS.items()}


def get(name: str) -> Any:
    if name not in _EXPERIMENTS:
        raise ConfigError("experiment", f"{name!r} is not one of {', '.join(sorted(_EXPERIMENTS))}")
    return _load(_EXPERIMENTS[name])
