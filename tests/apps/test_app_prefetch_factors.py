"""The prefetch hint's two factors and the async-PF alternative: back only leaves the caller's
nested TLB cold; warm only backs nothing; asynchronous page faults let the other task's accesses
run while the faulting one waits, and keep the stale-use checker at zero under remaps; the shared
scenario helpers; the engine's read-only views."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import pytest

from eptlab.apps.async_pf import GuestTasks
from eptlab.apps.cycle_meter import Costs, CycleMeter
from eptlab.apps.ept_editor import PREFETCHED
from eptlab.apps.observed import ObservedRun
from eptlab.apps.prefetch import (
    PREFETCH_HYPERCALL,
    PREFETCH_NO_BACK,
    PREFETCH_NO_WARM,
    PrefetchApp,
)
from eptlab.apps.prefetch_scenario import RemapOp, Scenario, play
from eptlab.apps.scenario import boot_guest, from_params, populate
from eptlab.arch import Access
from eptlab.errors import ConfigError
from eptlab.hv import Hypercall, Hypervisor, Run
from eptlab.mmu.engine import Accesses
from eptlab.mmu.kernels import layout as L
from eptlab.traces.model import TraceChunk

MiB, PAGE = 1 << 20, 4096


def hinted(flags: int, prebacked: tuple[int, ...] = ()) -> tuple[PrefetchApp, dict[str, int]]:
    """A guest hints a 64-page buffer with ``flags``, then reads page 5 once: the app and what
    that one read cost in walk references and GPA-side cache hits."""
    hv = Hypervisor()
    vm = hv.create_vm("guest", 32 * MiB)
    app = PrefetchApp(hv, vm)
    guest = boot_guest(vm, vcpus=1)
    buffer = populate(guest.kernel, guest.process, 64 * PAGE)
    for page in prebacked:
        app.back(buffer.gpa + page * PAGE)
    vcpu = guest.vcpus[0]
    vcpu.load([Hypercall(PREFETCH_HYPERCALL, (buffer.gpa, 64 * PAGE, flags))])
    hv.run([vcpu])
    assert hv.hypercall_results[-1][2] == 0
    before = vcpu.stats
    result = hv.engine.run(Accesses.build([buffer.gva + 5 * PAGE], Access.READ, 1, vcpu.engine_id))
    after = vcpu.stats
    return app, {
        "done": int(result.done),
        "nested_tlb_hits": after.nested_tlb_hits - before.nested_tlb_hits,
        "ept_psc_hits": after.ept_psc_hits - before.ept_psc_hits,
        "ept_refs": sum(after.ept_refs) - sum(before.ept_refs),
    }


def test_back_only_maps_every_page_and_leaves_the_nested_tlb_cold() -> None:
    back, cold = hinted(PREFETCH_NO_WARM)
    both, warm = hinted(0)
    assert back.prefetches[0].pages_backed == both.prefetches[0].pages_backed == 64
    assert back.counters["warmed"] == 0 and both.counters["warmed"] == 64
    assert cold["done"] and warm["done"]  # no EPT violation either way: the page is backed
    assert cold["nested_tlb_hits"] == 0  # nobody translated the page's GPA on this vCPU
    assert warm["nested_tlb_hits"] >= 1  # the warming read left GPA -> HPA of page 5
    assert warm["ept_refs"] < cold["ept_refs"]  # and fewer EPT reads on the walk


def test_warm_only_backs_nothing_and_warms_what_is_mapped() -> None:
    app, _ = hinted(PREFETCH_NO_BACK, prebacked=(3, 5))
    prefetch = app.prefetches[0]
    assert prefetch.pages_backed == 0 and app.counters["warmed"] == 2
    assert prefetch.entries_rewritten == 2
    gpa = app.vm.ept
    base = prefetch.gpa
    assert gpa.lookup(base) is None and gpa.lookup(base + 63 * PAGE) is None  # holes stay
    for page in (3, 5):
        leaf = gpa.lookup(base + page * PAGE)
        assert leaf is not None and leaf.value & PREFETCHED


def test_warm_only_on_backed_memory_is_the_warming_factor_alone() -> None:
    """On memory backed before the run, warm only takes no EPT violation and has the full
    hint's guest-side figures (the same caches warmed), without backing a page."""
    base = Scenario(vcpus=1, pages=128, accesses=3000, per_access_cycles=True, shared=False)
    warm = play(replace(base, memory="backed", back=False))
    both = play(base)
    assert warm.ept_violations == 0 and warm.counters.get("lazy_backings", 0) == 0
    # the full hint backed the 128 pages; both runs back the same guest-kernel page besides
    assert warm.counters["pages_backed"] == both.counters["pages_backed"] - 128
    assert warm.nested_tlb_hits == both.nested_tlb_hits > 0
    assert warm.translation_cycles == both.translation_cycles
    assert warm.prefetch_cycles < both.prefetch_cycles  # no page to allocate and zero


# --- asynchronous page faults ------------------------------------------------------------------


@dataclass
class Trace:
    """Every run in order: ("ok", gva) per performed access, ("exit", gva) per exit."""

    events: list[tuple[str, int]]

    def __call__(self, run: ObservedRun) -> None:
        if run.label != "guest":
            return
        self.events += [("ok", int(g)) for g in run.gva.tolist()]
        if run.exit is not None:
            self.events.append(("exit", int(run.accesses.gva[run.stop])))


def overlapped(trace: Trace, lo: int, hi: int) -> int:
    """How many accesses outside ``[lo, hi)`` ran between an exit inside it and that access's
    completion (summed over exits)."""
    count = 0
    for i, (kind, gva) in enumerate(trace.events):
        if kind != "exit" or not lo <= gva < hi:
            continue
        for later_kind, later in trace.events[i + 1 :]:
            if later_kind == "ok" and later == gva:
                break
            count += later_kind == "ok" and not lo <= later < hi
    return count


