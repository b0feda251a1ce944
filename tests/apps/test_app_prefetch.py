"""The prefetch hypercall: it saves EPT violations and translation cycles; the stale-use checker
flags every kind of stale frame use; the correct protocol has none over many interleavings
(hypothesis), and the two broken variants are caught; the experiment runs from the CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from eptlab.apps.cycle_meter import Costs
from eptlab.apps.ept_editor import PREFETCHED, ProtocolName
from eptlab.apps.observed import ObservedEngine, ObservedRun
from eptlab.apps.prefetch import PREFETCH_2M, PREFETCH_HYPERCALL, PrefetchApp
from eptlab.apps.prefetch_scenario import RemapOp, Scenario, play
from eptlab.apps.stale_use import StaleUseChecker
from eptlab.arch import Access
from eptlab.cli import main
from eptlab.hv import VCPU, Hypercall, Hypervisor
from eptlab.mmu.config import CacheConfig, MmuConfig
from eptlab.mmu.engine import Accesses
from eptlab.tables import GuestPageTables

GVA = 0x7F00_0000_0000
MiB = 1 << 20
PAGE = 4096
KINDS = ("migrate", "balloon", "merge")


# --- the checker on its own -------------------------------------------------------------------


def observed_vm(pages: int = 4) -> tuple[Hypervisor, StaleUseChecker, list[VCPU]]:
    """Two vCPUs whose guest maps GVA.. to GPA 2 MiB.., every page backed up front."""
    hv = Hypervisor(mmu=MmuConfig(cache=CacheConfig.disabled()))
    engine = ObservedEngine.install(hv)
    checker = StaleUseChecker(hv)
    engine.observers.append(checker)
    vm = hv.create_vm("vm", 16 * MiB, lazy=False)
    vm.ept.map_range(0, 2 * MiB)
    next_table = iter(range(0x1000, 0x200000, 0x1000))
    tables = GuestPageTables(vm, lambda: next(next_table))
    tables.map_range(GVA, 2 * MiB, pages * PAGE, user=True)
    vm.ept.map_range(2 * MiB, pages * PAGE)
    return hv, checker, [vm.add_vcpu(cr3=tables.root) for _ in range(2)]


def read(hv: Hypervisor, vcpu: VCPU, page: int) -> int:
    result = hv.engine.run(
        Accesses.build([GVA + page * PAGE + 8], Access.READ, 1, vcpu.engine_id), record_hpa=True
    )
    assert result.done and result.hpa is not None
    return int(result.hpa[0])


def test_checker_flags_freed_reassigned_and_aliased_frames() -> None:
    hv, checker, (v0, v1) = observed_vm()
    vm, host = v0.vm, hv.host
    frames = [vm.ept.host_address(2 * MiB + p * PAGE) or 0 for p in range(4)]
    assert all(frames)
    for v in (v0, v1):
        for page in range(4):
            read(hv, v, page)
    assert checker.stale_uses == 0 and checker.checked == 8 and checker.unresolved == 0

    # freed: page 0 moves to a new frame and the old one is freed, with no INVEPT
    new = host.alloc()
    vm.ept.tables.map(2 * MiB, new, replace=True)
    host.release(frames[0])
    assert read(hv, v0, 0) >> 12 == frames[0] >> 12
    assert checker.by_kind == {"freed": 1}

    # reassigned: page 1's frame is given to page 3 (whose own frame is released)
    vm.ept.tables.map(2 * MiB + PAGE, host.alloc(), replace=True)
    vm.ept.tables.map(2 * MiB + 3 * PAGE, frames[1], replace=True)
    host.release(frames[3])
    read(hv, v1, 1)
    assert checker.by_kind == {"freed": 1, "reassigned": 1}

    # aliased: page 2 still maps its frame, but so does page 3 now, with one reference
    vm.ept.tables.map(2 * MiB + 3 * PAGE, frames[2], replace=True)
    vm.invept()
    read(hv, v0, 2)
    assert checker.by_kind == {"freed": 1, "reassigned": 1, "aliased": 1}
    assert [e.kind for e in checker.examples] == ["freed", "reassigned", "aliased"]
    assert checker.examples[0].gpa == 2 * MiB and checker.examples[0].vcpu == v0.name

    # after the INVEPT the remapped pages use their new frames: nothing new is flagged
    read(hv, v1, 0)
    read(hv, v0, 1)
    assert checker.stale_uses == 3


def test_per_access_cycles_add_up_to_the_engine_statistics() -> None:
    hv, _, (v0, _v1) = observed_vm(pages=16)
    engine = hv.engine
    assert isinstance(engine, ObservedEngine)
    engine.per_access_cycles = True
    seen: list[ObservedRun] = []
    engine.observers.append(seen.append)
    gvas = GVA + np.random.default_rng(1).integers(0, 16 * PAGE // 8, 500) * 8
    result = engine.run(Accesses.build(gvas, Access.READ, 1, v0.engine_id))
    assert result.done and seen[-1].cycles is not None
    assert int(seen[-1].cycles.sum()) == v0.stats.cycles > 0
    assert len(set(seen[-1].cycles.tolist())) > 1  # TLB hits and walks differ


# --- the hint ------------------------------------------------------------------------------------


def test_hint_reduces_ept_violations_translation_cycles_and_tail_latency() -> None:
    base = Scenario(vcpus=1, pages=256, accesses=6000, per_access_cycles=True)
    off = play(replace(base, hint=False))
    cold = play(replace(base, warm=False))
    on = play(base)
    assert off.ept_violations == 256 and off.counters["lazy_backings"] == 256
    assert on.ept_violations == 0 and on.counters["prefetch_entries"] == 256
    assert on.translation_cycles < cold.translation_cycles < off.translation_cycles
    assert on.percentile(99) < off.percentile(99) / 5  # no exit lands on an access
    assert on.prefetch_cycles > cold.prefetch_cycles > 0  # warming has a cost, and it is paid
    assert on.counters["warmed"] == 64  # the first 64 pages (and the first of each 2 MiB)
    for outcome in (off, cold, on):
        assert outcome.stale_uses == 0 and outcome.accesses == 6000


def test_prefetch_maps_the_range_with_2m_pages_where_it_can_and_rejects_bad_ranges() -> None:
    hv = Hypervisor()
    vm = hv.create_vm("vm", 16 * MiB)
    app = PrefetchApp(hv, vm)
    vcpu = vm.add_vcpu()
    app.back(4 * MiB + 5 * PAGE)  # a 4 KiB page already in the first 2 MiB region
    vcpu.load(
        [
            Hypercall(PREFETCH_HYPERCALL, (4 * MiB, 4 * MiB, PREFETCH_2M)),
            Hypercall(PREFETCH_HYPERCALL, (4 * MiB + 1, PAGE, 0)),  # unaligned
            Hypercall(PREFETCH_HYPERCALL, (15 * MiB, 2 * MiB, 0)),  # beyond guest memory
        ]
    )
    hv.run()
    assert [r[2] for r in hv.hypercall_results] == [0, -22, -22]
    first = vm.ept.lookup(4 * MiB)
    second = vm.ept.lookup(6 * MiB + 123)
    assert first is not None and first.level == 1  # region with a 4 KiB page: 4 KiB holes
    assert second is not None and second.level == 2  # free region: one 2 MiB page
    for page in range(4 * MiB, 8 * MiB, 64 * PAGE):
        leaf = vm.ept.lookup(page)
        assert leaf is not None and leaf.value & PREFETCHED
    assert app.prefetches[0].pages_backed == 511 + 1
    assert app.prefetches[0].entries_rewritten == 1  # the page backed before: read, rewritten


# --- the protocol: deterministic races ----------------------------------------------------------


def test_remap_inside_a_prefetch_waits_for_the_lock_or_corrupts_the_entry() -> None:
    """vCPU 1 migrates page 3 right after vCPU 0's prefetch scanned it (same scheduler round)."""
    race = Scenario(
        vcpus=2,
        pages=16,
        accesses=300,
        prebacked=(3,),
        remaps=(RemapOp(vcpu=1, after=0, kind="migrate", page=3),),
        data_cache=False,
    )
    correct = play(race)
    assert correct.lock_contended == 1  # the migration waited for the commit
    assert correct.counters["migrations"] == 1 and correct.stale_uses == 0
    broken = play(replace(race, protocol="no_lock"))
    assert broken.lock_contended == 0 and broken.counters["migrations"] == 1
    assert broken.stale_uses > 0  # the commit wrote the old frame back


