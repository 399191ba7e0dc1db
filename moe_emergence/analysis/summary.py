"""The sweep summary of ``python -m moe_emergence.analyze``: runs grouped over seeds (the unit of
replication across runs), each metric as mean, 95% Student t-interval and per-seed values over a
group's runs, tests against 0 with Holm-adjusted p-values over each table's family.

Groups: the runs with equal :attr:`RunResult.group` (same overrides, seeds apart), runs in seed
order. Rows (:data:`COLUMNS`; ``values``/``seeds``: one per run of the group in seed order, NaN
where a run lacks the value; ``p``/``p_holm``: NaN on rows that test nothing):

routing, per MoE layer of MoE groups (values at each run's final checkpoint)
    :data:`ROUTING_METRICS`, fields of :class:`LayerScores` (``t``, no p);
    ``<m>_step0`` and ``<m>_change`` (final minus step 0, per run) for m in
    :data:`STEP0_METRICS`, over the runs with a step-0 checkpoint (``checkpoints[0].step == 0``);
    the change rows have p (one-sample t against 0) and p_holm over all groups x layers of the
    same metric;
    ``above_null``/``cond_mi_above_null`` (final) and ``above_null_step0``/
    ``cond_mi_above_null_step0``: method ``count``, mean = the number of runs (of n) whose
    document-level permutation p-value (``null_p``/``cond_mi_null_p``) is below
    :data:`ALPHA` after Holm over all MoE groups x layers x runs of that column; values: each
    run's Holm-adjusted p-value.
held-out loss (nats), every group with losses, ``layer`` empty
    ``loss_<domain>``, ``ppl_<domain>`` (mean of the per-run exp(loss)), ``loss`` (each run's
    token-weighted mean over its domains); no p.
MoE minus dense, every MoE group with a dense twin (:func:`dense_twins`)
    ``loss_<domain>_minus_dense``, ``loss_minus_dense``: ``paired_t`` over per-seed
    differences when both groups have the same seeds (values, seeds: the differences and their
    seeds), else ``welch_t`` (values, seeds empty); p_holm over all MoE groups x (domains,
    overall).
direct contrasts, every pair of groups A < B (by name), group ``"A - B"`` (:attr:`contrasts`)
    ``loss_<domain>``, ``loss`` (A minus B; paired or Welch as above; p_holm over all pairs x
    (domains, overall)); for two MoE groups ``nmi_change`` per shared layer (A's change from
    step 0 minus B's; p_holm over all MoE pairs x layers).

The numbers only: :func:`summarize` returns them as a :class:`Summary`;
:mod:`moe_emergence.analysis.summary_files` renders them (summary.csv, summary.json,
summary.md) and draws the sweep figures.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from moe_emergence.analysis.intervals import (
    Interval,
    difference_interval,
    holm,
    mean_interval,
    paired_difference_interval,
)
from moe_emergence.analysis.results import (
    CheckpointResult,
    RunResult,
    group_runs,
    split_override,
)

__all__ = [
    "ALPHA",
    "COLUMNS",
    "CONFIDENCE",
    "ROUTING_METRICS",
    "STEP0_METRICS",
    "GroupInfo",
    "Summary",
    "SummaryRow",
    "dense_twins",
    "group_runs",
    "summarize",
]

CONFIDENCE = 0.95
ALPHA = 0.05  # a run is above its null when its Holm-adjusted permutation p is below this
COLUMNS = (
    "group",
    "layer",
    "metric",
    "n",
    "mean",
    "ci_low",
    "ci_high",
    "method",
    "p",
    "p_holm",
    "seeds",
    "values",
)
# Each run's value in the row's ``values``: nmi_low / nmi_high are the runs' probe intervals
# (documents resampled), null_p / cond_mi_null_p their document-level permutation p-values.
ROUTING_METRICS = (
    "nmi",
    "nmi_low",
    "nmi_high",
    "null_p95",
    "null_mean",
    "null_p",
    "cond_mi",
    "cond_mi_null_p95",
    "cond_mi_null_mean",
    "cond_mi_null_p",
    "token_id_nmi",
    "domain_only_nmi",
    "usage_entropy",
    "router_entropy",
)
STEP0_METRICS = ("nmi", "cond_mi", "token_id_nmi", "domain_only_nmi")
# count metric -> (the LayerScores p-value field, whether at step 0 instead of the final)
ABOVE_NULL = {
    "above_null": ("null_p", False),
    "cond_mi_above_null": ("cond_mi_null_p", False),
    "above_null_step0": ("null_p", True),
    "cond_mi_above_null_step0": ("cond_mi_null_p", True),
}
TWIN_FREE_KEYS = ("condition", "model", "experiment")  # and every key under ``model.``
NAN = float("nan")


@dataclass(frozen=True)
class SummaryRow:
    """One group (or contrast ``"A - B"``) x layer x metric. layer: the MoE layer or None.
    n: runs (or seed pairs) with a value; mean, ci_low, ci_high: NaN where undefined; method:
    ``t``, ``paired_t``, ``welch_t``, ``none`` (n <= 1) or ``count``; p, p_holm: two-sided
    p against 0 and its Holm adjustment (NaN on rows that test nothing); seeds, values: the
    per-seed values in seed order (NaN where a run lacks one; empty for Welch rows)."""

    group: str
    layer: int | None
    metric: str
    n: int
    mean: float
    ci_low: float
    ci_high: float
    method: str
    p: float = NAN
    p_holm: float = NAN
    seeds: tuple[int | None, ...] = ()
    values: tuple[float, ...] = ()

    @classmethod
    def of(
        cls,
        group: str,
        layer: int | None,
        metric: str,
        interval: Interval,
        seeds: Sequence[int | None] = (),
        values: Sequence[float] = (),
        test: bool = False,
    ) -> SummaryRow:
        """A row of ``interval``; its p kept only when ``test`` (a change or a difference)."""
        i = interval
        values = tuple(float(v) for v in values)
        p = i.p if test else NAN
        row = (i.n, i.mean, i.ci_low, i.ci_high, i.method, p, NAN, tuple(seeds), values)
        return cls(group, layer, metric, *row)


@dataclass(frozen=True)
class GroupInfo:
    """One group: its runs' names, seeds, final steps and whether each has a step-0 checkpoint
    (in run order), whether it is MoE, and its dense twin's group (None when it has none)."""

    runs: list[str]
    seeds: list[int | None]
    moe: bool
    final_steps: list[int]
    dense_twin: str | None
    has_step0: list[bool] = field(default_factory=list)


