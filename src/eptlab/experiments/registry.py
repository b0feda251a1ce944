"""Every experiment, by name."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError


def experiments() -> dict[str, Any]:
    from .nested_overhead import NestedOverhead

    return {cls.name: cls for cls in (NestedOverhead,)}


def get(name: str) -> Any:
    known = experiments()
    if name not in known:
        raise ConfigError("experiment", f"{name!r} is not one of {', '.join(sorted(known))}")
    return known[name]
