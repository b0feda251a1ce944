"""The applications on real hardware (``eptlab kvm NAME``): each is a class with ``rows(params)``
and a frozen parameters dataclass. Registered here by name, imported when first needed."""

from __future__ import annotations

import importlib
from typing import Any

from ...errors import ConfigError

APPS = {
    "fork": "eptlab.kvm.apps.fork:Fork:ForkParams",
    "dirty-log": "eptlab.kvm.apps.dirty_log:DirtyLog:DirtyLogParams",
    "prefetch": "eptlab.kvm.apps.prefetch:Prefetch:PrefetchParams",
    "trap-rotation": "eptlab.kvm.apps.trap_rotation:TrapRotation:TrapRotationParams",
    "crosscheck": "eptlab.kvm.apps.crosscheck:Crosscheck:CrosscheckParams",
}


def get(name: str) -> tuple[Any, type]:
    """``(app instance, its parameters dataclass)``."""
    if name not in APPS:
        raise ConfigError("app", f"{name!r} is not one of {', '.join(APPS)}")
    module, cls, params = APPS[name].split(":")
    mod = importlib.import_module(module)
    return getattr(mod, cls)(), getattr(mod, params)
