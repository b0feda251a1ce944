"""What TSX aborts cost (throughput of elided sections against the lock, the fallback after N
aborts) and the DrK probe of the hypervisor's EPT state, on small runs."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from eptlab.apps.tsx_costs import TsxCosts, price
from eptlab.apps.tsx_drk import DrkSetup, observe, probe
from eptlab.apps.tsx_scenarios import Scenario, play
from eptlab.costs import CostProfile, CostValue, Source, use_profile


def test_elided_throughput_falls_as_ept_violations_per_section_rise() -> None:
    # the same sections under write-protect dirty logging; rounds more often re-protect the
    # pages more often, so more of the sections' writes take an EPT violation
    base = Scenario("wp-dirty", vcpus=2, sections=60, region_pages=64, seed=3)
    runs = []
    for every in (10_000, 20, 4):
        o = play(replace(base, round_every=every))
        cycles = price(o.stats, 2, elided=True)
        runs.append((o.stats.ept_violations / o.stats.sections, cycles.sections_per_us))
    rates = [r for r, _ in runs]
    throughput = [t for _, t in runs]
    assert rates == sorted(rates) and rates[0] < rates[-1]
    assert throughput == sorted(throughput, reverse=True) and throughput[0] > throughput[-1]


def test_prices_come_from_the_profile() -> None:
    o = play(Scenario("lazy", vcpus=1, sections=30, region_pages=64, seed=1))
    before = price(o.stats, 1, elided=True)
    assert o.stats.aborts > 0
    value = CostValue(1000, "cycles", Source("assumed", "test"))
    profile = CostProfile.default().with_values({"rtm_abort_cycles": value})
    with use_profile(profile):
        after = price(o.stats, 1, elided=True)
    assert after.wasted - before.wasted == o.stats.aborts * (1000 - TsxCosts.from_profile().abort)


@pytest.mark.parametrize("retries", [0, 2, 5])
def test_fallback_to_the_lock_after_n_aborts_is_honoured(retries: int) -> None:
    # a suppressed guest #PF aborts every attempt until the fallback maps the page: a section
    # either commits at once or aborts exactly 1 + retries times and then takes the lock
    s = Scenario("guest-pf", vcpus=1, sections=40, region_pages=64, max_retries=retries, seed=2)
    st = play(s).stats
    assert st.fallbacks > 0
    assert st.commits + st.fallbacks == st.sections == 40
    assert st.aborts == st.fallbacks * (1 + retries)
    assert st.attempts == st.commits + st.aborts


def test_plain_locking_never_aborts_and_takes_every_section_under_the_lock() -> None:
    st = play(Scenario("lazy", vcpus=2, sections=30, region_pages=64, elide=False)).stats
    assert st.attempts == st.aborts == 0
    assert st.fallbacks == st.sections == 60
    cycles = price(st, 2, elided=False)
    assert cycles.makespan == cycles.total and cycles.wasted == 0


def test_drk_observer_tells_backed_from_unbacked_pages_without_the_truth() -> None:
    r = probe(DrkSetup("backing", pages=64, share=0.5, seed=4))
    assert 0 < r.truth.sum() < 64
    guess, threshold = observe(r.first, r.second)  # from the times alone
    assert np.array_equal(guess, r.guess) and threshold == r.threshold
    score = r.score()
    assert score["recall"] == 1.0 and score["accuracy"] >= 0.9
    assert r.changed == r.truth.sum()  # each unbacked page was backed by its first probe
    assert r.second.max() < r.first[r.truth].min()  # the second probe never exits


def test_drk_sees_write_protection_but_not_pml() -> None:
    wp = probe(DrkSetup("dirty-wp", pages=64, seed=5))
    pml = probe(DrkSetup("dirty-pml", pages=64, seed=5))
    assert np.array_equal(wp.truth, pml.truth)  # the same pages written since the round
    assert wp.score()["recall"] == 1.0 and wp.changed == wp.logged_dirty == wp.truth.sum()
    assert pml.changed == 0  # nothing exits: the times carry walk noise, not the dirty state
    base = float(pml.truth.mean())
    assert pml.score()["accuracy"] <= max(base, 1 - base) + 0.05  # no better than a constant
    # the discarded transactional stores were logged all the same (not rolled back)
    assert pml.logged_dirty == pml.truth.sum()
