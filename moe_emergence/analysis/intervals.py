"""Mean and 95% interval of a metric over seeds (the unit of replication across runs), with a
two-sided p-value against 0, and Holm's correction for a family of p-values.

Every interval is Student's t, whatever n (>= 2): ``mean ± t(0.975, df) * se``.

- :func:`mean_interval`: one sample, ``se = s / sqrt(n)`` (s with ddof=1), df = n - 1;
  p of the one-sample t-test (``scipy.stats.ttest_1samp``).
- :func:`paired_difference_interval`: ``a[i] - b[i]`` per seed, then the one-sample t
  (= ``scipy.stats.ttest_rel``); n = complete pairs.
- :func:`difference_interval`: ``mean(a) - mean(b)`` of unpaired samples, Welch's se and df
  (= ``scipy.stats.ttest_ind(equal_var=False)``); n = the smaller side.
- :func:`fold_change_interval`: the paired log-ratio ``log(after[i] / before[i])`` per seed,
  its one-sample t, back-transformed: the geometric-mean fold change and its interval, with
  the p of the t-test of the log-ratios against 0 (no change).
- :func:`detectable_effect`: the smallest true mean a two-sided one-sample t-test at level
  alpha detects with the given power at n values of the given SD (noncentral t).

NaNs are dropped (pairs with a NaN on either side). n <= 1 (a side with one value for Welch):
the mean and no interval, no p (NaN): a single run is not a finding. No spread (se = 0): a
zero-width interval and p = 0, or NaN when the mean is 0 too (as scipy). A t-interval of a
non-negative score can reach below 0 with few values; it is not clipped.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import integrate, optimize, stats

__all__ = [
    "Interval",
    "detectable_effect",
    "difference_interval",
    "fold_change_interval",
    "holm",
    "mean_interval",
    "paired_difference_interval",
]

NAN = float("nan")


@dataclass(frozen=True)
class Interval:
    """n values (pairs, or the smaller side for Welch); their mean (or difference of means);
    the interval's bounds; ``method``: ``t`` (one sample), ``paired_t``, ``welch_t``,
    ``log_t`` (a fold change: :func:`fold_change_interval`) or ``none`` (n <= 1); ``p``:
    two-sided p-value of the mean against 0 (NaN where undefined)."""

    n: int
    mean: float
    ci_low: float
    ci_high: float
    method: str
    p: float = NAN


def _finite(values: Sequence[float]) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).ravel()
    return x[~np.isnan(x)]


def _t(n: int, estimate: float, se: float, df: float, confidence: float, method: str) -> Interval:
    """The t-interval and two-sided p against 0 of ``estimate`` with standard error ``se``."""
    if se == 0:
        p = NAN if estimate == 0 else 0.0
        return Interval(n, estimate, estimate, estimate, method, p)
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
    p = float(2 * stats.t.sf(abs(estimate) / se, df))
    return Interval(n, estimate, estimate - half, estimate + half, method, p)


def _one_sample(x: np.ndarray, confidence: float, method: str) -> Interval:
    n = len(x)
    if n == 0:
        return Interval(0, NAN, NAN, NAN, "none")
    mean = float(x.mean())
    if n == 1:
        return Interval(1, mean, NAN, NAN, "none")
    return _t(n, mean, float(x.std(ddof=1)) / math.sqrt(n), n - 1, confidence, method)


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """The mean of ``values`` (NaNs dropped) with its Student t ``confidence`` interval
    (df = n - 1) and the one-sample t-test's two-sided p against 0; method ``t``."""
    return _one_sample(_finite(values), confidence, "t")


def paired_difference_interval(
    a: Sequence[float], b: Sequence[float], confidence: float = 0.95
) -> Interval:
    """The mean of the per-seed differences ``a[i] - b[i]`` (``a`` and ``b`` aligned: the same
    seed at each position; pairs with a NaN dropped) with its t-interval (df = pairs - 1) and
    the paired t-test's p against 0; method ``paired_t``. Raises ValueError on unequal
    lengths."""
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"paired values need equal lengths, got {len(x)} and {len(y)}")
    d = x - y
    return _one_sample(d[~np.isnan(d)], confidence, "paired_t")