@dataclass(frozen=True)
class Summary:
    """The rows (groups in name order, each: layers, then losses, then MoE - dense; then the
    direct contrasts), the groups, the contrasts (``"A - B"`` -> (A, B)), and the warnings (one
    sentence each)."""

    rows: list[SummaryRow]
    groups: dict[str, GroupInfo]
    warnings: list[str] = field(default_factory=list)
    contrasts: dict[str, tuple[str, str]] = field(default_factory=dict)

    def row(self, group: str, metric: str, layer: int | None = None) -> SummaryRow | None:
        """The row of ``group`` (or contrast label) x ``layer`` x ``metric``, or None."""
        for r in self.rows:
            if (r.group, r.layer, r.metric) == (group, layer, metric):
                return r
        return None


# ----------------------------------------------------------------------------- groups


def _parse_overrides(overrides: Sequence[str]) -> dict[str, str]:
    """``key=value`` strings as a dict of bare keys (:func:`split_override`)."""
    return dict(split_override(item) for item in overrides)


def _twin_free(key: str) -> bool:
    return key in TWIN_FREE_KEYS or key.startswith("model.")


def _differing_keys(a: Mapping[str, str], b: Mapping[str, str]) -> set[str] | None:
    """The keys on which two overrides differ (missing on one side counts), or None when one
    of them is not allowed to differ between an MoE group and its dense twin."""
    keys = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k) or (k in a) != (k in b)}
    return keys if all(_twin_free(k) for k in keys) else None


