"""The measured attacker: the cache model it times, the slice hash, its eviction sets, what it
may see, how its guesses score against the secret, and re-randomization's accounting."""

from __future__ import annotations

import inspect
from collections import OrderedDict
from dataclasses import fields

import numpy as np
import pytest

from eptlab.apps import pp_attacker
from eptlab.apps.cache_attacker import Target, Victim
from eptlab.apps.cache_sim import CacheSim
from eptlab.apps.ept_layout import EptLayout
from eptlab.apps.llc_slices import O0, O1, O2, SliceHash
from eptlab.apps.pp_attacker import PrimeProbeAttacker, rank_of
from eptlab.apps.prime_probe import CHUNK, Knowledge, Machine, Oracle
from eptlab.apps.rerandomize import Rerandomizer
from eptlab.arch import PageSize
from eptlab.costs import active_profile
from eptlab.errors import ConfigError
from eptlab.experiments.aslr_measured import MeasuredTally, buffer_chunks, measured_trial
from eptlab.mmu.config import CacheConfig, CacheLevel

TARGET = Target.named("4k", 12)


# -- the cache model -------------------------------------------------------------------------


class LruHierarchy:
    """An independent model: per-level LRU dicts, inclusive fill, no back-invalidation."""

    def __init__(self, config: CacheConfig) -> None:
        self.levels = [(lv.sets, lv.ways) for lv in (config.l1, config.l2, config.llc)]
        self.sets: list[dict[int, OrderedDict[int, None]]] = [{} for _ in self.levels]

    def access(self, hpa: int) -> int:
        line = hpa >> 6
        found = 3
        for i, (sets, _) in enumerate(self.levels):
            row = self.sets[i].setdefault(line % sets, OrderedDict())
            if line in row:
                row.move_to_end(line)
                found = i
                break
        for i in range(found):
            sets, ways = self.levels[i]
            row = self.sets[i][line % sets]
            row[line] = None
            if len(row) > ways:
                row.popitem(last=False)
        return found


def test_the_engines_cache_kernel_is_the_lru_hierarchy_it_documents() -> None:
    config = CacheConfig(CacheLevel(64 * 4 * 2, 2, 1), CacheLevel(64 * 8 * 4, 4, 2),
                         CacheLevel(64 * 32 * 8, 8, 3), 9)
    sim, ref = CacheSim(config), LruHierarchy(config)
    rng = np.random.default_rng(0)
    lines = rng.integers(0, 600, 20_000) * 64  # enough reuse to hit every level
    got = [sim.level(int(h)) for h in lines]
    want = [ref.access(int(h)) for h in lines]
    assert got == want
    assert set(got) == {0, 1, 2, 3}


def test_slice_hash_is_the_published_one() -> None:
    h = SliceHash.named("maurice-8")
    assert h.slices == 8
    assert [m.bit_count() for m in h.masks] == [len(O0), len(O1), len(O2)]
    assert h.masks[0] == 0x1B5F575440  # RAID'15 o0 over bits 6..36
    rng = np.random.default_rng(1)
    hpas = rng.integers(0, 1 << 38, 2000, dtype=np.int64).astype(np.uint64)
    assert list(h.of_array(hpas)) == [h.of(int(a)) for a in hpas]
    assert SliceHash.named("off").of(0x123456789) == 0
    with pytest.raises(ConfigError):
        SliceHash.named("maurice-3")


def test_sliced_llc_relabelling_is_a_bijection_that_sets_the_slice() -> None:
    sim = CacheSim(slices="maurice-8")
    inner = sim.config.llc.sets // 8
    rng = np.random.default_rng(2)
    hpas = {int(x) * 64 for x in rng.integers(0, 1 << 32, 50_000)}
    labels = {sim.label(h) for h in hpas}
    assert len(labels) == len(hpas)
    for h in list(hpas)[:500]:
        assert sim.llc_set(h) == sim.slices.of(h) * inner + (h >> 6) % inner
        assert sim.label(h) % (64 * sim.config.l2.sets) == h % (64 * sim.config.l2.sets)


# -- the attacker ----------------------------------------------------------------------------


def setup(policy: str, slot: int, slice_hash: str = "off", seed: int = 7,
          period: int = 0) -> tuple[Victim, Machine, PrimeProbeAttacker]:
    sim = CacheSim(slices=slice_hash)
    chunks = buffer_chunks(sim, sim.config.llc.ways)
    victim = Victim.boot(EptLayout.named(policy), TARGET, slot, seed=seed,
                         extra_memory=(chunks + 16) * CHUNK)
    rr = None if not period else Rerandomizer(victim.laid, TARGET.window, TARGET.size, period,
                                              seed=seed)
    machine = Machine(victim, sim, chunks, victim_lines=4, seed=seed, rerandomizer=rr)
    c = sim.config
    know = Knowledge(TARGET, victim.laid.layout, victim.laid.offset, victim.access().probes,
                     slice_hash, c.l1.ways, c.llc.sets, c.llc.ways, sim.latency,
                     machine.chunk_gvas)
    return victim, machine, PrimeProbeAttacker(know, Oracle(machine))


def test_the_attacker_holds_nothing_of_the_host_or_the_secret() -> None:
    _, machine, attacker = setup("linear", 5)
    assert {f.name for f in fields(Knowledge)} == {
        "target", "layout", "offset", "probes", "slice_hash", "l1_ways", "llc_sets",
        "llc_ways", "latencies", "chunk_gvas"}
    assert not hasattr(attacker.know.target, "slot")
    assert Oracle.__slots__ == ("_machine",)
    assert "_machine" not in inspect.getsource(pp_attacker)
    attacker.build()
    for name, value in vars(attacker).items():
        assert not isinstance(value, (Machine, Victim, CacheSim)), name
    # it may only read its own buffer
    with pytest.raises(ConfigError):
        attacker.oracle.time([TARGET.gva(5)])