def difference_interval(
    a: Sequence[float], b: Sequence[float], confidence: float = 0.95
) -> Interval:
    """``mean(a) - mean(b)`` of unpaired samples (NaNs dropped) with Welch's t-interval and
    Welch's two-sided p against 0; method ``welch_t``; n = the smaller side (``none`` when a
    side has fewer than 2 values)."""
    x, y = _finite(a), _finite(b)
    n = min(len(x), len(y))
    if n == 0:
        return Interval(0, NAN, NAN, NAN, "none")
    diff = float(x.mean() - y.mean())
    if n == 1:
        return Interval(1, diff, NAN, NAN, "none")
    va, vb = float(x.var(ddof=1)) / len(x), float(y.var(ddof=1)) / len(y)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(x) - 1) + vb**2 / (len(y) - 1)) if se > 0 else NAN
    return _t(n, diff, se, df, confidence, "welch_t")


def fold_change_interval(
    after: Sequence[float], before: Sequence[float], confidence: float = 0.95
) -> Interval:
    """The geometric-mean fold change ``exp(mean(log(after[i] / before[i])))`` over the pairs
    (``after``, ``before`` aligned by seed; pairs where either is NaN or not > 0 dropped: a
    log-ratio needs two positive values), its interval ``exp`` of the log-ratios' t-interval
    (df = pairs - 1), and the p of the one-sample t-test of the log-ratios against 0; method
    ``log_t``. Raises ValueError on unequal lengths."""
    x = np.asarray(after, dtype=np.float64).ravel()
    y = np.asarray(before, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"paired values need equal lengths, got {len(x)} and {len(y)}")
    ok = (x > 0) & (y > 0)  # False for NaN
    logs = _one_sample(np.log(x[ok] / y[ok]), confidence, "log_t")
    mean, low, high = (math.exp(v) for v in (logs.mean, logs.ci_low, logs.ci_high))  # nan -> nan
    return Interval(logs.n, mean, low, high, logs.method, logs.p)


def detectable_effect(n: int, sd: float, alpha: float, power: float = 0.8) -> float:
    """The smallest true mean ``delta`` (in the units of ``sd``) that a two-sided one-sample
    t-test of n values at level ``alpha`` rejects with probability ``power``, when the values'
    SD is ``sd``: the root of ``P(|T'| > t_(1-alpha/2, n-1)) = power``, T' noncentral t with
    n - 1 df and noncentrality ``delta * sqrt(n) / sd``. NaN for n < 2 or a NaN/negative sd;
    0 for sd == 0."""
    if n < 2 or not sd >= 0 or not 0 < alpha < 1 or not 0 < power < 1:
        return NAN
    return 0.0 if sd == 0 else _unit_detectable(int(n), float(alpha), float(power)) * sd


@functools.lru_cache(maxsize=256)
def _unit_detectable(n: int, alpha: float, power: float) -> float:
    """:func:`detectable_effect` at sd = 1."""
    df = n - 1
    crit = float(stats.t.ppf(1 - alpha / 2, df))

    def shortfall(nc: float) -> float:
        # T' = (Z + nc) / sqrt(V / df), V ~ chi2(df): P(|T'| > crit) = E_V[Phi(nc - crit s) +
        # Phi(-nc - crit s)], s = sqrt(V / df) (integrated: scipy's nct tails give NaN far out)
        def hit(v: float) -> float:
            s = crit * math.sqrt(v / df)
            return float((stats.norm.cdf(nc - s) + stats.norm.cdf(-nc - s)) * stats.chi2.pdf(v, df))

        return float(integrate.quad(hit, 0, math.inf, limit=200)[0]) - power

    high = 1.0
    while shortfall(high) < 0:  # power rises with nc: double until past the target
        high *= 2
        if high > 1e9:
            return math.inf
    return optimize.brentq(shortfall, 0.0, high, xtol=1e-10) / math.sqrt(n)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order. The m non-NaN values sorted
    ascending, ``p_(i)`` (i = 1..m) becomes ``max_{j <= i} min(1, (m - j + 1) * p_(j))``
    (monotone, capped at 1); rejecting where adjusted < alpha controls the family-wise error at
    alpha. NaNs stay NaN and do not count in m."""
    p = np.asarray(pvalues, dtype=np.float64).ravel()
    out = np.full(p.shape, NAN)
    idx = np.flatnonzero(~np.isnan(p))
    if idx.size == 0:
        return out.tolist()
    order = idx[np.argsort(p[idx], kind="stable")]
    m = len(order)
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(scaled)
    return out.tolist()
