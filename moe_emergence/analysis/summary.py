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

Files (:func:`write_summary`): summary.csv (``seeds``/``values`` ';'-joined, NaN as ``nan``;
other NaNs as empty cells), summary.json (NaN as null), summary.md and the sweep figures
(:mod:`moe_emergence.analysis.sweep_plots`), each written to a temp name and renamed.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from moe_emergence.analysis import sweep_plots
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
from moe_emergence.analysis.tables import write_table

__all__ = [
    "ALPHA",
    "COLUMNS",
    "CONFIDENCE",
    "FEW_SEEDS",
    "ROUTING_METRICS",
    "STEP0_METRICS",
    "GroupInfo",
    "Summary",
    "SummaryFiles",
    "SummaryRow",
    "dense_twins",
    "group_runs",
    "render_markdown",
    "summarize",
    "write_summary",
]

CONFIDENCE = 0.95
ALPHA = 0.05  # a run is above its null when its Holm-adjusted permutation p is below this
FEW_SEEDS = 5  # below this many runs, summary.md shows the per-seed values beside the mean
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
INTERVAL_TEXT = (
    f"{CONFIDENCE:.0%} interval of the mean over a group's runs (seeds): Student's t with n - 1 "
    "df (paired differences: per shared seed, pairs - 1 df; unpaired differences: Welch's df); "
    "a single run has none. A t-interval of a non-negative score (NMI, MI) can reach below 0 "
    "with few seeds; it is not clipped."
)
P_TEXT = (
    "p: two-sided t-test against 0 (change and difference rows only). p_holm: Holm-adjusted over "
    "the family a table reads: all groups x layers of one <m>_change metric; all MoE groups x "
    "(domains, overall) of MoE - dense; all pairs x (domains, overall) of the direct loss "
    "contrasts; all MoE pairs x layers of the direct nmi_change contrasts."
)
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


@dataclass(frozen=True)
class SummaryFiles:
    """What :func:`write_summary` wrote (figures: those there was something to draw for) and
    the summary's warnings."""

    csv: Path
    json: Path
    markdown: Path
    figures: list[Path]
    warnings: list[str]


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
    """The Holm family of a tested row (see :data:`P_TEXT`), None for the others."""
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


# ----------------------------------------------------------------------------- markdown


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _num(value: float, fmt: str) -> str:
    return "-" if math.isnan(value) else f"{value:{fmt}}"


def _interval_text(row: SummaryRow | None, fmt: str) -> str:
    """``mean [low, high]`` in ``fmt``, then ``(v1, v2, ...)`` the per-seed values when
    2 <= n < :data:`FEW_SEEDS`; ``mean (n=1)``; or ``-``."""
    if row is None or row.n == 0 or math.isnan(row.mean):
        return "-"
    if math.isnan(row.ci_low) or math.isnan(row.ci_high):
        return f"{row.mean:{fmt}} (n={row.n})"
    text = f"{row.mean:{fmt}} [{row.ci_low:{fmt}}, {row.ci_high:{fmt}}]"
    if row.n < FEW_SEEDS and row.values:
        text += " (" + ", ".join(_num(v, fmt) for v in row.values) + ")"
    return text


def _p_text(p: float) -> str:
    return "-" if math.isnan(p) else f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _p_pair(row: SummaryRow | None) -> str:
    return "-" if row is None else f"{_p_text(row.p)} / {_p_text(row.p_holm)}"


