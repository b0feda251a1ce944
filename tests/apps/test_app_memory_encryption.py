"""Memory encryption in the engine: a decryption per DRAM line, page-walk reads included, and
TME-MK key IDs in EPT leaves."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eptlab.apps.memory_encryption import (
    DRAM,
    Comparison,
    Platform,
    build_space,
    dram_lines,
    run_stream,
)
from eptlab.arch import Access, PageSize
from eptlab.arch.mktme import KeyIdLayout
from eptlab.errors import AddressError, ConfigError
from eptlab.hv import Hypervisor
from eptlab.memory import PhysicalMemory
from eptlab.mmu.config import CacheConfig, EncryptionConfig, MmuConfig, TlbConfig
from eptlab.mmu.context import CpuFeatures
from eptlab.mmu.engine import Accesses, Engine
from eptlab.mmu.scenario import NestedSpace
from eptlab.mmu.stats import VcpuStats
from eptlab.traces.model import TraceChunk

BASE = 0x0000_2000_0000_0000
MiB = 1 << 20
HOST = 1 << 40


def stream(offsets: list[int], kinds: list[int]) -> list[TraceChunk]:
    address = np.asarray([BASE + o for o in offsets], np.uint64).view(np.int64)
    kind = np.asarray(kinds, np.int8)
    return [TraceChunk(address, kind, np.full(len(offsets), 8, np.int32))]


def measure(
    mode: str, platform: Platform, chunks: list[TraceChunk], footprint: int, key_id: int = 0
) -> VcpuStats:
    space = build_space(mode, platform, BASE, footprint, host_memory=HOST, key_id=key_id)
    return run_stream(space, platform, chunks)


streams = st.integers(16, 400).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, (16 * MiB >> 3) - 1), min_size=n, max_size=n),
        st.lists(st.sampled_from([0, 0, 0, 1]), min_size=n, max_size=n),  # reads and writes
    )
)


# -- encryption off is the engine as it was -----------------------------------------------------


def test_encryption_is_off_by_default() -> None:
    config = MmuConfig()
    assert not config.encryption.enabled and config.encryption.dram_penalty == 0
    assert config.dram_cycles == config.cache.dram_latency


def test_off_charges_each_level_its_latency_and_dram_nothing_more() -> None:
    """Data cycles are the served counts times the level latencies, DRAM at its plain latency:
    nothing is added to a run without encryption."""
    chunks = stream(list(range(0, 8 * MiB, 4096 + 64)), [0] * (8 * MiB // (4096 + 64) + 1))
    plain = Platform(llc_mib=2)
    stats = measure("nested", plain, chunks, 8 * MiB)
    cache = plain.mmu().cache
    latency = [cache.l1.latency, cache.l2.latency, cache.llc.latency, cache.dram_latency]
    assert stats.data_cycles == sum(n * c for n, c in zip(stats.data_served, latency, strict=True))
    assert stats.data_served[DRAM] > 0
    # the same machine built without naming encryption at all runs identically
    space = build_space("nested", plain, BASE, 8 * MiB, host_memory=HOST)
    engine = Engine(space.memory, MmuConfig(cache=cache), space.features)
    engine.add_vcpu(space.guest, space.vmcs)
    for c in chunks:
        assert engine.run(Accesses.build(c.address, c.kind)).done
    assert engine.stats() == stats


@pytest.mark.parametrize("mode", ["native", "nested"])
@pytest.mark.parametrize("decrypt", [0, 40])
def test_every_walk_reference_pays_when_nothing_is_cached(mode: str, decrypt: int) -> None:
    """No TLBs, no caches: every access walks, every walk reads 4 (native) or 24 (nested 4/4)
    entries from DRAM, and each of them and each data line costs DRAM latency + decrypt."""
    config = MmuConfig(
        tlb=TlbConfig.disabled(),
        cache=CacheConfig.disabled(),
        encryption=EncryptionConfig(decrypt),
    )
    space = build_space(mode, Platform(), BASE, 4 * MiB, host_memory=HOST)
    engine = Engine(space.memory, config, space.features)
    engine.add_vcpu(space.guest, space.vmcs)
    n = 300
    assert engine.run(Accesses.build(BASE + np.arange(n, dtype=np.int64) * 12_345)).done
    s = engine.stats()
    dram = config.cache.dram_latency + decrypt
    assert s.walks == n and s.walk_references == n * (24 if mode == "nested" else 4)
    cost = config.cost
    assert s.translation_cycles == (
        n * (cost.l1_tlb_hit + cost.stlb_hit) + s.walks * cost.walk_start + s.walk_references * dram
    )
    assert s.data_cycles == n * dram


# -- the invariant ------------------------------------------------------------------------------


@settings(max_examples=20)
@given(
    data=streams,
    mode=st.sampled_from(["native", "nested"]),
    llc=st.sampled_from([2, 8, 32]),
    decrypt=st.integers(1, 200),
    integrity=st.integers(0, 60),
)
def test_extra_cycles_are_penalty_times_dram_lines(
    data: tuple[list[int], list[int]], mode: str, llc: int, decrypt: int, integrity: int
) -> None:
    offsets, kinds = data
    chunks = stream([o << 3 for o in offsets], kinds)
    encryption = EncryptionConfig(decrypt, integrity)
    plain = measure(mode, Platform(llc), chunks, 16 * MiB)
    encrypted = measure(
        mode,
        Platform(llc, encryption, keyid_bits=6),
        chunks,
        16 * MiB,
        key_id=3 if mode == "nested" else 0,
    )
    # encryption changes no hit or miss ...
    assert encrypted.walk_refs_served == plain.walk_refs_served
    assert encrypted.data_served == plain.data_served
    walk_dram, data_dram = plain.walk_refs_served[DRAM], plain.data_served[DRAM]
    penalty = decrypt + integrity
    # ... and each line from DRAM, page-walk reads and write-allocate fills included, pays
    assert encrypted.translation_cycles - plain.translation_cycles == penalty * walk_dram
    assert encrypted.data_cycles - plain.data_cycles == penalty * data_dram
    assert encrypted.cycles - plain.cycles == penalty * (walk_dram + data_dram)
    pair = Comparison(plain, encrypted, encryption)
    pair.check()
    assert pair.predicted_extra_cycles == pair.extra_cycles


def test_comparison_check_catches_a_broken_identity() -> None:
    chunks = stream(list(range(0, 4 * MiB, 4096)), [0] * (4 * MiB // 4096))
    plain = measure("nested", Platform(2), chunks, 4 * MiB)
    encrypted = measure("nested", Platform(2, EncryptionConfig(40)), chunks, 4 * MiB)
    Comparison(plain, encrypted, EncryptionConfig(40)).check()
    with pytest.raises(RuntimeError, match="penalty"):  # claims 50 cycles a line, paid 40
        Comparison(plain, encrypted, EncryptionConfig(50)).check()


@settings(max_examples=15)
@given(data=streams)
def test_nested_walks_read_at_least_as_many_dram_lines_as_native(
    data: tuple[list[int], list[int]],
) -> None:
    """Same stream, cold caches large enough to hold everything: the nested walk reads the same
    guest entries (at other host addresses) plus EPT entries, so it misses at least as often."""
    offsets, kinds = data
    chunks = stream([o << 3 for o in offsets], kinds)
    native = measure("native", Platform(32), chunks, 16 * MiB)
    nested = measure("nested", Platform(32), chunks, 16 * MiB)
    assert nested.walks == native.walks  # the same TLB behaviour ...
    assert dram_lines(nested)[0] >= dram_lines(native)[0]  # ... and more lines to decrypt
    assert dram_lines(nested)[0] > 0


def test_warmup_is_run_but_not_counted() -> None:
    chunks = stream([(i * 7919) % (16 * MiB) & ~7 for i in range(3000)], [0, 1] * 1500)
    platform = Platform(2, EncryptionConfig(40))

    def run(warmup: int, upto: int | None = None) -> VcpuStats:
        space = build_space("nested", platform, BASE, 16 * MiB, host_memory=HOST)
        c = chunks[0]
        part = (
            chunks if upto is None else [TraceChunk(c.address[:upto], c.kind[:upto], c.size[:upto])]
        )
        return run_stream(space, platform, part, warmup=warmup)

    whole, first, rest = run(0), run(0, 1000), run(1000)
    assert rest.accesses == 2000
    for name in ("cycles", "translation_cycles", "walks", "walk_refs_served", "data_served"):
        a, b, c = getattr(whole, name), getattr(first, name), getattr(rest, name)
        if isinstance(a, tuple):
            assert tuple(x - y for x, y in zip(a, b, strict=True)) == c, name
        else:
            assert a - b == c, name
    with pytest.raises(ConfigError, match="warmup"):
        run(3000)


# -- TME-MK key IDs -----------------------------------------------------------------------------


@given(
    maxphy=st.integers(36, 52),
    bits=st.integers(0, 15),
    frame=st.integers(0, (1 << 40) - 1),
    key=st.integers(0, (1 << 15) - 1),
)
def test_key_id_layout_round_trips(maxphy: int, bits: int, frame: int, key: int) -> None:
    layout = KeyIdLayout(maxphy, bits)
    address = (frame << 12) % layout.max_memory
    key %= layout.keys
    tagged = layout.compose(address, key)
    assert tagged < 1 << maxphy
    assert layout.key_id(tagged) == key and layout.strip(tagged) == address


def test_ept_leaves_carry_the_vm_key_id_and_walks_still_work() -> None:
    features = CpuFeatures(keyid_bits=6)
    shift = features.maxphyaddr - 6
    keyed = NestedSpace.create(host_memory=HOST, features=features, key_id=5)
    plain = NestedSpace.create(host_memory=HOST, features=features)
    gva = BASE + 0x1234
    for space in (keyed, plain):
        space.map(gva)
    assert keyed.ept is not None and plain.ept is not None
    gpa = keyed.tables.lookup(gva)
    assert gpa is not None
    leaf = keyed.ept.lookup(gpa.target)
    assert leaf is not None and leaf.value >> shift & 63 == 5
    assert (leaf.target & ((1 << shift) - 1)) == plain.ept.host_address(gpa.target)

    t = keyed.walker().translate(gva, Access.READ)
    assert t.exit is None and t.fault is None and t.hpa is not None
    assert t.hpa >> shift == 5  # the data access goes out with the key ID
    engine = Engine(keyed.memory, MmuConfig.uncached(), features)
    engine.add_vcpu(keyed.guest, keyed.vmcs)
    r = engine.run(Accesses.build([gva]), record_hpa=True, log_references=64)
    assert r.done and r.hpa is not None and int(r.hpa[0]) == t.hpa
    # guest page-table pages are the VM's memory (its key); EPT tables the hypervisor's (key 0)
    keys = {(ref.dim.name, ref.address >> shift) for ref in r.references}
    assert keys == {("GUEST", 5), ("EPT", 0)}
    assert [ref.address for ref in r.references] == [ref.address for ref in t.references]


def test_key_id_validation() -> None:
    with pytest.raises(ConfigError, match="keyid_bits"):
        CpuFeatures(keyid_bits=16)
    with pytest.raises(ConfigError, match="keyid_bits"):
        KeyIdLayout(20, 8)  # no frame-number bits left
    six = CpuFeatures(keyid_bits=6)  # 46 - 6 = 40 bits: 1 TiB of host memory at most
    with pytest.raises(ConfigError, match="host_memory"):
        NestedSpace.create(host_memory=1 << 41, features=six)
    with pytest.raises(ConfigError, match="host_memory"):
        Engine(PhysicalMemory(1 << 44), features=six)
    with pytest.raises(ConfigError, match="host_memory"):
        Hypervisor(host_memory=1 << 44, features=six)
    Hypervisor(host_memory=HOST, features=six)  # fits exactly
    with pytest.raises(ConfigError, match="key_id"):
        NestedSpace.create(host_memory=HOST, features=six, key_id=64)
    with pytest.raises(ConfigError, match="key_id"):
        NestedSpace.create(host_memory=HOST, key_id=1)  # no key-ID bits on this machine
    with pytest.raises(ConfigError, match="key_id"):
        NestedSpace.create(host_memory=HOST, features=six, key_id=1, use_ept=False)
    space = NestedSpace.create(host_memory=HOST, features=six, key_id=1)
    assert space.ept is not None
    with pytest.raises(AddressError):  # a frame above the key ID cannot be mapped
        space.ept.map(1 << 30, HOST, PageSize.SIZE_4K)


def test_memory_locates_keyed_addresses_below_the_key_id() -> None:
    layout = KeyIdLayout(46, 6)
    memory = PhysicalMemory(1 << 30, keyids=layout)
    memory.write_u64(layout.compose(0x5000, 7) + 8, 0xABCD)
    assert memory.read_u64(layout.compose(0x5000, 7) + 8) == 0xABCD
    assert memory.read_u64(0x5008) == 0  # another key ID: not modelled as an alias
    with pytest.raises(AddressError):
        memory.read_u64(layout.compose(1 << 30, 7))  # outside the memory below the key


def test_encryption_config_validation() -> None:
    with pytest.raises(ConfigError, match="decrypt_latency"):
        EncryptionConfig(-1)
    with pytest.raises(ConfigError, match="integrity_latency"):
        EncryptionConfig(0, 10)
    assert EncryptionConfig(40, 10).dram_penalty == 50
    assert MmuConfig(encryption=EncryptionConfig(40, 10)).dram_cycles == 250
    with pytest.raises(ConfigError):
        Platform(llc_mib=3)  # not 2^k sets