def test_old_frame_is_released_only_after_the_shootdown() -> None:
    """Both vCPUs cache page 1; vCPU 1 migrates it halfway through; vCPU 0 goes on reading."""
    scene = Scenario(
        hint=False,
        vcpus=2,
        pages=4,
        accesses=300,
        remaps=(RemapOp(vcpu=1, after=150, kind="migrate", page=1),),
        data_cache=False,
    )
    correct = play(scene)
    assert correct.counters["shootdowns"] == 1 and correct.stale_uses == 0
    broken = play(replace(scene, protocol="no_invept"))
    assert broken.counters["shootdowns_skipped"] == 1
    assert broken.stale_by_kind.get("freed", 0) > 0  # the old frame sits in the free pool
    assert {e.gpa for e in broken.examples} == {broken.buffer.gpa + PAGE}  # the migrated page


# --- the protocol over many interleavings (hypothesis) -------------------------------------------


@st.composite
def interleavings(draw: st.DrawFn, protocol: ProtocolName) -> Scenario:
    """Three or four vCPUs over one 32-page buffer that vCPU 0 prefetches; remaps early in the
    other programs (while the prefetch runs), preemption points, lane orders, quanta; guest
    tasks and asynchronous page faults (with or without a swap-in wait) sometimes."""
    vcpus = draw(st.integers(2, 4))
    large = draw(st.integers(0, 3)) == 0  # sometimes one 2 MiB region, prefetched as a 2 MiB page
    pages = 512 if large else 32
    page = st.integers(0, 31) if large else st.integers(0, pages - 1)
    remaps = draw(
        st.lists(
            st.builds(
                RemapOp,
                vcpu=st.integers(0, vcpus - 1),
                after=st.integers(0, 200),
                kind=st.sampled_from(KINDS),
                page=page,
                other=page,
            ),
            min_size=6,
            max_size=24,
        )
    )
    low = draw(st.integers(1, 24))
    async_pf = draw(st.booleans())  # first touches served asynchronously, two guest tasks
    return Scenario(
        tasks=2 if async_pf else draw(st.sampled_from([1, 2])),
        async_pf=async_pf,
        timeslice=draw(st.sampled_from([50, 10_000])),
        costs=Costs(backing_wait_cycles=draw(st.sampled_from([0, 5_000]))),
        protocol=protocol,
        vcpus=vcpus,
        pages=pages,
        accesses=400,
        write_fraction=draw(st.sampled_from([0.0, 0.3, 0.7])),
        prebacked=tuple(sorted(draw(st.sets(page, max_size=4 if large else 24)))),
        merged=tuple(draw(st.lists(st.tuples(page, page), max_size=4))),
        remaps=tuple(remaps),
        page_size="2m" if large else "4k",
        batch=draw(st.sampled_from([2, 4, 8])),
        seed=draw(st.integers(0, 2**16)),
        quantum=(low, draw(st.integers(low, 96))),
        preempt_at=tuple(
            draw(st.lists(st.tuples(st.integers(0, vcpus - 1), st.integers(1, 399)), max_size=6))
        ),
        lane_order=tuple(draw(st.permutations(range(vcpus)))),
        pool_capacity=8,
        data_cache=False,
    )