SWAPPED = Scenario(
    hint=False,
    vcpus=1,
    pages=32,
    shared=False,
    accesses=600,
    tasks=2,
    per_access_cycles=True,
    data_cache=False,
    costs=Costs(backing_wait_cycles=60_000),
)


def test_async_pf_runs_the_other_task_while_the_faulting_one_waits() -> None:
    sync_trace, async_trace = Trace([]), Trace([])
    sync = play(SWAPPED, [sync_trace])
    apf = play(replace(SWAPPED, async_pf=True), [async_trace])
    task0 = (apf.buffer.gva, apf.buffer.gva + 16 * PAGE)  # task 0's half of the buffer
    assert overlapped(sync_trace, *task0) == 0  # a synchronous fault holds the whole vCPU
    assert overlapped(async_trace, *task0) > 0  # task 1 ran inside task 0's wait
    assert apf.counters["overlapped_accesses"] > 0 and apf.counters["async_faults"] > 0
    assert apf.counters["async_faults"] == apf.counters["pages_ready"]
    assert apf.ept_violations == sync.ept_violations == 32  # one first touch per page
    assert apf.accesses == sync.accesses == 600 and apf.stale_uses == sync.stale_uses == 0
    # vCPU time: every access's cycles, idle included, add up to the meter's clock
    assert int(apf.access_cycles.sum()) + apf.pending_cycles >= apf.idle_cycles > 0


def test_async_pf_with_nothing_else_to_run_only_adds_overhead() -> None:
    """One task: the vCPU idles through every backing and pays the events on top."""
    one = replace(SWAPPED, tasks=1)
    sync, apf = play(one), play(replace(one, async_pf=True))
    assert apf.counters.get("overlapped_accesses", 0) == 0
    assert apf.idle_cycles >= 32 * 60_000
    assert int(apf.access_cycles.sum()) > int(sync.access_cycles.sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_async_pf_under_remaps_on_several_vcpus_has_no_stale_use(seed: int) -> None:
    rng = np.random.default_rng(seed)
    kinds: tuple[Literal["migrate", "balloon", "merge"], ...] = ("migrate", "balloon", "merge")
    remaps = tuple(
        RemapOp(int(rng.integers(3)), int(rng.integers(300)), kinds[int(rng.integers(3))],
                int(rng.integers(48)), int(rng.integers(48)))  # fmt: skip
        for _ in range(16)
    )
    scene = Scenario(
        hint=False, vcpus=3, pages=48, shared=False, accesses=300, tasks=2, async_pf=True,
        remaps=remaps, seed=seed, quantum=(8, 32), pool_capacity=8, data_cache=False,
        costs=Costs(backing_wait_cycles=5_000), per_access_cycles=True,
    )  # fmt: skip
    outcome = play(scene)
    assert outcome.stale_uses == 0, outcome.examples[:3]
    assert outcome.unresolved == 0 and outcome.checked == 3 * 300
    assert outcome.counters["async_faults"] > 0
    broken = play(replace(scene, protocol="no_invept", remaps=remaps * 2))
    assert broken.counters.get("shootdowns_skipped", 0) > 0


def test_guest_tasks_switch_at_the_timeslice_and_place_events() -> None:
    hv = Hypervisor()
    vm = hv.create_vm("guest", 16 * MiB, lazy=False)
    vcpu = vm.add_vcpu()
    chunk = TraceChunk(np.arange(10, dtype=np.int64), np.zeros(10, np.int8), np.ones(10, np.int32))
    seen: list[str] = []
    tasks = GuestTasks(
        vcpu, [chunk, chunk], meter=CycleMeter(), timeslice=4,
        events=[(6, Hypercall(1, ()))],
    )  # fmt: skip
    for segment in tasks.segments():
        if isinstance(segment, Hypercall):
            seen.append(f"event@{tasks.issued}")
        elif isinstance(segment, Run):
            seen.append(f"t{tasks.current}:{len(segment.chunk)}")
    assert seen == ["t0:4", "t1:2", "event@6", "t1:2", "t0:4", "t1:4", "t0:2", "t1:2"]
    assert tasks.switches == 5


# --- shared helpers and the engine's views ------------------------------------------------------


def test_from_params_copies_same_named_fields_and_refuses_unknown_overrides() -> None:
    @dataclass(frozen=True)
    class Params:
        workload: str = "zipf"
        batch: int = 3
        vcpus: tuple[int, ...] = (1, 2)  # a tuple here, an int in the scenario: overridden

    scene = from_params(Scenario, Params(), vcpus=2)
    assert (scene.workload, scene.batch, scene.vcpus, scene.pages) == ("zipf", 3, 2, 32)
    with pytest.raises(ConfigError, match="no field"):
        from_params(Scenario, Params(), colour="red")


def test_engine_views_are_live_and_read_only() -> None:
    hv = Hypervisor()
    guest = boot_guest(hv.create_vm("guest", 32 * MiB))
    buffer = populate(guest.kernel, guest.process, PAGE)
    vcpu = guest.vcpus[0]
    rows = hv.engine.stats_rows
    with pytest.raises(ValueError):
        rows[0, 0] = 1
    with pytest.raises(ValueError):
        hv.engine.cost_vector[L.COST_WALK_START] = 0
    assert hv.engine.cost_vector[L.COST_CACHE] == hv.engine.config.cache.l1.latency
    vcpu.access(buffer.gva, Access.READ, user=True)
    assert rows[vcpu.engine_id, L.ST_ACCESSES] == vcpu.stats.accesses >= 1  # live