def dense_twins(
    groups: Mapping[str, Sequence[RunResult]],
) -> tuple[dict[str, str | None], list[str]]:
    """(MoE group -> its dense twin or None, warnings). A twin is a non-MoE group whose
    overrides differ only in ``condition``, ``model``, ``experiment`` or ``model.*`` keys; of
    several, the one with fewest differing keys; a tie: none, and a warning naming them."""
    overrides = {g: _parse_overrides(runs[0].overrides) for g, runs in groups.items()}
    dense = [g for g, runs in groups.items() if not _is_moe(runs)]
    twins: dict[str, str | None] = {}
    warnings: list[str] = []
    for g, runs in groups.items():
        if not _is_moe(runs):
            continue
        found = {d: _differing_keys(overrides[g], overrides[d]) for d in dense}
        found = {d: len(keys) for d, keys in found.items() if keys is not None}
        fewest = min(found.values(), default=None)
        best = [d for d, n in found.items() if n == fewest]
        twins[g] = best[0] if len(best) == 1 else None
        if len(best) > 1:
            warnings.append(
                f"group {g!r}: several dense twins equally close ({', '.join(map(repr, best))});"
                " no MoE - dense rows for it"
            )
    return twins, warnings


def _is_moe(runs: Sequence[RunResult]) -> bool:
    return any(run.moe for run in runs)


def _step0(run: RunResult) -> CheckpointResult | None:
    """The run's step-0 checkpoint (its first, when that is at step 0), else None."""
    first = run.checkpoints[0] if run.checkpoints else None
    return first if first is not None and first.step == 0 else None


def _step_warnings(groups: Mapping[str, Sequence[RunResult]]) -> list[str]:
    out = []
    for g, runs in groups.items():
        steps = sorted({run.final.step for run in runs})
        if len(steps) > 1:
            out.append(
                f"group {g!r}: runs end at different steps {steps}; values are taken at each "
                "run's final checkpoint anyway"
            )
        missing = sum(_step0(r) is None for r in runs)
        if _is_moe(runs) and missing:
            out.append(
                f"group {g!r}: {missing} of {len(runs)} runs have no step-0 checkpoint; the "
                "step-0 and change rows rest on the others"
            )
    return out


def _shared_seeds(a: Sequence[RunResult], b: Sequence[RunResult]) -> list[int] | None:
    """The seeds, sorted, when both groups have exactly the same seeds (each once, none
    missing): their runs pair by seed. Else None (unpaired)."""
    sa, sb = [r.seed for r in a], [r.seed for r in b]
    if None in sa or None in sb or len(set(sa)) != len(sa) or len(set(sb)) != len(sb):
        return None
    return sorted(sa) if set(sa) == set(sb) else None


# ----------------------------------------------------------------------------- per-run values

RunValue = Callable[[RunResult], float]


def _layers(runs: Sequence[RunResult]) -> list[int]:
    return sorted({layer for run in runs for layer in run.layers})


def _domains(runs: Iterable[RunResult]) -> list[str]:
    """The domains with a final held-out loss in any run, in the runs' domain order."""
    seen: dict[str, None] = {}
    for run in runs:
        losses = run.final.losses
        for d in [*run.domains, *losses]:
            if d in losses:
                seen.setdefault(d, None)
    return list(seen)


def _score(checkpoint: CheckpointResult | None, layer: int, metric: str) -> float:
    scores = None if checkpoint is None else checkpoint.scores.get(layer)
    return NAN if scores is None else float(getattr(scores, metric))


def _final(layer: int, metric: str) -> RunValue:
    return lambda run: _score(run.final, layer, metric)


def _at_step0(layer: int, metric: str) -> RunValue:
    return lambda run: _score(_step0(run), layer, metric)


def _change(layer: int, metric: str) -> RunValue:
    """Final minus step 0 of one run (NaN without a step-0 checkpoint)."""
    return lambda run: _score(run.final, layer, metric) - _score(_step0(run), layer, metric)


def _loss(domain: str) -> RunValue:
    def get(run: RunResult) -> float:
        held = run.final.losses.get(domain)
        return NAN if held is None else held.loss

    return get


def _overall_loss(run: RunResult) -> float:
    """sum(loss * tokens) / sum(tokens) over the run's final held-out domains; NaN if none."""
    losses = run.final.losses.values()
    tokens = sum(h.tokens for h in losses)
    return sum(h.loss * h.tokens for h in losses) / tokens if tokens > 0 else NAN


def _exp(value: float) -> float:
    """exp(value); inf past float range (a diverged run), NaN for NaN."""
    try:
        return math.exp(value)
    except OverflowError:
        return math.inf


# ----------------------------------------------------------------------------- rows


