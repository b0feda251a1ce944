"""Means and 95% intervals over seeds: checked against hand-worked cases."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from eptlab.experiments.intervals import (
    OVERLAP,
    Interval,
    change,
    compare,
    interval,
    interval_text,
    lines,
    measured_columns,
    one_seed_note,
    pick,
    ratio,
    reduction,
    relation,
    side,
    summarize,
    text_of,
    text_table,
    times,
    verdict,
    yerr,
)

T_975_2 = 4.302652729911275  # Student t, 0.975 quantile, 2 degrees of freedom (tables)
T_975_4 = 2.776445105197793
T_975_1 = 12.706204736174698


def test_three_values_by_hand() -> None:
    # mean 2, s = 1, half-width t(0.975, 2) * 1 / sqrt(3) = 2.484
    iv = interval([1, 2, 3], clip=False)
    assert iv.mean == 2 and iv.n == 3
    assert iv.half_width == pytest.approx(T_975_2 / math.sqrt(3)) == pytest.approx(2.4841, abs=1e-4)
    assert (iv.lo, iv.hi) == pytest.approx((2 - 2.48414, 2 + 2.48414), abs=1e-5)


def test_five_values_by_hand() -> None:
    # mean 14, s = sqrt(10), sem = sqrt(2): half-width 2.7764 * 1.4142 = 3.9264
    iv = interval([10, 12, 14, 16, 18])
    assert iv.mean == 14
    half = T_975_4 * math.sqrt(2)
    assert (iv.lo, iv.hi) == pytest.approx((14 - half, 14 + half))
    assert iv.hi == pytest.approx(17.9264, abs=1e-4)


def test_a_non_negative_quantity_keeps_a_non_negative_interval() -> None:
    assert interval([1, 2, 3]).lo == 0.0
    assert interval([1, 2, 3]).hi == pytest.approx(2 + T_975_2 / math.sqrt(3))
    two = interval([2, 4])  # t(0.975, 1) * s / sqrt(2) with s = sqrt(2): 12.706
    assert two.hi == pytest.approx(3 + T_975_1)
    assert two.lo == 0.0
    assert interval([-1, 2, 3]).lo < 0  # a signed quantity is not clipped


def test_one_seed_has_no_interval_and_says_so() -> None:
    iv = interval([3.6])
    assert (iv.lo, iv.mean, iv.hi, iv.n) == (3.6, 3.6, 3.6, 1)
    assert iv.text("{:.1f}", "x") == "3.6x"
    one = pd.DataFrame({"seed": [0, 0], "x": [1, 2]})
    assert "no interval" in one_seed_note(one)[0]
    assert one_seed_note(one.assign(seed=[0, 1])) == []


def test_equal_values_are_exact_and_missing_values_are_left_out() -> None:
    iv = interval([0.1, 0.1, 0.1])
    assert iv.exact and iv.mean == 0.1 and iv.text("{:.1f}") == "0.1"
    assert interval([1.0, None, 3.0, float("nan")]) == interval([1.0, 3.0])
    assert interval([]).n == 0 and math.isnan(interval([]).mean)


def test_texts() -> None:
    assert interval_text(3.4, 3.6, 3.8, "{:.1f}", "x") == "3.6x [3.4, 3.8]"
    assert interval_text(418, 517, 620, "{:,.0f}", " cycles") == "517 [418, 620] cycles"
    assert Interval(0.5, 0.25, 0.75, 3).scaled(100).text("{:.0f}", "%") == "50% [25, 75]"


def test_overlapping_intervals_are_not_ranked() -> None:
    a, b, c = Interval(2.1, 1.9, 2.3, 5), Interval(2.2, 2.0, 2.5, 5), Interval(5.0, 4.6, 5.4, 5)
    assert relation(a, b) == "overlap" and relation(a, c) == "lower" and relation(c, a) == "higher"
    assert compare(a, b, ("pml", "trap-code")) == (
        f"pml 2.1 [1.9, 2.3] and trap-code 2.2 [2.0, 2.5]: {OVERLAP}"
    )
    assert compare(a, c, ("pml", "trap-code")) == "pml 2.1 [1.9, 2.3] is lower than trap-code " \
        "5.0 [4.6, 5.4]"
    assert verdict(a, c, "more", "fewer") == "fewer" and verdict(a, b) == OVERLAP
    assert change("exits", c, a) == "exits from 5.0 [4.6, 5.4] to 2.1 [1.9, 2.3]"
    assert OVERLAP in change("exits", a, b)
    assert times(Interval(3.6, 3.4, 3.8, 5), "cheaper") == "3.6x [3.4, 3.8] cheaper"
    assert OVERLAP in times(Interval(1.05, 0.9, 1.2, 5))


def test_ratios_and_reductions_are_taken_seed_by_seed() -> None:
    seeds = pd.Index([0, 1, 2], name="seed")
    before = pd.Series([10.0, 20.0, 30.0], index=seeds)
    after = pd.Series([5.0, 10.0, 15.0], index=seeds)
    assert ratio(before, after) == Interval(2.0, 2.0, 2.0, 3)  # exact although the values vary
    assert reduction(before, after) == Interval(0.5, 0.5, 0.5, 3)
    assert ratio(before, after * 0).n == 0  # zero denominators are left out


def table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "seed": [0, 1, 2, 0, 1, 2],
            "mode": ["a", "a", "a", "b", "b", "b"],
            "period": [None, None, None, 10.0, 10.0, 10.0],
            "pwc": [True, True, True, False, False, False],
            "cycles": [1.0, 2.0, 3.0, 5.0, 5.0, 5.0],
            "delay": [None, None, None, 1.0, 2.0, 3.0],
            "causes": ["x=1", "x=2", "x=1", "y=1", "y=1", "y=1"],
        }
    )


def test_summarize_by_hand() -> None:
    s = summarize(table(), ("mode", "period"))
    assert list(s.columns) == [
        "mode", "period", "n", "cycles", "cycles_lo", "cycles_hi", "delay", "delay_lo",
        "delay_hi", "pwc", "causes",
    ]
    assert list(s["mode"]) == ["a", "b"] and list(s.n) == [3, 3]  # a NaN key is a key
    a, b = s.iloc[0], s.iloc[1]
    assert (a.cycles, a.cycles_lo, a.cycles_hi) == pytest.approx((2, 0, 2 + 2.48414), abs=1e-5)
    assert (b.cycles, b.cycles_lo, b.cycles_hi) == (5, 5, 5)
    assert math.isnan(a.delay) and b.delay == 2
    assert a.causes == "x=1 | x=2" and b.causes == "y=1"
    assert bool(a.pwc) is True  # booleans are descriptions, not measurements
    assert measured_columns(table(), ("mode", "period")) == ["cycles", "delay"]
    assert pick(s, "cycles", mode="b") == Interval(5.0, 5.0, 5.0, 3)
    assert pick(s, "cycles", mode="zzz").n == 0


def test_a_flag_the_seeds_disagree_on_becomes_text_and_stores(tmp_path: Path) -> None:
    """model-vs-machine's huge_pages_obtained: True in one configuration, True for some seeds
    and False for others in another; the summary says both and writes to Parquet."""
    rows = pd.DataFrame({"seed": [0, 1, 0, 1], "size": [1, 1, 16, 16],
                         "huge": [True, True, True, False], "cycles": [1.0, 2.0, 3.0, 4.0]})
    s = summarize(rows, ("size",))
    assert list(s.huge) == ["True", "True | False"]
    s.to_parquet(tmp_path / "s.parquet")
    assert list(pd.read_parquet(tmp_path / "s.parquet").huge) == ["True", "True | False"]
    agreed = summarize(rows[rows["size"] == 1], ("size",))
    assert agreed.huge.tolist() == [True]  # agreement keeps the flag a flag


def test_text_table_and_error_bars() -> None:
    s = summarize(table(), ("mode",))
    text = text_table(s)
    assert "cycles_lo" not in text.columns
    assert list(text.cycles) == ["2 [0, 4.484]", "5"]
    err = yerr([Interval(2, 0, 4.5, 3), Interval(5, 5, 5, 3), Interval(np.nan, np.nan, np.nan, 0)])
    assert err.shape == (2, 3)
    assert err.tolist() == [[2.0, 0.0, 0.0], [2.5, 0.0, 0.0]]


def test_a_count_with_a_zero_seed_is_still_clipped_at_zero() -> None:
    """0 is a possible value of a count: a column of non-negative values that holds a 0 keeps
    the lower bound at 0 (the unclipped bound is 1 - 2.484 < 0)."""
    assert interval([0, 1, 2], clip=False).lo < 0
    assert interval([0, 1, 2]).lo == 0.0
    assert interval([0, 0, 5]).lo == 0.0


def test_intervals_that_touch_overlap() -> None:
    """[1, 2] and [2, 3] share the value 2: not ranked."""
    a, b = Interval(1.5, 1.0, 2.0, 5), Interval(2.5, 2.0, 3.0, 5)
    assert a.overlaps(b) and b.overlaps(a)
    assert relation(a, b) == "overlap" and verdict(b, a) == OVERLAP
    assert relation(a, Interval(2.5, 2.01, 3.0, 5)) == "lower"


def test_a_rate_interval_is_cut_to_the_possible_rates() -> None:
    iv = interval([0.9, 1.0, 1.0, 0.8])  # t interval reaches above 1
    assert iv.hi > 1.0
    cut = iv.within(0.0, 1.0)
    assert (cut.mean, cut.lo, cut.hi, cut.n) == (iv.mean, iv.lo, 1.0, 4)
    low = interval([0.0, 0.1, 0.0], clip=False).within(0.0, 1.0)
    assert low.lo == 0.0 and low.hi < 1.0


def test_side_claims_a_side_only_beyond_the_interval() -> None:
    assert side(Interval(1.3, 1.1, 1.5, 5), "lazy", "eager") == "lazy"
    assert side(Interval(0.7, 0.6, 0.9, 5), "lazy", "eager") == "eager"
    assert side(Interval(1.05, 0.9, 1.2, 5), "lazy", "eager") == OVERLAP
    assert side(Interval(1.0, 1.0, 1.0, 5), "lazy", "eager") == OVERLAP  # exactly even
    assert side(Interval(math.nan, math.nan, math.nan, 0), "a", "b") == OVERLAP
    assert side(Interval(0.6, 0.55, 0.7, 5), "back", "warm", at=0.5) == "back"


def test_lines_draw_the_means_with_their_intervals() -> None:
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    lines(ax, [1, 2], [Interval(2, 1, 3, 3), Interval(5, 5, 5, 3)], fmt="o-")
    assert np.asarray(ax.lines[0].get_ydata()).tolist() == [2, 5]
    (bar,) = ax.collections  # the vertical error bars: from lo to hi
    assert isinstance(bar, LineCollection)
    segments = [seg[:, 1].tolist() for seg in bar.get_segments()]
    assert segments == [[1, 3], [5, 5]]


def test_text_of_quotes_per_seed_values_as_whole_counts_by_default() -> None:
    assert text_of([1000, 1000, 1000]) == "1,000"
    assert text_of([2, 4, 6]) == interval([2, 4, 6]).text("{:,.0f}")
    assert text_of(pd.Series([1.5, 1.5]), "{:.1f}", " MiB") == "1.5 MiB"
