"""A sweep point's id is its resume key: two experiments run with the same overrides are two
points, so their ids must differ (else one's result file would stand for the other's)."""

from __future__ import annotations

from eptlab.sweep.spec import Point


def test_point_id_depends_on_the_experiment() -> None:
    overrides = (("seed", "1"), ("accesses", "1000"))
    a, b = Point("cow_fork", overrides), Point("trap_debugger", overrides)
    assert a.point_id != b.point_id
    assert a.point_id == Point("cow_fork", overrides).point_id  # stable
    assert a.point_id != Point("cow_fork", (("seed", "2"), ("accesses", "1000"))).point_id
