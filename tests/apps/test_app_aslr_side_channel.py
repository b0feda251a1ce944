"""EPT layout policies and the AnC-style attacker: placement invariants, what each layout lets
the cache set index reveal, and the inference's invariants."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eptlab.apps.cache_attacker import (
    CHANNELS,
    Attacker,
    NoiseDraws,
    SetIndex,
    Target,
    Victim,
    VictimAccess,
    observe,
)
from eptlab.apps.ept_layout import LAYOUTS, EptLayout, back_range, boot, ept_leaf_sizes
from eptlab.arch import PageSize
from eptlab.errors import ConfigError
from eptlab.guest import DIRECT_MAP_BASE, GuestKernel

MiB = 1 << 20
DEFAULT_SETS = 1 << 15  # CacheConfig's LLC: HPA bits 6-20


def beliefs(victim: Victim, sets: int, channel: str, noise: float, k: int,
            seed: int = 0) -> list[tuple[float, float]]:
    """(entropy, success) after 0..k measurements of the victim's access."""
    access = victim.access()
    index = SetIndex(sets)
    draws = NoiseDraws.draw(np.random.default_rng(seed), k, 64, noise)
    attacker = Attacker(victim.target, victim.laid.layout, victim.laid.offset, index,
                        access.probes, channel=channel, noise=noise)
    return [(b.entropy_bits, b.success(victim.slot))
            for b in attacker.beliefs(observe(access, index, draws), tuple(range(k + 1)))]


def expected_leak(layout: str, target: Target, sets: int, channel: str) -> int:
    """Secret bits a noiseless attacker learns, by the bit-level argument: the set index is HPA
    bits 6..hi; data frame bits >= 12 follow the GPA up to the layout's randomized bit; an
    entry's line offset holds index bits 3..8 of the address it translates."""
    low = target.granule.bit_length() - 1
    secret = set(range(low, low + target.bits))
    hi = 6 + sets.bit_length() - 2
    randomized_from = EptLayout.named(layout).randomized_from
    frame_top = hi if randomized_from is None else min(hi, randomized_from - 1)
    seen = set(range(12, frame_top + 1))
    if channel == "walk+data" and hi >= 11:  # line offsets of the entries read
        guest_levels = (4, 3, 2)  # the direct map uses 2 MiB guest pages
        ept_levels = (4, 3, 2, 1) if layout == "random-4k" else (4, 3, 2)
        for level in set(guest_levels) | set(ept_levels):
            first = 12 + 9 * (level - 1) + 3
            seen |= set(range(first, first + 6))
    return len(secret & seen)


# -- layouts -----------------------------------------------------------------------------------


@settings(max_examples=12)
@given(layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**20),
       pages=st.lists(st.integers(0, (64 * MiB >> 12) - 1), min_size=1, max_size=12))
def test_known_hpa_bits_agree_with_the_real_ept(layout: str, seed: int, pages: list[int]) -> None:
    laid = boot(layout, 64 * MiB, seed=seed)
    GuestKernel(laid.vm, seed=seed)  # the guest's own page tables are placed by the layout too
    for page in pages:
        back_range(laid.vm, page << 12, 4096)
    mapped = list(laid.vm.ept.tables.mapped())
    assert mapped
    gpas = np.array([gpa for gpa, _ in mapped], np.uint64)
    mask, value = laid.layout.known_hpa(gpas, laid.offset)
    for (gpa, leaf), v in zip(mapped, value.tolist(), strict=True):
        assert leaf.page_size == laid.layout.page
        assert leaf.target & mask == v
        if layout == "linear":
            assert laid.offset is not None and leaf.target == gpa + laid.offset


def test_random_4k_has_no_2m_ept_leaves_and_scatters_frames() -> None:
    laid = boot("random-4k", 64 * MiB, seed=3)
    GuestKernel(laid.vm, seed=3)
    back_range(laid.vm, 32 * MiB, 4 * MiB)
    assert ept_leaf_sizes(laid.vm) == {PageSize.SIZE_4K}
    hpas = [laid.vm.ept.host_address(32 * MiB + i * 4096) for i in range(1024)]
    steps = {b - a for a, b in zip(hpas, hpas[1:], strict=False) if a is not None and b is not None}
    assert steps != {4096}  # not contiguous: each page has its own random frame
    assert len({h >> 21 for h in hpas if h is not None}) > 100  # scattered over the host


