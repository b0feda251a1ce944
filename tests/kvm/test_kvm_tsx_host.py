"""Real RTM in this process: the abort log's decoding, the unavailable path (forced), and the
first-touch rule of demand paging (lazy aborts with status 0, pre-faulted does not)."""

from __future__ import annotations

import numpy as np
import pytest

from eptlab.errors import RtmUnavailable
from eptlab.kvm import rtm_host
from eptlab.kvm.txplan import (
    KIND_ABORT,
    KIND_COMMIT,
    KIND_FALLBACK,
    AttemptLog,
    describe_status,
    fresh_pages_plan,
    write_set_plan,
)


def _entry(kind: int, tx: int, status: int, cycles: int) -> list[int]:
    return [kind << 56 | tx << 32 | status, cycles]


def test_log_entries_decode_into_kind_transaction_status_and_cycles() -> None:
    words = (_entry(KIND_ABORT, 3, 0, 900) + _entry(KIND_ABORT, 3, 0x6, 50)
             + _entry(KIND_ABORT, 3, 0x8, 70) + _entry(KIND_FALLBACK, 3, 0, 0)
             + _entry(KIND_COMMIT, 4, 0, 41) + _entry(KIND_ABORT, 5, 0xFF000001, 30)
             + _entry(KIND_COMMIT, 5, 0, 43))
    log = AttemptLog.decode(np.array(words, np.uint64))
    assert log.tx.tolist() == [3, 3, 3, 3, 4, 5, 5]
    assert log.status.tolist()[:3] == [0, 6, 8]
    s = log.summary()
    assert (s["attempts"], s["commits"], s["fallbacks"], s["aborts"]) == (6, 2, 1, 4)
    assert (s["abort_zero"], s["abort_retry"], s["abort_conflict"]) == (1, 1, 1)
    assert (s["abort_capacity"], s["abort_xabort"], s["abort_nested"]) == (1, 1, 0)
    assert s["abort_rate"] == pytest.approx(4 / 6)
    assert s["commit_cycles_median"] == 42.0
    assert log.aborts_per_tx(6).tolist() == [0, 0, 0, 3, 0, 1]


def test_status_words_are_named_by_their_bits() -> None:
    assert describe_status(0) == "0"
    assert describe_status(0x6) == "retry|conflict"
    assert describe_status(0xFF000001) == "xabort(0xff)"
    assert describe_status(0x28) == "capacity|nested"


def test_a_bad_entry_kind_is_a_config_error() -> None:
    with pytest.raises(Exception, match="kind"):
        AttemptLog.decode(np.array(_entry(7, 0, 0, 0), np.uint64))


def test_plans_put_fresh_pages_past_the_warm_ones_and_fill_write_sets_line_by_line() -> None:
    plan = fresh_pages_plan(10, 2, 8, seed=1, warm_pages=4)
    for t in range(10):
        offsets = plan.addresses(t)
        assert len(offsets) == 8
        assert (offsets >= 4 * 4096).sum() == 2  # two fresh pages, distinct across transactions
    fresh = np.concatenate([plan.addresses(t)[plan.addresses(t) >= 4 * 4096] // 4096
                            for t in range(10)])
    assert len(set(fresh.tolist())) == 20
    ws = write_set_plan(3, 100)
    assert ws.addresses(0).tolist() == list(range(0, 6400, 64))


def test_forcing_cpuid_without_rtm_reports_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(rtm_host.FORCE_ENV, "1")
    s = rtm_host.support()
    assert not s.usable and not s.rtm and "bit 11" in s.reason
    with pytest.raises(RtmUnavailable, match="RTM"):
        rtm_host.run(fresh_pages_plan(2, 0, 1, 0))


@pytest.fixture
def rtm() -> rtm_host.Support:
    s = rtm_host.support()
    if not s.usable:
        pytest.skip(f"needs RTM: {s.reason}")
    return s


def test_first_stores_to_fresh_pages_abort_with_status_0_until_the_fallback(rtm: object) -> None:
    plan = fresh_pages_plan(20, 1, 4, seed=0)
    log = rtm_host.run(plan, rounds=2, max_retries=2, policy="lazy")
    s = log.summary()
    # round 1: every attempt of every transaction aborts (the #PF is suppressed, so the page
    # stays unmapped) and the fallback maps it; round 2 commits at once
    assert s["fallbacks"] == 20 and s["commits"] == 20
    commits_at = np.flatnonzero(log.kind == KIND_COMMIT)
    assert commits_at.min() > np.flatnonzero(log.kind == KIND_FALLBACK).max()
    assert s["abort_zero"] >= 3 * 20 - 2  # allow a stray abort of another cause


def test_prefaulted_pages_give_no_status_0_aborts(rtm: object) -> None:
    plan = fresh_pages_plan(20, 2, 4, seed=0)
    s = rtm_host.run(plan, rounds=1, max_retries=2, policy="prefaulted").summary()
    assert s["fallbacks"] == 0
    assert s["abort_zero"] <= 1  # an interrupt can still land inside one


def test_write_sets_past_the_l1d_abort_with_the_capacity_bit(rtm: object) -> None:
    s = rtm_host.run(write_set_plan(5, 2 * 768), max_retries=1).summary()
    assert s["commits"] == 0 and s["fallbacks"] == 5 and s["aborts"] == 10
    assert s["abort_capacity"] >= 8  # an interrupt can end one attempt first (status 0)