def _table(header: Sequence[str], lines: Iterable[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(line) + " |" for line in lines]


def _runs_above(row: SummaryRow | None) -> str:
    """``k/n`` of a count row (runs above their null after Holm), ``-`` without one."""
    return f"{round(row.mean)}/{row.n}" if row is not None and row.n else "-"


def _mean_text(row: SummaryRow | None) -> str:
    return "-" if row is None or row.n == 0 else _num(row.mean, ".4f")


def _moe_layers(summary: Summary) -> list[tuple[str, int]]:
    return [
        (g, layer)
        for g, info in summary.groups.items()
        if info.moe
        for layer in sorted({r.layer for r in summary.rows if r.group == g and r.layer is not None})
    ]


def _routing_tables(summary: Summary) -> tuple[list[str], list[str]]:
    """(NMI against its null and step 0, the controls), both per MoE group x layer."""
    nmi, controls = [], []
    for g, layer in _moe_layers(summary):
        row = lambda metric, g=g, layer=layer: summary.row(g, metric, layer)  # noqa: E731
        nmi.append(
            [
                _cell(g),
                str(layer),
                _interval_text(row("nmi_step0"), ".4f"),
                _interval_text(row("nmi"), ".4f"),
                _interval_text(row("nmi_change"), ".4f"),
                _p_pair(row("nmi_change")),
                _mean_text(row("null_p95")),
                _runs_above(row("above_null")),
                _runs_above(row("above_null_step0")),
            ]
        )
        controls.append(
            [
                _cell(g),
                str(layer),
                _interval_text(row("token_id_nmi"), ".4f"),
                _interval_text(row("domain_only_nmi"), ".4f"),
                _interval_text(row("cond_mi"), ".4f"),
                _mean_text(row("cond_mi_null_p95")),
                _runs_above(row("cond_mi_above_null")),
                _runs_above(row("cond_mi_above_null_step0")),
            ]
        )
    if not nmi:
        return [], []
    return (
        _table(
            [
                "group",
                "layer",
                "NMI step 0",
                "NMI final",
                "change [95% CI]",
                "p / p_holm",
                "null p95 (mean)",
                "runs > null (final)",
                "runs > null (step 0)",
            ],
            nmi,
        ),
        _table(
            [
                "group",
                "layer",
                "token-id NMI",
                "domain-only NMI",
                "cond. MI (nats)",
                "cond. MI null p95 (mean)",
                "runs > null (final)",
                "runs > null (step 0)",
            ],
            controls,
        ),
    )


def _loss_domains(summary: Summary, groups: Iterable[str], suffix: str = "") -> list[str]:
    """The domains of the ``loss_<domain><suffix>`` rows of ``groups``, in row order (suffix
    "" or ``_minus_dense``; with "" the ``_minus_dense`` rows are not domains)."""
    groups = set(groups)
    seen: dict[str, None] = {}
    for r in summary.rows:
        m = r.metric
        if r.group not in groups or not m.startswith("loss_") or m == f"loss{suffix}":
            continue
        if m.endswith("_minus_dense") == (suffix == "_minus_dense"):
            seen.setdefault(m.removeprefix("loss_").removesuffix(suffix), None)
    return list(seen)


def _loss_table(summary: Summary) -> list[str]:
    groups = [g for g in summary.groups if summary.row(g, "loss")]
    domains = _loss_domains(summary, groups)
    lines = [
        [
            _cell(g),
            *[_interval_text(summary.row(g, f"loss_{d}"), ".3f") for d in domains],
            _interval_text(summary.row(g, "loss"), ".3f"),
        ]
        for g in groups
    ]
    header = ["group", *[_cell(d) for d in domains], "overall (token-weighted)"]
    return _table(header, lines) if lines else []


def _difference_line(label: list[str], row: SummaryRow, fmt: str) -> list[str]:
    return [*label, _interval_text(row, fmt), row.method, _p_text(row.p), _p_text(row.p_holm)]


def _minus_dense_table(summary: Summary) -> list[str]:
    lines = []
    for g, info in summary.groups.items():
        domains = _loss_domains(summary, [g], "_minus_dense")
        for d, metric in [
            *((d, f"loss_{d}_minus_dense") for d in domains),
            ("overall", "loss_minus_dense"),
        ]:
            if (row := summary.row(g, metric)) is not None:
                label = [_cell(g), _cell(info.dense_twin or ""), _cell(d)]
                lines.append(_difference_line(label, row, ".3f"))
    header = ["group", "dense twin", "domain", "MoE - dense [95% CI]", "method", "p", "p_holm"]
    return _table(header, lines) if lines else []


def _contrast_tables(summary: Summary) -> tuple[list[str], list[str]]:
    """(held-out loss contrasts, NMI-change contrasts) of every pair of groups."""
    losses, changes = [], []
    for label in summary.contrasts:
        domains = _loss_domains(summary, [label])
        for d, metric in [*((d, f"loss_{d}") for d in domains), ("overall", "loss")]:
            if (row := summary.row(label, metric)) is not None:
                losses.append(_difference_line([_cell(label), _cell(d)], row, ".3f"))
        for r in summary.rows:
            if r.group == label and r.metric == "nmi_change":
                changes.append(_difference_line([_cell(label), str(r.layer)], r, ".4f"))
    tail = ["method", "p", "p_holm"]
    return (
        _table(["A - B", "domain", "loss A - loss B [95% CI]", *tail], losses) if losses else [],
        _table(["A - B", "layer", "NMI change A - B [95% CI]", *tail], changes) if changes else [],
    )


def render_markdown(summary: Summary) -> str:
    """summary.md's text: a line on n, the unit of replication, intervals and p-values, then
    the routing (NMI, controls), held-out loss (nats), MoE - dense and direct contrast tables
    (those that have rows). NMI 4 decimals, losses 3; per-seed values in parentheses below
    :data:`FEW_SEEDS` runs; ``(n=1)`` where a single run gives no interval."""
    runs = ", ".join(f"`{_cell(g)}` {len(i.runs)}" for g, i in summary.groups.items())
    out = [
        f"Runs per group (n): {runs}. Values at each run's final checkpoint; step 0 where a run "
        "has a step-0 checkpoint. Unit of replication: the seed across runs (every interval and "
        "p below is over a group's runs); the document inside a run (the permutation nulls and "
        f"each run's probe intervals). Cells: mean [{CONFIDENCE:.0%} interval] "
        f"(per-seed values, seed order, when n < {FEW_SEEDS}); {INTERVAL_TEXT} {P_TEXT} "
        f"Runs > null: runs whose document-level permutation p-value is below {ALPHA} after "
        "Holm over all groups x layers x runs of that column. `(n=1)`: one run, no interval.",
        "",
    ]
    nmi, controls = _routing_tables(summary)
    loss_contrasts, nmi_contrasts = _contrast_tables(summary)
    sections = [
        (
            "Routing: NMI = I(domain; expert) / H(domain), eval mode, fixed probe; change = final "
            "- step 0 per run, p_holm over this table",
            nmi,
        ),
        (
            "Routing controls at the final checkpoint: cross-fitted token-id and domain-only "
            "routers' NMI; I(domain; expert | token) against its null",
            controls,
        ),
        ("Held-out loss (nats per token)", _loss_table(summary)),
        (
            "MoE - dense held-out loss (nats per token; p_holm over this table)",
            _minus_dense_table(summary),
        ),
        (
            "Direct contrasts: held-out loss A - B (nats per token; p_holm over this table)",
            loss_contrasts,
        ),
        ("Direct contrasts: NMI change from step 0, A - B (p_holm over this table)", nmi_contrasts),
    ]
    for title, table in sections:
        if table:
            out += [f"## {title}", "", *table, ""]
    if summary.warnings:
        out += ["## Warnings", "", *[f"- {w}" for w in summary.warnings], ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- files


def _nan_to_none(value: object) -> object:
    """Non-finite floats (NaN, a diverged run's inf) as None, inside tuples too: JSON has no
    NaN."""
    if isinstance(value, tuple | list):
        return [_nan_to_none(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _csv_cell(value: object) -> object:
    if isinstance(value, tuple | list):
        return ";".join("" if v is None else repr(v) for v in value)
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _json_document(summary: Summary) -> dict:
    rows = [{k: _nan_to_none(v) for k, v in asdict(r).items()} for r in summary.rows]
    return {
        "rows": rows,
        "groups": {g: asdict(info) for g, info in summary.groups.items()},
        "contrasts": {label: list(pair) for label, pair in summary.contrasts.items()},
        "confidence": CONFIDENCE,
        "alpha": ALPHA,
        "interval": INTERVAL_TEXT,
        "p_values": P_TEXT,
        "warnings": summary.warnings,
    }


def _write_text(path: Path, text: str) -> Path:
    """Write ``text`` whole: a temp file in the same folder, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _write_figures(results: Sequence[RunResult], summary: Summary, out_dir: Path) -> list[Path]:
    figures = []
    if any(info.moe for info in summary.groups.values()):
        figures.append(sweep_plots.plot_sweep_emergence(results, out_dir / "emergence.png"))
        figures.append(sweep_plots.plot_sweep_heatmaps(results, out_dir / "heatmaps.png"))
    if any(r.metric == "loss" for r in summary.rows if r.group in summary.groups):
        figures.append(sweep_plots.plot_held_out_loss(results, out_dir / "held_out_loss.png"))
    return figures


def write_summary(
    results: Sequence[RunResult], out_dir: str | os.PathLike, figures: bool = True
) -> SummaryFiles:
    """Write summary.csv (NaN as empty cells; seeds and values ';'-joined, NaN as ``nan``),
    summary.json (NaN as null), summary.md and, unless ``figures`` is False, emergence.png and
    heatmaps.png (with MoE groups) and held_out_loss.png (with losses) into ``out_dir``.
    Returns the paths and the warnings."""
    out = Path(out_dir)
    summary = summarize(results)
    csv_rows = [{k: _csv_cell(v) for k, v in asdict(r).items()} for r in summary.rows]
    csv_path = write_table(out / "summary.csv", COLUMNS, csv_rows)
    text = json.dumps(_json_document(summary), indent=2, allow_nan=False)
    json_path = _write_text(out / "summary.json", text + "\n")
    md_path = _write_text(out / "summary.md", render_markdown(summary))
    pngs = _write_figures(results, summary, out) if figures else []
    return SummaryFiles(csv_path, json_path, md_path, pngs, list(summary.warnings))