@pytest.mark.parametrize("layout", ["linear", "random-2m"])
def test_2m_layouts_use_2m_ept_leaves(layout: str) -> None:
    laid = boot(layout, 64 * MiB, seed=5)
    back_range(laid.vm, 0, 8 * MiB)
    assert ept_leaf_sizes(laid.vm) == {PageSize.SIZE_2M}


def test_random_layouts_differ_between_seeds_linear_keeps_its_offset() -> None:
    a, b = boot("random-2m", 64 * MiB, seed=1), boot("random-2m", 64 * MiB, seed=2)
    back_range(a.vm, 0, 8 * MiB)
    back_range(b.vm, 0, 8 * MiB)
    assert [a.vm.ept.host_address(g) for g in range(0, 8 * MiB, 2 * MiB)] != [
        b.vm.ept.host_address(g) for g in range(0, 8 * MiB, 2 * MiB)]
    linear = boot("linear", 64 * MiB, seed=1)
    assert linear.offset is not None and linear.offset % (2 * MiB) == 0


# -- the victim's access is the real walk ------------------------------------------------------


@pytest.mark.parametrize(("layout", "references"), [("linear", 15), ("random-4k", 19)])
def test_victim_access_is_the_reference_walk(layout: str, references: int) -> None:
    victim = Victim.boot(EptLayout.named(layout), Target.named("4k", 8), 77, seed=4)
    access = victim.access()
    # 3 guest levels (2 MiB direct map) x (EPT levels + 1) + EPT levels: 3x4+3 or 3x5+4
    assert len(access.hpas) == 1 + references
    assert access.probes[0].dim == "data"
    assert access.hpas[0] == victim.laid.vm.ept.host_address(victim.gpa)
    assert victim.gpa == victim.target.window + 77 * 4096
    assert victim.laid.vm.read_u64(victim.gpa) == 0x5EC2E7


# -- what the attacker learns (noise 0) --------------------------------------------------------


@settings(max_examples=25)
@given(layout=st.sampled_from(LAYOUTS), granule=st.sampled_from(["4k", "2m"]),
       bits=st.integers(3, 12), sets_log=st.integers(6, 19), channel=st.sampled_from(CHANNELS),
       slot_seed=st.integers(0, 2**31), seed=st.integers(0, 2**31))
def test_noiseless_attacker_learns_exactly_the_leaked_bits(
    layout: str, granule: str, bits: int, sets_log: int, channel: str, slot_seed: int,
    seed: int,
) -> None:
    target = Target.named(granule, bits)
    slot = slot_seed % (1 << bits)
    victim = Victim.boot(EptLayout.named(layout), target, slot, seed=seed)
    sets = 1 << sets_log
    curve = beliefs(victim, sets, channel, 0.0, 3)
    entropies = [e for e, _ in curve]
    assert entropies[0] == bits
    assert all(b <= a for a, b in zip(entropies, entropies[1:], strict=False))  # never grows
    leaked = expected_leak(layout, target, sets, channel)
    assert entropies[-1] == pytest.approx(bits - leaked)
    assert curve[-1][1] == pytest.approx(2.0 ** -(bits - leaked))  # the truth is never ruled out


def test_linear_without_noise_recovers_the_secret() -> None:
    for bits, sets in ((9, DEFAULT_SETS), (12, DEFAULT_SETS * 8)):  # index reaches every bit
        target = Target.named("4k", bits)
        victim = Victim.boot(EptLayout.named("linear"), target, (1 << bits) - 3, seed=9)
        entropy, success = beliefs(victim, sets, "data", 0.0, 1)[-1]
        assert entropy == 0.0 and success == 1.0


def test_random_4k_hides_the_frame_bits_but_not_the_ept_entry_line() -> None:
    target = Target.named("4k", 12)  # GPA bits 12-23
    victim = Victim.boot(EptLayout.named("random-4k"), target, 1234, seed=2)
    assert beliefs(victim, DEFAULT_SETS * 8, "data", 0.0, 2)[-1][0] == 12.0
    # the EPT leaf (PTE) is read at line GPA[20:15] of its table page, wherever the table is
    assert beliefs(victim, DEFAULT_SETS * 8, "walk+data", 0.0, 2)[-1][0] == 12.0 - 6