@pytest.mark.parametrize(("policy", "slice_hash"), [("linear", "off"), ("random-2m", "maurice-8")])
def test_its_eviction_sets_really_evict(policy: str, slice_hash: str) -> None:
    victim, machine, attacker = setup(policy, 9, slice_hash)
    attacker.build()
    sim = machine.sim
    assert len(attacker.evsets) == sim.config.llc.sets // 64  # the whole line column
    vm = victim.laid.vm
    hpa = {gva: vm.host_address(gva - 0xFFFF_8880_0000_0000) for s in attacker.evsets
           for gva in s}
    columns = set()
    sample = attacker.evsets[:: max(1, len(attacker.evsets) // 40)]
    for evset in sample:
        sets = {sim.llc_set(hpa[g]) for g in evset}
        assert len(sets) == 1  # congruent in the model's LLC
        (llc_set,) = sets
        columns.add(llc_set)
        # a fresh line of that set is evicted by reading the set
        probe = CacheSim(sim.config, slice_hash)
        other = next(h for h in (hpa[evset[0]] + (k << 21) for k in range(1, 4096))
                     if probe.llc_set(h) == llc_set and h not in hpa.values())
        probe.level(probe.label(other))
        for g in evset:
            probe.level(probe.label(hpa[g]))
        assert probe.level(probe.label(other)) == 3
    assert len(columns) == len(sample)  # no two of its sets are the same cache set


def test_under_random_4k_no_chunk_class_is_found() -> None:
    _, _, attacker = setup("random-4k", 3)
    attacker.build()
    assert attacker.evsets == [] and attacker.classes == []
    assert len(attacker.l1_sets) == 63


def test_guesses_are_scored_against_the_secret_it_never_saw() -> None:
    # the same attack on two secrets: its ranking follows the real secret, not a fixed guess
    ranks = {}
    for slot in (100, 3000):
        _, _, attacker = setup("linear", slot)
        attacker.build()
        l1, llc, _ = attacker.observe(4)
        score = attacker.scores(l1, llc, 4)
        ranks[slot] = {s: rank_of(score, s)[0] for s in (100, 3000)}
    assert ranks[100][100] < ranks[100][3000]
    assert ranks[3000][3000] < ranks[3000][100]
    assert max(ranks[100][100], ranks[3000][3000]) <= 64  # of 4096


def test_contiguous_mapping_leaks_more_to_the_measured_attacker() -> None:
    bits = {}
    for policy in ("linear", "random-4k"):
        tally = MeasuredTally()
        for slot, seed in ((17, 1), (2222, 2)):
            measured_trial(TARGET, policy, "off", slot, seed, checkpoints=(0, 4),
                           victim_lines=4, period_ms=0.0, tally=tally)
        assert tally.row(0)["guessing_bits"] == pytest.approx(np.log2(2048.5), abs=1e-3)
        bits[policy] = tally.row(4)["guessing_bits"]
    assert bits["linear"] < bits["random-4k"] - 1


# -- re-randomization ------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["linear", "random-4k"])
def test_rerandomization_moves_pages_and_counts_what_it_did(policy: str) -> None:
    victim, _, _ = setup(policy, 77, period=1000)
    vm = victim.laid.vm
    rr = Rerandomizer(victim.laid, TARGET.window, TARGET.size, 1000, seed=3)
    before = {g: (leaf.target, leaf.page_size) for g, leaf in vm.ept.leaves(TARGET.window,
                                                                            TARGET.size)}
    assert before and not rr.due(999) and rr.due(1000)
    cycles = rr.migrate()
    after = {g: leaf.target for g, leaf in vm.ept.leaves(TARGET.window, TARGET.size)}
    assert set(after) == set(before)
    assert all(after[g] != before[g][0] for g in before)
    assert vm.read_u64(victim.gpa) == 0x5EC2E7  # the copy kept the secret's contents
    c = rr.counts
    assert (c.migrations, c.pages, c.ept_edits, c.frames_allocated) == (1, len(before),
                                                                         len(before), len(before))
    assert c.bytes_copied == sum(int(size) for _, size in before.values())
    assert c.exits == c.invepts == len(vm.vcpus)
    p = active_profile()
    assert cycles == round(c.exits * p["vmexit_cycles"] + c.invepts * p["invept_cycles"]
                           + c.bytes_copied / p["copy_bytes_per_cycle"]
                           + c.pages * (p["ept_edit_cycles"] + p["frame_alloc_cycles"]
                                        + p["page_migration_cycles"]))
    if policy == "linear":  # the window moved as a whole: one new offset
        assert len({after[g] - g for g in after}) == 1
        assert next(iter(after.values())) - next(iter(after)) != victim.laid.offset
        assert all(size == PageSize.SIZE_2M for _, size in before.values())


def test_the_victim_pays_tlb_misses_after_each_migration() -> None:
    victim, machine, _ = setup("random-4k", 5, period=1)
    rr = machine.rerandomizer
    assert rr is not None
    machine.clock = 10
    machine.victim_round()
    assert rr.counts.migrations == 1
    assert 1 <= machine.tlb_misses_after_migration <= 1 + machine.victim_lines
    assert victim.access().hpas[0] == victim.laid.vm.ept.host_address(victim.gpa)
