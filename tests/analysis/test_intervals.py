"""Known answers for the over-seeds intervals: t-intervals by hand, bootstrap behaviour."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from moe_emergence.analysis.intervals import difference_interval, mean_interval


def test_t_interval_of_three_values_matches_the_hand_computation():
    # mean 2, s = 1, n = 3, t(0.975, 2) = 4.302652729911275 -> half width 4.3027 / sqrt(3).
    got = mean_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)
    assert got.method == "t" and got.n == 3 and got.mean == pytest.approx(2.0)
    assert got.ci_low == pytest.approx(2.0 - half, rel=1e-9)
    assert got.ci_high == pytest.approx(2.0 + half, rel=1e-9)


def test_t_interval_of_two_values_uses_twelve_point_seven():
    got = mean_interval([0.10, 0.30])  # s = 0.1414..., t(0.975, 1) = 12.706204736174698
    half = 12.706204736174698 * math.sqrt(0.02) / math.sqrt(2)
    assert (got.ci_low, got.ci_high) == pytest.approx((0.2 - half, 0.2 + half), rel=1e-9)


def test_one_seed_has_no_interval_and_nans_are_dropped():
    got = mean_interval([0.5, float("nan")])
    assert got.n == 1 and got.mean == 0.5 and math.isnan(got.ci_low) and got.method == "none"
    assert mean_interval([]).n == 0


def test_five_or_more_seeds_bootstrap_within_the_range_and_seeded():
    values = [0.11, 0.14, 0.09, 0.16, 0.12, 0.13]
    got = mean_interval(values)
    assert got.method == "bootstrap" and got.n == 6
    assert min(values) <= got.ci_low < got.mean < got.ci_high <= max(values)
    assert mean_interval(values) == got  # the same seed, the same interval
    assert mean_interval([0.3] * 5).ci_low == 0.3  # no spread, no width


def test_welch_difference_of_two_pairs_by_hand():
    # a: mean 2, var 2; b: mean 1, var 0.5; n = 2 each: se = sqrt(1 + 0.25), df by Welch.
    got = difference_interval([1.0, 3.0], [0.5, 1.5])
    va, vb = 2.0 / 2, 0.5 / 2
    df = (va + vb) ** 2 / (va**2 + vb**2)
    half = stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert got.mean == pytest.approx(1.0) and got.method == "t"
    assert (got.ci_low, got.ci_high) == pytest.approx((1.0 - half, 1.0 + half), rel=1e-9)


def test_bootstrap_difference_excludes_zero_for_separated_groups():
    got = difference_interval([2.0, 2.1, 2.2, 2.05, 2.15], [1.0, 1.1, 0.9, 1.05, 0.95])
    assert got.method == "bootstrap" and got.ci_low > 0.8 and got.ci_high < 1.3
