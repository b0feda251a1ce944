"""Memory layouts: how a guest's pages are placed in guest-physical and host-physical memory.

``aged`` (the default): the guest OS takes guest-physical frames from an aged buddy allocator
and the host backs guest memory from another, so neither GVA -> GPA nor GPA -> HPA is
contiguous (:mod:`eptlab.memory.buddy`). ``contiguous``: both allocators hand out memory in
address order, as eptlab did before layouts existed (consecutive allocations are adjacent).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from ..errors import ConfigError
from .buddy import AgingConfig

T = TypeVar("T")
LayoutKind = Literal["aged", "contiguous"]
LAYOUTS: tuple[LayoutKind, ...] = ("aged", "contiguous")


@dataclass(frozen=True)
class LayoutConfig:
    """A layout and, for ``aged``, how memory is aged (churn parameters)."""

    kind: LayoutKind = "aged"
    aging: AgingConfig = field(default_factory=AgingConfig)

    def __post_init__(self) -> None:
        if self.kind not in LAYOUTS:
            raise ConfigError("layout", f"{self.kind!r} is not one of {', '.join(LAYOUTS)}")

    @classmethod
    def of(cls, value: LayoutConfig | str) -> LayoutConfig:
        """A configuration from itself or a layout name."""
        return value if isinstance(value, LayoutConfig) else cls(value)  # type: ignore[arg-type]

    @property
    def aged(self) -> bool:
        return self.kind == "aged"

    def guest_memory(self, need: int) -> int:
        """Memory to give a VM whose guest needs ``need`` bytes: unchanged when contiguous;
        aged, enough that ``need`` is still free once the guest's other processes hold their
        ``resident`` share and the boot allocations are made, with a quarter to spare (rounded
        up to 2 MiB)."""
        if not self.aged:
            return need
        room = need / (1.0 - self.aging.resident) * 1.25 + (self.aging.boot_mib << 20)
        return -(-int(room) // (2 << 20)) * (2 << 20)


def check_layout(value: str, name: str = "layout") -> None:
    """Raise :class:`ConfigError` naming ``name`` unless ``value`` is a layout name (for
    experiment parameters)."""
    if value not in LAYOUTS:
        raise ConfigError(name, f"{value!r} is not one of {', '.join(LAYOUTS)}")


_DEFAULT: ContextVar[LayoutConfig | None] = ContextVar("eptlab_layout", default=None)


def default_layout() -> LayoutConfig:
    """The layout a builder uses when it is given none (``aged`` unless inside
    :func:`layout_scope`)."""
    return _DEFAULT.get() or LayoutConfig()


@contextmanager
def layout_scope(layout: LayoutConfig | str) -> Iterator[LayoutConfig]:
    """Make ``layout`` the default of every builder (hypervisor, guest kernel, nested space)
    created inside the block: how an experiment applies its ``layout`` parameter to the
    applications it runs."""
    config = LayoutConfig.of(layout)
    token = _DEFAULT.set(config)
    try:
        yield config
    finally:
        _DEFAULT.reset(token)


def resolve(layout: LayoutConfig | str | None) -> LayoutConfig:
    """``layout`` as a configuration, or the default when None."""
    return default_layout() if layout is None else LayoutConfig.of(layout)


def in_layout(layout: LayoutConfig | str, items: Iterator[T]) -> Iterator[T]:
    """Run the generator ``items`` with ``layout`` as the default layout: the scope is entered
    around each step only, never held while the consumer has a value, so a consumer that
    stops early (or interleaves other work) sees no leaked default."""
    config = LayoutConfig.of(layout)
    while True:
        with layout_scope(config):
            try:
                item = next(items)
            except StopIteration:
                return
        yield item
