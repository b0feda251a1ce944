"""The fast engine against the reference walker (the oracle), on random machines.

Caching off: for every access, the same references in the same order (dimension, level, HPA,
value), the same translation, the same fault or exit record, and memory (A/D flags, PML log)
identical afterwards. Caching on: the same translations and faults; only costs differ.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from eptlab.arch import Access, Mode
from eptlab.mmu.config import MmuConfig
from eptlab.mmu.engine import Accesses, Engine
from eptlab.mmu.walker import Reference

from .engine_scenarios import ScenarioSpec, access_streams, scenario_specs, snapshot


def outcome(result_exit: object, result_fault: object) -> object:
    return result_exit if result_exit is not None else result_fault


def compare(
    spec: ScenarioSpec, stream: list[tuple[int, Access, bool]], config: MmuConfig, exact: bool
) -> None:
    oracle_space, engine_space = spec.build(), spec.build()
    assert snapshot(oracle_space.memory) == snapshot(engine_space.memory)
    walker = oracle_space.walker()
    engine = Engine(engine_space.memory, config, engine_space.features)
    engine.add_vcpu(engine_space.guest, engine_space.vmcs)
    chunk = Accesses.build(
        [g for g, _, _ in stream], [int(a) for _, a, _ in stream], [int(u) for _, _, u in stream]
    )
    expected = [walker.translate(g, a, Mode.USER if u else Mode.SUPERVISOR) for g, a, u in stream]

    got_hpa: dict[int, int] = {}
    got_outcome: dict[int, object] = {}
    got_refs: dict[int, list[Reference]] = {}
    start = 0
    while start < len(chunk):
        result = engine.run(chunk, start, record_hpa=True, log_references=4096 if exact else 0)
        assert result.hpa is not None
        for i in range(start, result.stopped_at):
            got_hpa[i] = int(result.hpa[i])
        for i, ref in zip(result.reference_access, result.references, strict=True):
            got_refs.setdefault(i, []).append(ref)
        if result.done:
            break
        got_outcome[result.stopped_at] = outcome(result.exit, result.fault)
        start = result.stopped_at + 1  # skip the faulting access, as a handler that gives up

    for i, t in enumerate(expected):
        where = f"access {i} ({stream[i][1].name} {stream[i][0]:#x} user={stream[i][2]})"
        if t.ok:
            assert got_hpa.get(i) == t.hpa, where
            assert i not in got_outcome, where
        else:
            assert got_outcome.get(i) == outcome(t.exit, t.fault), where
        if exact:
            mine = [(r.dim, r.level, r.address, r.value, r.for_level) for r in got_refs.get(i, [])]
            theirs = [(r.dim, r.level, r.address, r.value, r.for_level) for r in t.references]
            assert mine == theirs, where
    assert oracle_space.vmcs is not None or engine_space.vmcs is None
    if oracle_space.vmcs is not None and engine_space.vmcs is not None:
        assert oracle_space.vmcs.pml_index == engine_space.vmcs.pml_index
    assert snapshot(oracle_space.memory) == snapshot(engine_space.memory)


@settings(max_examples=150)
@given(st.data(), scenario_specs())
def test_uncached_engine_is_the_walker(data: st.DataObject, spec: ScenarioSpec) -> None:
    compare(spec, data.draw(access_streams(spec)), MmuConfig.uncached(), exact=True)


@settings(max_examples=150)
@given(st.data(), scenario_specs())
def test_cached_engine_translates_like_the_walker(data: st.DataObject, spec: ScenarioSpec) -> None:
    compare(spec, data.draw(access_streams(spec)), MmuConfig(), exact=False)


@settings(max_examples=40)
@given(st.data(), scenario_specs())
def test_tiny_caches_thrash_but_stay_correct(data: st.DataObject, spec: ScenarioSpec) -> None:
    from eptlab.mmu.config import Assoc, TlbConfig

    tiny = TlbConfig(**{name: Assoc(1, 1) for name in TlbConfig.__dataclass_fields__})
    compare(spec, data.draw(access_streams(spec, 60)), MmuConfig(tlb=tiny), exact=False)
