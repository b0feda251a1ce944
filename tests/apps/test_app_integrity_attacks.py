"""The attacks that get past write traps on the code's guest-physical pages, and the defences:
page-table remapping (invisible to GPA write traps and PML, caught by write-protecting the page
tables and neutralized by HLAT), a writable alias (caught by the GPA traps: EPT permissions are
per guest-physical page), write-then-restore (PML logs the page, the diff sees no change)."""

from __future__ import annotations

import numpy as np
import pytest

from eptlab.apps.integrity import (
    IntegrityMonitor,
    KernelActivity,
    KernelGuest,
    StoreInsert,
    Stream,
    StreamRunner,
)
from eptlab.apps.integrity_attacks import Attack
from eptlab.arch.ept import Ept
from eptlab.experiments.integrity_monitor import (
    IntegrityMonitor as Experiment,
)
from eptlab.experiments.integrity_monitor import (
    IntegrityMonitorParams,
    ModeRun,
    attack_outcome,
    run_mode,
)
from eptlab.guest import KernelImage
from eptlab.hv.guest_runner import RunReport


def guest() -> KernelGuest:
    image = KernelImage(code=4 << 20, rodata=2 << 20, data=2 << 20)
    return KernelGuest(seed=3, image=image, slab=2 << 20, patch_keys=2, sites_per_key=2)


def warm(g: KernelGuest) -> None:
    stream = KernelActivity(accesses=2000, patch_events=0, malicious_writes=0, seed=77).stream(g)
    StreamRunner(g, IntegrityMonitor(g.vm, "none", code_pages=g.code_pages)).run(
        stream, period=len(stream)
    )


def attacked(mode: str, **attacks: int) -> tuple[KernelGuest, Stream, IntegrityMonitor, RunReport]:
    """A warm guest under ``mode`` running a short stream with the given attacks only."""
    g = guest()
    warm(g)
    activity = KernelActivity(
        accesses=1500, patch_events=2, malicious_writes=0, attack_pages=1, seed=4, **attacks
    )
    stream = activity.stream(g)
    monitor = g.monitor(mode)
    report = StreamRunner(g, monitor).run(stream, period=500)
    return g, stream, monitor, report


def outcome(
    g: KernelGuest, s: Stream, m: IntegrityMonitor, r: RunReport, a: Attack
) -> tuple[bool, bool]:
    return attack_outcome(ModeRun(m.mode, g, s, m, r, 0), a)


# -- page-table remapping ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["trap-code", "pml"])
def test_remapping_is_invisible_to_gpa_write_traps_and_pml(mode: str) -> None:
    g, s, m, r = attacked(mode, remap_attacks=1)
    (attack,) = s.attacks
    code_stores = [w for w in s.writes if w.gpa & ~0xFFF in g.code_pages]
    assert all(w.label == "static-key" for w in code_stores)  # no attack store hits code
    assert outcome(g, s, m, r, attack) == (False, True)  # not reported, took effect
    payload = g.processor_gpa(attack.la)
    assert payload is not None and payload & ~0xFFF not in g.code_pages
    assert g.read_word(payload) == attack.value  # the code address now fetches the hook
    assert g.read_word(attack.target) != attack.value  # the code page itself is untouched
    if mode == "pml":
        logged = m.vm.dirty_log
        assert not {p for p in logged} & {attack.target & ~0xFFF}  # PML never logged it


def test_write_protected_page_tables_catch_the_remapping() -> None:
    g, s, m, r = attacked("trap-pt", remap_attacks=1, pt_updates=6)
    (attack,) = s.attacks
    pde = attack.trigger
    assert outcome(g, s, m, r, attack) == (True, False)
    assert [d.how for d in m.detections] == ["pt-trap"] and m.detections[0].gpa == pde.gpa
    assert g.processor_gpa(attack.la) == attack.target
    # the guest's own page-directory writes in the same page exit and are emulated
    assert m.counters.pt_stores_trapped == 1 + 6 and m.counters.pt_stores_denied == 1
    updates = s.labelled("pt-update")
    assert g.vm.read_u64(updates[-1].gpa) == updates[-1].value


