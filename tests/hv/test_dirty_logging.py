"""Page-modification logging seen from the hypervisor: a drain returns exactly the entries the
processor wrote (511 - index of them, SDM Vol. 3C §29.3.6: the index is decremented after each
write, from 511), every written data page among them."""

from __future__ import annotations

import numpy as np

from eptlab.arch import Access
from eptlab.hv import Hypervisor, Run

from .test_hypervisor import GVA, MiB, chunk, guest_with_mapping


def test_drain_returns_exactly_the_logged_entries() -> None:
    hv = Hypervisor()
    vm, _, vcpu = guest_with_mapping(hv, pages=8, pml=True)
    vcpu.load([Run(chunk(GVA + np.arange(5) * 4096, kind=Access.WRITE))])
    hv.run([vcpu])
    index = vcpu.vmcs.pml_index
    assert index < 511
    logged = vm.drain_pml(vcpu)
    assert len(logged) == 511 - index
    assert {2 * MiB + i * 4096 for i in range(5)} <= set(logged)
    assert vcpu.vmcs.pml_index == 511
    assert vm.drain_pml(vcpu) == []  # nothing new