@settings(max_examples=150, database=None)
@given(interleavings("correct"))
def test_correct_protocol_never_uses_a_freed_or_reassigned_frame(scene: Scenario) -> None:
    outcome = play(scene)
    assert outcome.stale_uses == 0, outcome.examples[:3]
    assert outcome.unresolved == 0
    warmed = outcome.counters.get("warmed", 0)
    assert outcome.checked == scene.vcpus * scene.accesses + warmed  # it saw every access


class Found(Exception):
    pass


@pytest.mark.parametrize("protocol", ["no_lock", "no_invept"])
def test_broken_variants_are_caught(protocol: ProtocolName) -> None:
    caught: list[tuple[Scenario, dict[str, int]]] = []

    @settings(max_examples=60, database=None, phases=[Phase.generate])
    @given(interleavings(protocol))
    def search(scene: Scenario) -> None:
        outcome = play(scene)
        if outcome.stale_uses:
            caught.append((scene, outcome.stale_by_kind))
            raise Found

    with pytest.raises(Found):
        search()
    scene, kinds = caught[0]
    assert set(kinds) <= {"freed", "reassigned", "aliased"} and sum(kinds.values()) > 0
    assert play(replace(scene, protocol="correct")).stale_uses == 0


# --- the experiment, end to end ----------------------------------------------------------------


def test_cli_runs_the_experiment(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def run(*sets: str) -> list[dict[str, Any]]:
        args = ["run", "prefetch-hypercall", "--out", str(tmp_path), "--json"]
        small = ("footprint_mib=1", "accesses=4000", "seeds=1")
        assert main([*args, *(x for s in (*small, *sets) for x in ("--set", s))]) == 0
        rows: list[dict[str, Any]] = json.loads(capsys.readouterr().out)["rows"]
        return rows

    rows = {
        (r["policy"], r["memory"], r["vcpus"]): r
        for r in run("vcpus=1,2", "remaps=4", "policies=none,back,back+warm")
    }
    assert set(rows) == {(p, "lazy", v) for p in ("none", "back", "back+warm") for v in (1, 2)}
    for vcpus in (1, 2):
        off, back, on = (rows[p, "lazy", vcpus] for p in ("none", "back", "back+warm"))
        assert on["ept_violations"] < off["ept_violations"] / 4
        assert back["ept_violations"] < off["ept_violations"] / 4
        assert on["translation_cycles"] < off["translation_cycles"]
        assert on["p99_access_cycles"] < off["p99_access_cycles"]
        assert back["prefetch_cycles"] < on["prefetch_cycles"]  # warming is paid for
        assert off["stale_uses"] == on["stale_uses"] == back["stale_uses"] == 0
    for column in ("p50_access_cycles", "prefetch_cycles", "lock_contended", "checked_accesses"):
        assert column in rows["back+warm", "lazy", 2]
    assert (tmp_path / "prefetch-hypercall.png").stat().st_size > 1000
    broken = run("vcpus=2", "policies=back+warm", "remaps=16", "protocol=no_invept")
    assert broken[0]["protocol"] == "no_invept" and broken[0]["stale_uses"] > 0