def test_hlat_makes_the_remapping_a_no_op_without_reporting_it() -> None:
    g, s, m, r = attacked("hlat", remap_attacks=1)
    (attack,) = s.attacks
    pde = attack.trigger
    assert g.vm.read_u64(pde.gpa) == pde.value  # the guest's table was changed...
    assert outcome(g, s, m, r, attack) == (False, False)  # ...and nothing follows from it
    assert g.processor_gpa(attack.la) == attack.target
    assert g.kernel.kernel_tables.guest_physical(attack.la) != attack.target
    # the set-up the SDM asks for: HLAT tables read-only with PWA, the code with VGP
    assert g.hlat is not None
    for page in g.hlat.pages:
        leaf = g.vm.ept.lookup(page)
        assert leaf is not None and leaf.value & Ept.PWA and not leaf.value & Ept.W
    leaf = g.vm.ept.lookup(g.code_pages[0])
    assert leaf is not None and leaf.value & Ept.VGP


# -- alias, write-then-restore ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["trap-code", "trap-pt", "hlat"])
def test_an_alias_write_is_caught_by_the_gpa_trap(mode: str) -> None:
    g, s, m, r = attacked(mode, alias_attacks=1)
    (attack,) = s.attacks
    hook = attack.trigger_write(s)
    assert hook.gva != g.alias(attack.target)  # not the direct map: the attacker's alias
    assert outcome(g, s, m, r, attack) == (True, False)
    gpv = [d for d in m.detections if d.how == "gpv"]
    assert m.counters.gpv_violations >= (1 if mode == "hlat" else 0) and not gpv


def test_write_then_restore_pml_logs_the_page_and_the_diff_sees_no_change() -> None:
    g = guest()
    warm(g)
    target = next(w for w in g.random_code_words(np.random.default_rng(1), 8, set(g.sites)))
    original = g.read_word(target)
    hook = original ^ 0xE9
    gva = np.full(300, g.sections["rodata"].start - (1 << 64), np.int64)
    kind = np.zeros(300, np.int8)
    stream = Stream.build(
        gva,
        kind,
        [
            StoreInsert(100, target, hook, False, "restore-hook"),
            StoreInsert(150, target, original, False, "restore"),
        ],
    )
    m = g.monitor("pml")
    StreamRunner(g, m).run(stream, period=1000)  # one review, at the end
    page = target & ~0xFFF
    assert page in g.vm.dirty_log  # PML logged the code page
    assert m.detections == []  # the diff against the golden copy found nothing
    assert (page, len(stream)) in m.unchanged and m.counters.logged_unchanged >= 1
    g2 = guest()
    warm(g2)
    m2 = g2.monitor("trap-code")
    StreamRunner(g2, m2).run(stream, period=1000)
    assert [d.gpa for d in m2.detections] == [target, target]  # both stores denied, reported


# -- the experiment -----------------------------------------------------------------------------


def test_experiment_rows_say_what_each_mode_caught() -> None:
    p = IntegrityMonitorParams(
        accesses=20_000, warmup=2_000, period=5_000, code_mib=4, slab_mib=2, malicious_writes=2,
        reference_accesses=1_000, remap_attacks=1, alias_attacks=1, restore_attacks=1,
        pt_updates=4, modes=("trap-code", "pml", "trap-pt", "hlat"),
    )
    rows = {run.mode: row for run, row in Experiment().runs(p, lambda d, t: None)}
    assert rows["trap-code"]["remap_detected"] == rows["pml"]["remap_detected"] == 0
    assert rows["trap-code"]["remap_effective"] == rows["pml"]["remap_effective"] == 1
    assert rows["trap-pt"]["remap_detected"] == 1 and rows["trap-pt"]["remap_effective"] == 0
    assert rows["hlat"]["remap_effective"] == 0 and rows["hlat"]["engine"] == "reference"
    assert rows["hlat"]["engine_cycles"] is None and rows["hlat"]["walk_refs_per_access"] > 0
    assert rows["pml"]["restore_detected"] == 0 and rows["pml"]["restore_logged_unchanged"] == 1
    for mode in ("trap-code", "trap-pt", "hlat"):
        assert rows[mode]["restore_detected"] == rows[mode]["alias_detected"] == 1
    assert rows["trap-pt"]["pt_stores_trapped"] == 4 + 1
    assert all(r["false_positives"] == 0 for r in rows.values())
    run = run_mode(p, "none")
    assert all(e for _, e in (attack_outcome(run, a) for a in run.stream.attacks))
