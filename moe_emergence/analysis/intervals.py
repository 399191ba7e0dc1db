"""Mean and 95% confidence interval of a metric over seeds (the unit of replication).

Fewer than 5 seeds: Student's t-interval, ``mean ± t(0.975, n-1) * s / sqrt(n)`` with ``s``
the sample standard deviation (ddof=1). 5 or more: a percentile bootstrap of the mean
(``scipy.stats.bootstrap``, 10,000 resamples, seeded). One seed: the mean and no interval
(NaN bounds): a single run is not a finding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

BOOTSTRAP_FROM = 5
BOOTSTRAP_RESAMPLES = 10_000


@dataclass(frozen=True)
class Interval:
    """n values; their mean; the interval's bounds; ``method``: t, bootstrap or none."""

    n: int
    mean: float
    ci_low: float
    ci_high: float
    method: str


def mean_interval(values: Sequence[float], confidence: float = 0.95, seed: int = 0) -> Interval:
    """The mean of ``values`` (NaNs dropped) with its ``confidence`` interval (see the module
    docstring for which). Deterministic for a given ``seed``."""
    x = np.asarray([v for v in values if not np.isnan(v)], dtype=np.float64)
    n = len(x)
    if n == 0:
        return Interval(0, float("nan"), float("nan"), float("nan"), "none")
    mean = float(x.mean())
    if n == 1:
        return Interval(1, mean, float("nan"), float("nan"), "none")
    if n < BOOTSTRAP_FROM:
        half = stats.t.ppf(0.5 + confidence / 2, df=n - 1) * x.std(ddof=1) / np.sqrt(n)
        return Interval(n, mean, mean - half, mean + half, "t")
    if np.all(x == x[0]):  # no spread: the bootstrap has nothing to resample
        return Interval(n, mean, mean, mean, "bootstrap")
    result = stats.bootstrap(
        (x,), np.mean, confidence_level=confidence, n_resamples=BOOTSTRAP_RESAMPLES,
        method="percentile", random_state=np.random.default_rng(seed),
    )  # fmt: skip
    low, high = result.confidence_interval
    return Interval(n, mean, float(low), float(high), "bootstrap")


def difference_interval(
    a: Sequence[float], b: Sequence[float], confidence: float = 0.95, seed: int = 0
) -> Interval:
    """Mean of ``a`` minus mean of ``b`` (e.g. MoE - dense loss over seeds) with a Welch
    t-interval below 5 values per side, else a percentile bootstrap of the difference of
    means (each side resampled on its own)."""
    x = np.asarray([v for v in a if not np.isnan(v)], dtype=np.float64)
    y = np.asarray([v for v in b if not np.isnan(v)], dtype=np.float64)
    n = min(len(x), len(y))
    if n == 0:
        return Interval(0, float("nan"), float("nan"), float("nan"), "none")
    diff = float(x.mean() - y.mean())
    if n == 1:
        return Interval(1, diff, float("nan"), float("nan"), "none")
    if n < BOOTSTRAP_FROM:
        va, vb = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
        se = np.sqrt(va + vb)
        if se == 0:
            return Interval(n, diff, diff, diff, "t")
        df = (va + vb) ** 2 / (va**2 / (len(x) - 1) + vb**2 / (len(y) - 1))
        half = stats.t.ppf(0.5 + confidence / 2, df=df) * se
        return Interval(n, diff, diff - half, diff + half, "t")
    result = stats.bootstrap(
        (x, y), lambda p, q, axis=-1: p.mean(axis) - q.mean(axis), confidence_level=confidence,
        n_resamples=BOOTSTRAP_RESAMPLES, method="percentile",
        random_state=np.random.default_rng(seed), paired=False, vectorized=True,
    )  # fmt: skip
    low, high = result.confidence_interval
    return Interval(n, diff, float(low), float(high), "bootstrap")
