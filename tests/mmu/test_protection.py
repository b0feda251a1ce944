"""Confidential VMs' references (mmu.protection and the engine's protection pass): RMP checks per
host-physical access of a walk, TDX's secure EPT against shared memory, the presets' classes, and
agreement with the reference walker and with the flat encryption model."""

from __future__ import annotations

import numpy as np
import pytest

from eptlab.arch import Access, Mode
from eptlab.errors import ConfigError
from eptlab.mmu.config import (
    CacheConfig,
    EncryptionConfig,
    MmuConfig,
    Protection,
    RmpConfig,
    TlbConfig,
)
from eptlab.mmu.context import CpuFeatures
from eptlab.mmu.engine import Accesses, Engine, InveptType
from eptlab.mmu.protection import CLASSES, classify_walk
from eptlab.mmu.scenario import NestedSpace

BASE = 1 << 39
DECRYPT, MAC, RMP = 40, 20, 50
FEATURES = CpuFeatures(keyid_bits=6)


def space(shared_pages: int = 0, *, nested: bool = True) -> NestedSpace:
    """4 MiB of private memory at BASE (key ID 1), then ``shared_pages`` 4 KiB pages whose EPT
    leaves carry key ID 0 (shared memory), on an aged layout."""
    s = NestedSpace.create(
        use_ept=nested, host_memory=1 << 36, guest_memory=1 << 36, features=FEATURES,
        key_id=1 if nested else 0, seed=3,
    )
    s.map_range(BASE, 4 << 20)
    if shared_pages:
        assert s.ept is not None
        s.ept.key_id = 0
        for k in range(shared_pages):
            s.map(BASE + (4 << 20) + k * 4096)
        s.ept.key_id = 1
    return s


def engine(
    s: NestedSpace, protection: Protection | None, *, cached: bool = True, mac: bool = False
) -> Engine:
    enc = EncryptionConfig(DECRYPT, MAC if mac else 0, protection) if protection else None
    config = MmuConfig(
        tlb=TlbConfig() if cached else TlbConfig.disabled(),
        cache=CacheConfig() if cached else CacheConfig.disabled(),
        encryption=enc or EncryptionConfig(),
    )
    e = Engine(s.memory, config, s.features)
    e.add_vcpu(s.guest, s.vmcs)
    return e


def stream(n: int, seed: int = 0, pages: int = 1024) -> Accesses:
    rng = np.random.default_rng(seed)
    offsets = rng.integers(0, pages, n) * 4096 + rng.integers(0, 64, n) * 64
    return Accesses.build(BASE + offsets, rng.integers(0, 2, n))


def snp(rmp: RmpConfig) -> Protection:
    return Protection.preset("sev-snp", rmp)


def test_an_rmp_miss_adds_exactly_one_lookup_per_host_physical_access_of_the_walk() -> None:
    s = space()
    plain, checked = engine(s, None), engine(space(), snp(RmpConfig.uncached(RMP)))
    accesses = stream(5000)
    assert plain.run(accesses).done and checked.run(accesses).done
    a, b, p = plain.stats(), checked.stats(), checked.protection_stats()
    assert (a.walks, a.walk_references, a.walk_refs_served) == (
        b.walks, b.walk_references, b.walk_refs_served
    )
    assert a.walks > 1000 and a.walk_references > a.walks
    # one check per entry the 2D walk read and one for the data page it ends on; all miss
    assert p.rmp_checks == a.walk_references + a.walks == p.rmp_lookups
    walk_decrypted = a.walk_refs_served[3] - p.line_count("ept")  # sev-snp: NPT in the clear
    assert b.translation_cycles - a.translation_cycles == RMP * p.rmp_lookups + (
        DECRYPT * walk_decrypted
    )
    assert b.data_cycles - a.data_cycles == DECRYPT * a.data_served[3]


def test_an_rmp_hit_adds_no_lookup() -> None:
    s = space()
    e = engine(s, snp(RmpConfig(64, 16, RMP)))  # 1024 entries: every page of the stream fits
    accesses = stream(3000, pages=64)
    assert e.run(accesses).done
    first = e.protection_stats()
    assert 0 < first.rmp_lookups < first.rmp_checks
    e.reset_stats()
    e.invept(InveptType.ALL_CONTEXT)  # the TLBs forget: the same walks again
    assert e.run(accesses).done
    again = e.protection_stats()
    assert again.rmp_checks >= e.stats().walks > 0
    assert again.rmp_lookups == again.rmp_cycles == 0


def test_native_walks_are_not_rmp_checked() -> None:
    s = space(nested=False)
    e = engine(s, snp(RmpConfig.uncached(RMP)))
    assert e.run(stream(2000)).done
    assert e.stats().walks > 0 and e.protection_stats().rmp_checks == 0


