"""The over-seeds intervals against scipy: one-sample t (any n, no bootstrap), paired t, Welch,
the paired log-ratio (fold change), their p-values against 0, Holm's adjustment against a
hand-computed example, and the detectable effect against the noncentral t and a simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from moe_emergence.analysis.intervals import (
    detectable_effect,
    difference_interval,
    fold_change_interval,
    holm,
    mean_interval,
    paired_difference_interval,
)


@pytest.mark.parametrize("n", [2, 3, 10, 40])
def test_mean_interval_is_students_t_for_every_n(n):
    x = np.random.default_rng(n).normal(0.3, 0.2, size=n)
    got = mean_interval(x.tolist())
    want = stats.ttest_1samp(x, 0.0)
    low, high = want.confidence_interval(0.95)
    assert (got.n, got.method) == (n, "t")
    assert got.mean == pytest.approx(x.mean(), rel=1e-12)
    assert (got.ci_low, got.ci_high) == pytest.approx((low, high), rel=1e-9)
    assert got.p == pytest.approx(want.pvalue, rel=1e-9)


def test_t_interval_of_three_values_by_hand():
    # mean 2, s = 1, n = 3, t(0.975, 2) = 4.302652729911275 -> half width 4.3027 / sqrt(3).
    got = mean_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)
    assert (got.ci_low, got.ci_high) == pytest.approx((2.0 - half, 2.0 + half), rel=1e-9)


def test_one_value_has_no_interval_nans_are_dropped_and_no_spread_has_no_width():
    got = mean_interval([0.5, float("nan")])
    assert (got.n, got.mean, got.method) == (1, 0.5, "none")
    assert math.isnan(got.ci_low) and math.isnan(got.p)
    assert mean_interval([]).n == 0
    flat = mean_interval([0.3] * 4)
    assert (flat.ci_low, flat.ci_high, flat.p) == (0.3, 0.3, 0.0)  # as scipy: t = inf
    assert math.isnan(mean_interval([0.0, 0.0]).p)  # 0 / 0, as scipy


def test_paired_difference_is_ttest_rel():
    a, b = [2.0, 2.4, 2.1, 2.9], [1.8, 2.5, 1.7, 2.2]
    got = paired_difference_interval(a, b)
    want = stats.ttest_rel(a, b)
    low, high = want.confidence_interval(0.95)
    assert (got.n, got.method) == (4, "paired_t")
    assert (got.mean, got.ci_low, got.ci_high, got.p) == pytest.approx(
        (np.mean(a) - np.mean(b), low, high, want.pvalue), rel=1e-9
    )


def test_paired_difference_drops_incomplete_pairs_and_needs_equal_lengths():
    got = paired_difference_interval([1.0, float("nan"), 3.0, 4.0], [0.5, 1.0, 2.0, 3.5])
    want = stats.ttest_rel([1.0, 3.0, 4.0], [0.5, 2.0, 3.5])
    assert got.n == 3 and got.p == pytest.approx(want.pvalue, rel=1e-9)
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference_interval([1.0, 2.0], [1.0])


def test_unpaired_difference_is_welch():
    a, b = [1.0, 3.0, 2.5], [0.5, 1.5, 0.7, 0.9]
    got = difference_interval(a, b)
    want = stats.ttest_ind(a, b, equal_var=False)
    low, high = want.confidence_interval(0.95)
    assert (got.n, got.method) == (3, "welch_t")
    assert (got.mean, got.ci_low, got.ci_high, got.p) == pytest.approx(
        (np.mean(a) - np.mean(b), low, high, want.pvalue), rel=1e-9
    )
    assert difference_interval([1.0], [0.5, 0.7]).method == "none"


def test_holm_by_hand():
    # sorted: 0.005 * 4 = 0.02, 0.01 * 3 = 0.03, 0.03 * 2 = 0.06, 0.04 * 1 = 0.04 -> 0.06
    # (monotone: never below the previous adjusted value). The NaN is not a test: m = 4.
    got = holm([0.01, float("nan"), 0.04, 0.03, 0.005])
    assert got[0] == pytest.approx(0.03) and math.isnan(got[1])
    assert got[2:] == pytest.approx([0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1
    assert holm([0.2]) == [0.2] and holm([]) == []
    assert all(math.isnan(p) for p in holm([float("nan")] * 2))


def test_fold_change_is_the_t_test_of_the_paired_log_ratios_back_transformed():
    after, before = [0.584, 0.09, 0.04, float("nan")], [0.004, 0.006, 0.001, 0.01]
    got = fold_change_interval(after, before)
    logs = np.log(np.divide(after[:3], before[:3]))
    want = stats.ttest_1samp(logs, 0.0)
    low, high = want.confidence_interval(0.95)
    assert (got.n, got.method) == (3, "log_t")
    assert got.mean == pytest.approx(math.exp(logs.mean()), rel=1e-12)  # the geometric mean
    assert (got.ci_low, got.ci_high) == pytest.approx((math.exp(low), math.exp(high)), rel=1e-9)
    assert got.p == pytest.approx(want.pvalue, rel=1e-9)
    # a log-ratio needs two positive values: zeros drop out, as NaNs do
    assert fold_change_interval([0.2, 0.3, 0.0], [0.0, 0.1, 0.1]).n == 1
    with pytest.raises(ValueError, match="equal lengths"):
        fold_change_interval([1.0], [1.0, 2.0])


@pytest.mark.parametrize(("n", "alpha"), [(3, 0.05 / 6), (5, 0.05), (10, 0.01)])
def test_detectable_effect_has_the_asked_power_under_the_noncentral_t(n, alpha):
    sd = 0.7
    effect = detectable_effect(n, sd, alpha, power=0.8)
    nc = effect / (sd / math.sqrt(n))
    crit = stats.t.ppf(1 - alpha / 2, n - 1)
    lower = np.nan_to_num(stats.nct.cdf(-crit, n - 1, nc))  # far out scipy gives NaN for ~0
    power = stats.nct.sf(crit, n - 1, nc) + lower
    assert power == pytest.approx(0.8, abs=1e-4)
    assert detectable_effect(n, 2 * sd, alpha) == pytest.approx(2 * effect)  # scales with sd


def test_detectable_effect_by_simulation_and_edge_cases():
    # n = 4, alpha = 0.05, sd 1: simulated t-tests at the returned mean reject about 80%
    effect = detectable_effect(4, 1.0, 0.05)
    x = np.random.default_rng(0).normal(effect, 1.0, size=(20000, 4))
    rate = (stats.ttest_1samp(x, 0.0, axis=1).pvalue < 0.05).mean()
    assert abs(rate - 0.8) < 0.015
    assert math.isnan(detectable_effect(1, 1.0, 0.05)) and detectable_effect(3, 0.0, 0.05) == 0
    assert math.isnan(detectable_effect(3, float("nan"), 0.05))
