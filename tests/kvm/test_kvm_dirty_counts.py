"""KVM's dirty-logging rows count the exits and faults KVM itself takes, not only those that
reach the VMM: "0 exits per write" is what the VMM saw, not what happened."""

from __future__ import annotations

import pytest

from eptlab.kvm.apps.dirty_log import DirtyLog, DirtyLogParams


@pytest.mark.kvm
def test_dirty_log_rows_count_the_exits_and_faults_kvm_takes_itself() -> None:
    rows = {r["mode"]: r for r in DirtyLog().rows(DirtyLogParams(memory_mib=16, pages=64,
                                                                 rounds=2))}
    log, trap = rows["log"], rows["trap"]
    assert log["exits_per_write"] == 0  # nothing reaches the VMM ...
    for row in rows.values():
        # ... but KVM's own counters see at least every exit the VMM saw
        assert row["kvm_exits_per_write"] * row["writes"] >= row["exits"]
        assert row["kvm_exits_per_write"] == round(row["kernel_exits"] / row["writes"], 4)
    assert trap["kvm_exits_per_write"] >= 1  # every trapped write is an exit
    if log["tdp"] is False:  # shadow paging (kvm_pvm here): each round's first store faults
        assert log["kvm_pf_per_write"] >= 1 and log["kvm_exits_per_write"] >= 1
