"""What a vCPU runs: a sequence of segments (runs of memory accesses, hypercalls, guest-side
actions such as a process switch)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..traces.model import TraceChunk

if TYPE_CHECKING:
    from .vcpu import VCPU


@dataclass(frozen=True)
class Run:
    """Accesses the guest performs, in user mode (CPL 3) or supervisor mode."""

    chunk: TraceChunk
    user: bool = True


@dataclass(frozen=True)
class Hypercall:
    """A VMCALL with a number and arguments: exits to the hypervisor."""

    number: int
    args: tuple[int, ...] = ()


@dataclass(frozen=True)
class GuestAction:
    """Something the guest kernel does between accesses (switch process, INVLPG, ...)."""

    action: Callable[[VCPU], None]
    label: str = "action"


Segment = Run | Hypercall | GuestAction