def _level(
    group: str, layer: int | None, metric: str, runs: Sequence[RunResult], get: RunValue
) -> SummaryRow:
    """Mean and t-interval over the group's runs, per-seed values; no test."""
    values = [get(r) for r in runs]
    i = mean_interval(values, confidence=CONFIDENCE)
    return SummaryRow.of(group, layer, metric, i, [r.seed for r in runs], values)


def _tested(
    group: str, layer: int | None, metric: str, runs: Sequence[RunResult], get: RunValue
) -> SummaryRow:
    """As :func:`_level`, with the one-sample t-test's p against 0."""
    values = [get(r) for r in runs]
    i = mean_interval(values, confidence=CONFIDENCE)
    return SummaryRow.of(group, layer, metric, i, [r.seed for r in runs], values, test=True)


def _difference(
    group: str,
    layer: int | None,
    metric: str,
    a: Sequence[RunResult],
    b: Sequence[RunResult],
    get: RunValue,
) -> SummaryRow:
    """``get`` of ``a`` minus ``get`` of ``b``: paired by seed when the groups share their
    seeds (values: the per-seed differences), else Welch (no values)."""
    seeds = _shared_seeds(a, b)
    if seeds is None:
        i = difference_interval([get(r) for r in a], [get(r) for r in b], confidence=CONFIDENCE)
        return SummaryRow.of(group, layer, metric, i, test=True)
    by_a, by_b = {r.seed: get(r) for r in a}, {r.seed: get(r) for r in b}
    x, y = [by_a[s] for s in seeds], [by_b[s] for s in seeds]
    i = paired_difference_interval(x, y, confidence=CONFIDENCE)
    diffs = [p - q for p, q in zip(x, y, strict=True)]
    return SummaryRow.of(group, layer, metric, i, seeds, diffs, test=True)


def _null_counts(
    groups: Mapping[str, Sequence[RunResult]],
) -> tuple[dict[tuple[str, int], list[SummaryRow]], list[str]]:
    """The ``count`` rows of :data:`ABOVE_NULL` per (MoE group, layer), each family (one
    metric, all groups x layers x runs) Holm-adjusted as one; and a warning for each family
    whose smallest p-value cannot pass Holm (too few permutations for its size)."""
    cells = [
        (g, layer, runs) for g, runs in groups.items() if _is_moe(runs) for layer in _layers(runs)
    ]
    out: dict[tuple[str, int], list[SummaryRow]] = {(g, layer): [] for g, layer, _ in cells}
    warnings = []
    for metric, (field_name, at_step0) in ABOVE_NULL.items():
        get = _at_step0 if at_step0 else _final
        raw = [[get(layer, field_name)(r) for r in runs] for _, layer, runs in cells]
        flat = holm([p for ps in raw for p in ps])
        start = 0
        for (g, layer, runs), ps in zip(cells, raw, strict=True):
            adjusted = flat[start : start + len(ps)]
            start += len(ps)
            tested = [p for p in adjusted if not math.isnan(p)]
            count = float(sum(p < ALPHA for p in tested)) if tested else NAN
            out[(g, layer)].append(
                SummaryRow(
                    g,
                    layer,
                    metric,
                    len(tested),
                    count,
                    NAN,
                    NAN,
                    "count",
                    seeds=tuple(r.seed for r in runs),
                    values=tuple(adjusted),
                )
            )
        finite = [p for ps in raw for p in ps if not math.isnan(p)]
        if finite and min(finite) < ALPHA <= len(finite) * min(finite):
            warnings.append(
                f"{metric}: Holm over the {len(finite)} run x layer tests of {field_name} can "
                f"count no run (smallest p-value {min(finite):.3g}; Holm needs one below "
                f"{ALPHA / len(finite):.3g}); a permutation p-value is at least 1/(1 + K): "
                "raise the permutation count K"
            )
    return out, warnings


def _routing_rows(
    group: str, runs: Sequence[RunResult], counts: Mapping[tuple[str, int], list[SummaryRow]]
) -> list[SummaryRow]:
    rows = []
    for layer in _layers(runs):
        rows += [_level(group, layer, m, runs, _final(layer, m)) for m in ROUTING_METRICS]
        for m in STEP0_METRICS:
            rows.append(_level(group, layer, f"{m}_step0", runs, _at_step0(layer, m)))
            rows.append(_tested(group, layer, f"{m}_change", runs, _change(layer, m)))
        rows += counts[(group, layer)]
    return rows


