"""Every experiment, by name: ``name -> "module:Class"`` (imported when first needed), in the
order of the applications they answer for (the report follows it)."""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import ConfigError

_EXPERIMENTS = {
    "nested-overhead": "eptlab.experiments.nested_overhead:NestedOverhead",
    "cow-fork": "eptlab.experiments.cow_fork:CowFork",
    "prefetch-hypercall": "eptlab.experiments.prefetch_hypercall:PrefetchHypercall",
    "double-caching": "eptlab.experiments.double_caching:DoubleCaching",
    "aslr-side-channel": "eptlab.experiments.aslr_side_channel:AslrSideChannel",
    "integrity-monitor": "eptlab.experiments.integrity_monitor:IntegrityMonitor",
    "trap-debugger": "eptlab.experiments.trap_debugger:TrapDebugger",
    "tsx-aborts": "eptlab.experiments.tsx_aborts:TsxAborts",
    "tsx-drk": "eptlab.experiments.tsx_drk:TsxDrk",
    "memory-encryption": "eptlab.experiments.memory_encryption:MemoryEncryption",
    "kvm-fork": "eptlab.experiments.kvm_apps:KvmFork",
    "kvm-dirty-log": "eptlab.experiments.kvm_apps:KvmDirtyLog",
    "kvm-prefetch": "eptlab.experiments.kvm_apps:KvmPrefetch",
    "kvm-trap-rotation": "eptlab.experiments.kvm_apps:KvmTrapRotation",
    "kvm-tsx": "eptlab.experiments.kvm_tsx:KvmTsx",
    "kvm-integrity": "eptlab.experiments.kvm_integrity:KvmIntegrity",
    "kvm-crosscheck": "eptlab.experiments.kvm_crosscheck:KvmCrosscheck",
    "model-vs-machine": "eptlab.experiments.model_vs_machine:ModelVsMachine",
}


def _load(spec: str) -> Any:
    module, _, cls = spec.partition(":")
    return getattr(importlib.import_module(module), cls)


def names() -> list[str]:
    """The simulated experiments' names in the order they are listed (and reported); the
    KVM ones (:func:`kvm_names`) need /dev/kvm and are reported in a section of their own."""
    return [name for name in _EXPERIMENTS if not name.startswith(KVM_PREFIX)]


KVM_PREFIX = "kvm-"


def kvm_names() -> list[str]:
    """The experiments measured on real KVM (``kvm-*``), in order."""
    return [name for name in _EXPERIMENTS if name.startswith(KVM_PREFIX)]


def experiments() -> dict[str, Any]:
    return {name: _load(spec) for name, spec in _EXPERIMENTS.items()}


def get(name: str) -> Any:
    if name not in _EXPERIMENTS:
        raise ConfigError("experiment", f"{name!r} is not one of {', '.join(sorted(_EXPERIMENTS))}")
    return _load(_EXPERIMENTS[name])
