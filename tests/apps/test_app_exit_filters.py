"""What the EPT-based apps count and claim, checked on single exits and edits: the integrity
monitor takes only write violations of a guest-linear access to a protected page (a paging-
structure write by the processor, GLA_VALID without GLA_TRANSLATION, is not the guest's store:
SDM Vol. 3C §28.2.1 Table 28-7 bits 7-8), and the trap debugger counts one EPT edit per entry
it changes."""

from __future__ import annotations

from eptlab.apps.heap_guest import HeapGuest
from eptlab.apps.integrity import KernelGuest
from eptlab.apps.trap_debugger import TrapDebugger
from eptlab.arch import EptQual, EptViolation
from eptlab.guest import KernelImage
from eptlab.hv.exits import Exit


def small_guest() -> KernelGuest:
    image = KernelImage(code=4 << 20, rodata=2 << 20, data=2 << 20)
    return KernelGuest(seed=5, image=image, slab=2 << 20, patch_keys=2, sites_per_key=2)


def test_integrity_monitor_ignores_paging_structure_writes() -> None:
    guest = small_guest()
    monitor = guest.monitor("trap-code")
    page = guest.code_pages[3]
    assert page in monitor.protected
    base = EptQual.WRITE | EptQual.GLA_VALID
    walk = Exit(guest.vcpu, EptViolation(page + 8, 0x1000, int(base)))  # an A/D-flag update
    assert not monitor._on_ept_violation(walk)
    assert monitor.counters.trapped_writes == 0
    store = Exit(guest.vcpu, EptViolation(page + 8, 0x1000, int(base | EptQual.GLA_TRANSLATION)))
    assert monitor._on_ept_violation(store)
    assert monitor.counters.trapped_writes == 1


def test_trap_debugger_counts_one_edit_per_changed_entry() -> None:
    guest = HeapGuest(heap_pages=16, seed=3)
    debugger = TrapDebugger(guest.vm, guest.pages, guest.ring, fraction=0.0)
    debugger.attach()  # fraction 0: nothing trapped yet
    pages = sorted(debugger.hpa)[:5]
    assert len(pages) == 5 and debugger.counters.ept_edits == 0
    invept = debugger.counters.invept
    debugger.trap(pages[:3])  # revoke 3
    assert debugger.counters.ept_edits == 3
    debugger.trap(pages[1:5])  # give back 1, revoke 2
    assert debugger.counters.ept_edits == 3 + 1 + 2
    debugger.trap(pages[1:5])  # no change
    assert debugger.counters.ept_edits == 6
    assert debugger.counters.invept - invept == 2  # only after revoking


def test_allow_list_takes_a_value_as_signed_or_unsigned_64_bits() -> None:
    """Operands come from int64 arrays: a word with bit 63 set arrives negative."""
    guest = small_guest()
    monitor = guest.monitor("trap-code")
    site = next(iter(guest.sites.values()))
    for state in site.states:
        assert monitor.is_allowed(site.gpa, state)
        assert monitor.is_allowed(site.gpa, state - (1 << 64))  # the same 64 bits, signed
    assert not monitor.is_allowed(site.gpa, None)
