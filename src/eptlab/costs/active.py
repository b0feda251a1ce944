"""The profile in effect: explicit parameters where code already passes a configuration
(``MmuConfig.from_profile(p)``), and a context variable for the rest, so a run switches
profile with ``with use_profile(p): ...`` without threading it through every call."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from .profile import CostProfile

_ACTIVE: ContextVar[CostProfile | None] = ContextVar("eptlab_cost_profile", default=None)


def active_profile() -> CostProfile:
    """The profile set by the innermost :func:`use_profile`, else the shipped default."""
    profile = _ACTIVE.get()
    return CostProfile.default() if profile is None else profile


@contextmanager
def use_profile(profile: CostProfile | None) -> Iterator[CostProfile]:
    """Make ``profile`` the active one inside the block (``None``: keep the current one)."""
    chosen = active_profile() if profile is None else profile
    token = _ACTIVE.set(chosen)
    try:
        yield chosen
    finally:
        _ACTIVE.reset(token)


def shipped_profiles() -> dict[str, Path]:
    """Profiles shipped with eptlab (``eptlab/costs/profiles/NAME.toml``), by NAME."""
    from importlib import resources

    root = Path(str(resources.files("eptlab.costs") / "profiles"))
    return {p.stem: p for p in sorted(root.glob("*.toml"))} if root.is_dir() else {}


def load_profile(path: str | Path | None) -> CostProfile:
    """``--profile FILE``: the file's values over the default; ``None``: the active profile.
    A FILE that does not exist but names a shipped profile (:func:`shipped_profiles`, e.g. one
    measured by ``eptlab calibrate``) loads that one."""
    if path is None:
        return active_profile()
    shipped = shipped_profiles()
    if not Path(path).exists() and str(path) in shipped:
        return CostProfile.load(shipped[str(path)])
    return CostProfile.load(path)