@pytest.mark.parametrize(("sets", "left"), [(1 << 12, 6), (DEFAULT_SETS, 3), (DEFAULT_SETS * 8, 3)])
def test_random_2m_leaks_exactly_the_index_bits_below_21(sets: int, left: int) -> None:
    target = Target.named("4k", 12)  # GPA bits 12-23; the index reaches bit 17, 20, 23
    victim = Victim.boot(EptLayout.named("random-2m"), target, 3000, seed=8)
    assert beliefs(victim, sets, "data", 0.0, 1)[-1][0] == left


def test_2m_aligned_target_hides_from_the_data_line_unless_the_index_reaches_bit_21() -> None:
    target = Target.named("2m", 9)  # GPA bits 21-29
    for layout in LAYOUTS:
        victim = Victim.boot(EptLayout.named(layout), target, 300, seed=1)
        assert beliefs(victim, DEFAULT_SETS, "data", 0.0, 1)[-1][0] == 9.0
        wide = beliefs(victim, DEFAULT_SETS * 8, "data", 0.0, 1)[-1][0]
        assert wide == (6.0 if layout == "linear" else 9.0)  # linear: bits 21-23 leak


# -- noise ---------------------------------------------------------------------------------


def test_noise_slows_the_attack_and_full_noise_teaches_nothing() -> None:
    target = Target.named("4k", 9)
    victims = [Victim.boot(EptLayout.named("linear"), target, s * 37 % 512, seed=s)
               for s in range(12)]
    noisy = [beliefs(v, DEFAULT_SETS, "data", 0.7, 24, seed=i) for i, v in enumerate(victims)]
    mean = [float(np.mean([c[k][0] for c in noisy])) for k in range(25)]
    success = [float(np.mean([c[k][1] for c in noisy])) for k in range(25)]
    assert mean[1] > 0.5  # one noisy measurement does not settle it...
    assert mean[24] < mean[1] and mean[24] < 1.0  # ...many do
    assert success[24] > 0.8
    blind = beliefs(victims[0], DEFAULT_SETS, "walk+data", 1.0, 8)
    assert all(e == pytest.approx(9.0) for e, _ in blind)


def test_observe_uses_the_real_set_index_of_each_reference() -> None:
    victim = Victim.boot(EptLayout.named("random-4k"), Target.named("4k", 6), 5, seed=6)
    access = victim.access()
    index = SetIndex(DEFAULT_SETS)
    seen = observe(access, index, NoiseDraws.draw(np.random.default_rng(0), 3, 64, 0.0))
    assert seen.shape == (3, len(access.hpas))
    assert seen[0].tolist() == [(h >> 6) & (DEFAULT_SETS - 1) for h in access.hpas]
    assert (seen == seen[0]).all()


# -- bad input -------------------------------------------------------------------------------


def test_bad_input_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        EptLayout.named("random-1g")
    with pytest.raises(ConfigError):
        SetIndex(3000)
    with pytest.raises(ConfigError):
        Target.named("1g", 8)
    with pytest.raises(ConfigError):
        Target.named("4k", 40)
    with pytest.raises(ConfigError):
        Victim.boot(EptLayout.named("linear"), Target.named("4k", 4), 16, seed=0)
    with pytest.raises(ConfigError):
        boot("linear", 3 * MiB)
    with pytest.raises(ConfigError):
        EptLayout.named("linear").known_hpa(np.zeros(1, np.uint64), None)
    victim = Victim.boot(EptLayout.named("linear"), Target.named("4k", 4), 1, seed=0)
    access: VictimAccess = victim.access()
    with pytest.raises(ConfigError):
        Attacker(victim.target, victim.laid.layout, victim.laid.offset, SetIndex(64),
                 access.probes, channel="tlb", noise=0.1)
    with pytest.raises(ConfigError):
        NoiseDraws.draw(np.random.default_rng(0), 2, 64, 1.5)
    assert DIRECT_MAP_BASE + victim.gpa == victim.target.gva(1)
