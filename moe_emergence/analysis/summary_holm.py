"""The sweep summary's multiplicity: the per-run permutation counts (one Holm family over
every run of every cell per column) and Holm over each declared family of tested rows, with
each test's and each family's detectable effect."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

import numpy as np

from moe_emergence.analysis.intervals import detectable_effect, holm
from moe_emergence.analysis.results import RunResult
from moe_emergence.analysis.summary_groups import is_moe, is_reference
from moe_emergence.analysis.summary_rows import (
    ABOVE_NULL,
    ALPHA,
    FAMILY_TITLES,
    NAN,
    POWER,
    Family,
    SummaryRow,
)
from moe_emergence.analysis.summary_values import (
    exp_or_inf,
    final_value,
    layers_of,
    step0_value,
)

Cell = tuple[str, int, Sequence[RunResult]]  # (group or initial-model label, layer, its runs)


def _resolution(runs: Iterable[RunResult]) -> float:
    """1 / (1 + K), K the fewest permutations among ``runs`` (NaN when none is known)."""
    ks = [r.null_permutations for r in runs if r.null_permutations]
    return 1 / (1 + min(ks)) if ks else NAN


def _count_rows(
    cells: Sequence[Cell],
    metric: str,
    field_name: str,
    at_step0: bool,
    family: str,
) -> tuple[list[SummaryRow], Family]:
    """One ``count`` row per (label, layer, runs) cell: the runs whose ``field_name`` p (final,
    or at step 0) is below ALPHA after Holm over every run of every cell (one family)."""
    get = step0_value if at_step0 else final_value
    raw = [[get(layer, field_name)(r) for r in runs] for _, layer, runs in cells]
    flat = holm([p for ps in raw for p in ps])
    rows, tests, survivors, start = [], [], [], 0
    for (label, layer, runs), ps in zip(cells, raw, strict=True):
        adjusted = flat[start : start + len(ps)]
        start += len(ps)
        tested = [p for p in adjusted if not math.isnan(p)]
        count = float(sum(p < ALPHA for p in tested)) if tested else NAN
        seeds = tuple(r.seed for r in runs)
        rows.append(
            SummaryRow(
                label,
                layer,
                metric,
                len(tested),
                count,
                NAN,
                NAN,
                "count",
                family=family,
                seeds=seeds,
                values=tuple(adjusted),
            )
        )
        for seed, p, adj in zip(seeds, ps, adjusted, strict=True):
            if not math.isnan(p):
                tests.append((label, layer, metric, seed))
                if adj < ALPHA:
                    survivors.append((label, layer, metric, seed))
    finite = [p for ps in raw for p in ps if not math.isnan(p)]
    m = len(finite)
    declared = Family(
        name=family,
        title=_count_title(metric, field_name, at_step0),
        m=m,
        tests=tuple(tests),
        survivors=tuple(survivors),
        smallest_p=min(finite, default=NAN),
        threshold=ALPHA / m if m else NAN,
        resolution=_resolution(r for _, _, runs in cells for r in runs),
    )
    return rows, declared


def _count_title(metric: str, field_name: str, at_step0: bool) -> str:
    where = (
        "step 0, every distinct initial model x layer"
        if at_step0
        else "final step, every MoE condition x layer x run"
    )
    return f"runs above their permutation null ({field_name}, {metric}): {where}"


def final_counts(
    groups: Mapping[str, Sequence[RunResult]],
) -> tuple[dict[tuple[str, int], list[SummaryRow]], list[Family]]:
    cells = [
        (g, layer, runs)
        for g, runs in groups.items()
        if is_moe(runs) and not is_reference(runs)
        for layer in layers_of(runs)
    ]
    out: dict[tuple[str, int], list[SummaryRow]] = {
        (g, layer): [] for g, runs in groups.items() if is_moe(runs) for layer in layers_of(runs)
    }
    return out, count_families(cells, False, out)


def count_families(
    cells: Sequence[Cell], at_step0: bool, into: dict[tuple[str, int], list[SummaryRow]]
) -> list[Family]:
    """Per :data:`ABOVE_NULL` column, one count row per (label, layer, runs) cell, appended to
    ``into[(label, layer)]``, and its family (``final_<metric>`` or ``step0_<metric>``)."""
    prefix = "step0" if at_step0 else "final"
    families = []
    for metric, field_name in ABOVE_NULL.items():
        rows, family = _count_rows(cells, metric, field_name, at_step0, f"{prefix}_{metric}")
        for (label, layer, _), row in zip(cells, rows, strict=True):
            into[(label, layer)].append(row)
        families.append(family)
    return families


def _detectable(row: SummaryRow, m: int) -> float:
    """The effect the row's test detects with POWER power at ALPHA / m, at its n and the SD of
    its per-seed values (a fold change for ``log_t``; NaN for Welch and untested rows)."""
    values = _seed_values(row)
    if len(values) < 2:
        return NAN
    effect = detectable_effect(len(values), float(values.std(ddof=1)), ALPHA / max(m, 1), POWER)
    return exp_or_inf(effect) if row.method == "log_t" else effect


def _seed_values(row: SummaryRow) -> np.ndarray:
    """The per-seed values the row's t-test reads (log-ratios for ``log_t``), NaNs dropped;
    empty for other methods."""
    values = np.asarray(row.values, dtype=np.float64)
    if row.method == "log_t":
        values = np.log(values[values > 0])
    elif row.method not in ("t", "paired_t"):
        return values[:0]
    return values[~np.isnan(values)]


def _family_power(tested: Sequence[SummaryRow], m: int) -> tuple[int, float, float]:
    """(fewest seeds, pooled SD, detectable effect at them) of a family's seed-level t-tests;
    (0, NaN, NaN) when none has 2 values."""
    samples = [v for v in map(_seed_values, tested) if len(v) >= 2]
    if not samples:
        return 0, NAN, NAN
    n = min(len(v) for v in samples)
    sd = math.sqrt(float(np.mean([v.var(ddof=1) for v in samples])))
    effect = detectable_effect(n, sd, ALPHA / max(m, 1), POWER)
    return n, sd, exp_or_inf(effect) if tested[0].method == "log_t" else effect


def with_holm(rows: list[SummaryRow]) -> tuple[list[SummaryRow], list[Family]]:
    """Each tested (non-count) row's p_holm over its family and its detectable effect; the
    families of those rows, in first-row order."""
    members: dict[str, list[int]] = {}
    for n, row in enumerate(rows):
        if row.family and row.method != "count":
            members.setdefault(row.family, []).append(n)
    out, families = list(rows), []
    for name, indices in members.items():
        adjusted = holm([rows[n].p for n in indices])
        m = sum(not math.isnan(rows[n].p) for n in indices)
        for n, p_holm in zip(indices, adjusted, strict=True):
            out[n] = replace(rows[n], p_holm=p_holm, detectable=_detectable(rows[n], m))
        tested = [out[n] for n in indices if not math.isnan(out[n].p)]
        key = lambda r: (r.group, r.layer, r.metric, None)  # noqa: E731
        n_seeds, pooled_sd, detectable = _family_power(tested, m)
        families.append(
            Family(
                name=name,
                title=FAMILY_TITLES.get(name, name),
                m=m,
                tests=tuple(key(r) for r in tested),
                survivors=tuple(key(r) for r in tested if r.p_holm < ALPHA),
                smallest_p=min((r.p for r in tested), default=NAN),
                threshold=ALPHA / m if m else NAN,
                n_seeds=n_seeds,
                pooled_sd=pooled_sd,
                detectable=detectable,
            )
        )
    return out, families


def resolution_warnings(families: Sequence[Family]) -> list[str]:
    """A warning for each permutation family whose smallest possible p, 1 / (1 + K), cannot
    pass Holm's first threshold ALPHA / m: no run could count, whatever the data."""
    return [
        f"{f.name}: Holm over the {f.m} run x layer tests can count no run: with K "
        f"permutations the smallest possible p is 1/(1+K) = {f.resolution:.3g}, not below "
        f"{ALPHA}/{f.m} = {f.threshold:.3g}; raise the permutation count K"
        for f in families
        if f.m and not math.isnan(f.resolution) and f.resolution >= f.threshold
    ]
