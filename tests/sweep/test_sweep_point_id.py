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


def test_toml_values_become_set_text() -> None:
    from eptlab.sweep.spec import as_text

    assert as_text(True) == "true" and as_text(False) == "false"
    assert as_text([1, 2, 3]) == "1,2,3"
    assert as_text(["4k", "2m"]) == "4k,2m"
    assert as_text(7) == "7"


def test_point_id_depends_on_the_cost_profile() -> None:
    """A point run under another cost profile is another point: resuming must not take the
    result of one profile for the other."""
    overrides = (("seed", "1"),)
    shipped = Point("cow_fork", overrides)
    host = Point("cow_fork", overrides, profile='[cycles]\ninvept = 500\n')
    other = Point("cow_fork", overrides, profile='[cycles]\ninvept = 900\n')
    assert len({shipped.point_id, host.point_id, other.point_id}) == 3
    assert host.point_id == Point("cow_fork", overrides, profile=host.profile).point_id