def _loss_rows(group: str, runs: Sequence[RunResult]) -> list[SummaryRow]:
    rows = []
    for d in _domains(runs):
        rows.append(_level(group, None, f"loss_{d}", runs, _loss(d)))
        get = _loss(d)
        rows.append(_level(group, None, f"ppl_{d}", runs, lambda r, get=get: _exp(get(r))))
    if rows:
        rows.append(_level(group, None, "loss", runs, _overall_loss))
    return rows


def _loss_differences(
    label: str, a: Sequence[RunResult], b: Sequence[RunResult], suffix: str
) -> list[SummaryRow]:
    """``loss_<domain><suffix>`` per domain both have, then ``loss<suffix>``: a minus b."""
    b_domains = set(_domains(b))
    rows = [
        _difference(label, None, f"loss_{d}{suffix}", a, b, _loss(d))
        for d in _domains(a)
        if d in b_domains
    ]
    if rows:
        rows.append(_difference(label, None, f"loss{suffix}", a, b, _overall_loss))
    return rows


def _contrast_rows(
    groups: Mapping[str, Sequence[RunResult]],
) -> tuple[list[SummaryRow], dict[str, tuple[str, str]]]:
    rows, contrasts = [], {}
    for a, b in itertools.combinations(sorted(groups), 2):
        label = f"{a} - {b}"
        contrasts[label] = (a, b)
        rows += _loss_differences(label, groups[a], groups[b], "")
        if _is_moe(groups[a]) and _is_moe(groups[b]):
            shared = sorted(set(_layers(groups[a])) & set(_layers(groups[b])))
            rows += [
                _difference(label, layer, "nmi_change", groups[a], groups[b], _change(layer, "nmi"))
                for layer in shared
            ]
    return rows, contrasts


def _family(row: SummaryRow, contrasts: Mapping[str, tuple[str, str]]) -> str | None:
    """The Holm family of a tested row (the p_holm families the module docstring lists),
    None for the others."""
    if row.group in contrasts:
        return "contrast_loss" if row.metric.startswith("loss") else f"contrast_{row.metric}"
    if row.metric.endswith("_minus_dense"):
        return "minus_dense"
    if row.metric.endswith("_change"):
        return row.metric
    return None


def _with_holm(
    rows: list[SummaryRow], contrasts: Mapping[str, tuple[str, str]]
) -> list[SummaryRow]:
    families: dict[str, list[int]] = {}
    for n, row in enumerate(rows):
        if (family := _family(row, contrasts)) is not None:
            families.setdefault(family, []).append(n)
    out = list(rows)
    for members in families.values():
        for n, adjusted in zip(members, holm([rows[n].p for n in members]), strict=True):
            out[n] = replace(rows[n], p_holm=adjusted)
    return out


def summarize(results: Sequence[RunResult]) -> Summary:
    """The summary rows, groups, contrasts and warnings of ``results`` (each run with >= 1
    checkpoint). Raises ValueError for no runs."""
    if not results:
        raise ValueError("no runs to summarise: results is empty")
    groups = group_runs(results)
    twins, warnings = dense_twins(groups)
    counts, null_warnings = _null_counts(groups)
    warnings = _step_warnings(groups) + warnings + null_warnings
    rows: list[SummaryRow] = []
    for g, runs in groups.items():
        if _is_moe(runs):
            rows += _routing_rows(g, runs, counts)
        rows += _loss_rows(g, runs)
        if (twin := twins.get(g)) is not None:
            rows += _loss_differences(g, runs, groups[twin], "_minus_dense")
    contrast_rows, contrasts = _contrast_rows(groups)
    rows = _with_holm(rows + contrast_rows, contrasts)
    info = {
        g: GroupInfo(
            runs=[r.name for r in runs],
            seeds=[r.seed for r in runs],
            moe=_is_moe(runs),
            final_steps=[r.final.step for r in runs],
            dense_twin=twins.get(g),
            has_step0=[_step0(r) is not None for r in runs],
        )
        for g, runs in groups.items()
    }
    return Summary(rows, info, warnings, contrasts)