def test_tdx_secure_ept_reads_pay_decryption_and_mac_shared_memory_does_not() -> None:
    s = space(shared_pages=1)
    tdx = Protection.preset("tdx")
    e = engine(s, tdx, cached=False, mac=True)
    private, shared = BASE + 0x12340, BASE + (4 << 20) + 128
    walker = space(shared_pages=1).walker()
    for gva in (private, shared):
        e.reset_stats()
        assert e.run(Accesses.build([gva])).done
        p = e.protection_stats()
        t = walker.translate(gva, Access.READ, Mode.SUPERVISOR)
        assert t.hpa is not None
        want = classify_walk(list(t.references), t.hpa, FEATURES, nested=True, rmp=False)
        paid = sum(1 for c in want.walk if c != "shared")
        assert p.translation_cycles == (DECRYPT + MAC) * paid
        if gva == private:
            assert want.data == "data" and "shared" not in want.walk
            assert p.data_cycles == DECRYPT + MAC and p.line_count("ept") == 20
        else:
            assert want.data == "shared" and want.walk.count("shared") == 4  # the shared EPT
            assert p.data_cycles == 0 and p.line_count("shared") == 5
            assert p.line_count("ept") == 16  # guest page tables are private: secure EPT


def test_presets_differ_exactly_in_the_classes_they_encrypt() -> None:
    s = space(shared_pages=8)
    accesses = Accesses.build(
        np.r_[BASE + np.arange(0, 4 << 20, 4096 * 7), BASE + (4 << 20) + np.arange(8) * 4096]
    )
    stats = {}
    for name in ("mktme", "sev-snp", "tdx"):
        e = engine(s, Protection.preset(name, RmpConfig.uncached(RMP)), cached=False, mac=True)
        assert e.run(accesses).done
        stats[name] = e.protection_stats()
    mk, sev, tdx = stats["mktme"], stats["sev-snp"], stats["tdx"]
    assert mk.lines == sev.lines == tdx.lines  # the same references, classified alike
    lines = dict(zip(CLASSES, mk.lines, strict=True))
    assert all(lines.values())
    assert mk.decrypted == sum(lines.values())  # TME key on EPT and shared memory
    assert mk.decrypted - sev.decrypted == lines["ept"] + lines["shared"]  # SME off
    assert mk.decrypted - tdx.decrypted == lines["shared"]  # shared memory in the clear
    assert tdx.macs == lines["guest_pt"] + lines["ept"] + lines["data"] and mk.macs == sev.macs == 0
    assert sev.rmp_checks > 0 and mk.rmp_checks == tdx.rmp_checks == 0
    classes = {n: Protection.preset(n).encrypted() for n in stats}
    assert classes["mktme"] - classes["tdx"] == {"shared"}
    assert classes["mktme"] - classes["sev-snp"] == {"ept", "shared"}


def test_protection_pass_matches_the_reference_walker_uncached() -> None:
    s, oracle = space(shared_pages=4), space(shared_pages=4).walker()
    e = engine(s, Protection.preset("sev-snp", RmpConfig.uncached(RMP)), cached=False)
    gvas = [*(BASE + np.arange(0, 4 << 20, 4096 * 13)).tolist(), BASE + (4 << 20) + 4096 * 3]
    result = e.run(Accesses.build(gvas), log_references=4096)
    assert result.done
    lines = dict.fromkeys(CLASSES, 0)
    checks = 0
    for gva in gvas:
        t = oracle.translate(int(gva), Access.READ, Mode.SUPERVISOR)
        assert t.hpa is not None
        want = classify_walk(list(t.references), t.hpa, FEATURES, nested=True, rmp=True)
        for c in [*want.walk, want.data]:
            lines[c] += 1
        checks += len(want.rmp_pages)
    p = e.protection_stats()
    assert dict(zip(CLASSES, p.lines, strict=True)) == lines
    assert p.rmp_checks == p.rmp_lookups == checks


def test_mktme_preset_equals_the_flat_model_without_shared_memory() -> None:
    accesses = stream(6000, seed=5)
    s = space()
    flat = Engine(s.memory, MmuConfig(encryption=EncryptionConfig(DECRYPT)), s.features)
    flat.add_vcpu(s.guest, s.vmcs)
    passed = engine(space(), Protection.preset("mktme"))
    assert flat.run(accesses).done and passed.run(accesses).done
    assert flat.stats() == passed.stats()
    assert passed.protection_stats().decrypted == sum(passed.protection_stats().lines)


def test_a_protection_that_encrypts_nothing_changes_no_statistic() -> None:
    accesses = stream(9000, seed=2)  # more than one protected piece of 4096 accesses
    plain = engine(space(), None)
    none = engine(space(), Protection("none", "none", "none", "none", "none"))
    assert plain.run(accesses, record_hpa=True).done
    assert none.run(accesses, record_hpa=True).done
    assert plain.stats() == none.stats() and none.protection_stats().cycles == 0


def test_bad_protections_are_refused() -> None:
    with pytest.raises(ConfigError, match="guest_pt"):
        Protection(guest_pt="aes")
    with pytest.raises(ConfigError, match="mac"):
        Protection(mac=("none",))
    with pytest.raises(ConfigError, match="preset"):
        Protection.preset("sgx")
    with pytest.raises(ConfigError, match="integrity_latency"):
        EncryptionConfig(DECRYPT, 0, Protection.preset("tdx"))
    with pytest.raises(ConfigError, match="Assoc"):
        RmpConfig(3, 4, RMP)
    assert RmpConfig(base=1 << 30).entry_address(0x5000) == (1 << 30) + 0x4000 + 5 * 16
