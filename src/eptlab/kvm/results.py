"""Whether the KVM applications can run here (the tests and ``eptlab demo`` ask). Their runs,
files and figures are the ``kvm-*`` experiments (:mod:`eptlab.experiments.kvm_apps`,
``kvm_tsx``, ``kvm_crosscheck``)."""

from __future__ import annotations

from ..errors import KvmUnavailable


def unavailable() -> str | None:
    """Why /dev/kvm cannot be used here, or None when it opens."""
    from .fds import Kvm

    try:
        Kvm.open().close()
    except KvmUnavailable as exc:
        return str(exc)
    return None
