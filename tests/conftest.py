"""Shared test configuration."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")


def _kvm_unavailable() -> str | None:
    """Why tests marked ``kvm`` cannot run here (None: /dev/kvm opens)."""
    try:
        from eptlab.kvm.results import unavailable
    except Exception as exc:  # pragma: no cover - import problems are reported as the reason
        return f"eptlab.kvm does not import: {exc}"
    return unavailable()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kvm_items = [item for item in items if item.get_closest_marker("kvm")]
    if not kvm_items:
        return
    reason = _kvm_unavailable()
    if reason is None:
        return
    marker = pytest.mark.skip(reason=f"needs /dev/kvm: {reason}")
    for item in kvm_items:
        item.add_marker(marker)
