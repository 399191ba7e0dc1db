"""The sweep summary's per-run values (a :data:`RunValue` reads one number of a run: a score
at the final checkpoint or step 0, its change, a loss) and the rows built from them over a
group's runs: a level, a fold change, a difference of two groups, a share of the domain
router, the field's specialisation metrics."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

from moe_emergence.analysis.intervals import (
    difference_interval,
    fold_change_interval,
    mean_interval,
    paired_difference_interval,
)
from moe_emergence.analysis.results import CheckpointResult, RunResult
from moe_emergence.analysis.summary_groups import is_reference, shared_seeds, step0_of
from moe_emergence.analysis.summary_rows import (
    CONFIDENCE,
    NAN,
    SATURATION_METRICS,
    SPECIALISATION_METRICS,
    SummaryRow,
)

RunValue = Callable[[RunResult], float]


def layers_of(runs: Sequence[RunResult]) -> list[int]:
    return sorted({layer for run in runs for layer in run.layers})


def domains_of(runs: Iterable[RunResult]) -> list[str]:
    """The domains with a final held-out loss in any run, in the runs' domain order."""
    seen: dict[str, None] = {}
    for run in runs:
        losses = run.final.losses
        for d in [*run.domains, *losses]:
            if d in losses:
                seen.setdefault(d, None)
    return list(seen)


def _score(checkpoint: CheckpointResult | None, layer: int, metric: str) -> float:
    """The checkpoint's ``metric`` of ``layer``; NaN without the layer or that field."""
    scores = None if checkpoint is None else checkpoint.scores.get(layer)
    value = NAN if scores is None else getattr(scores, metric, NAN)
    return NAN if value is None else float(value)


def final_value(layer: int, metric: str) -> RunValue:
    return lambda run: _score(run.final, layer, metric)


def step0_value(layer: int, metric: str) -> RunValue:
    return lambda run: _score(step0_of(run), layer, metric)


def change_value(layer: int, metric: str) -> RunValue:
    """Final minus step 0 of one run (NaN without a step-0 checkpoint)."""
    return lambda run: _score(run.final, layer, metric) - _score(step0_of(run), layer, metric)


def change_bound(layer: int, side: int) -> RunValue:
    """The run's document-paired interval of NMI final - step 0: its low (0) or high (1)."""

    def get(run: RunResult) -> float:
        bounds = run.nmi_change_intervals.get(layer)
        return NAN if bounds is None else float(bounds[side])

    return get


def _specialisation(checkpoint: CheckpointResult, layer: int, metric: str) -> float:
    """The checkpoint's specialisation ``metric`` of ``layer``; NaN without it."""
    metrics = checkpoint.specialisation.get(layer)
    return NAN if metrics is None else float(getattr(metrics, metric, NAN))


def _middle(run: RunResult) -> CheckpointResult:
    """The run's middle checkpoint (of 3: the second; of 2: the first)."""
    return run.checkpoints[(len(run.checkpoints) - 1) // 2]


def _replicated(layer: int) -> RunValue:
    def get(run: RunResult) -> float:
        lists = run.final.expert_tokens.get(layer)
        return NAN if lists is None else lists.replicated_share

    return get


def specialisation_rows(group: str, layer: int, runs: Sequence[RunResult]) -> list[SummaryRow]:
    """Descriptive rows of the field's metrics (:data:`SPECIALISATION_METRICS` at the final
    checkpoint, :data:`SATURATION_METRICS` at the middle one as ``<metric>_mid``)."""
    if not any(r.final.specialisation for r in runs):
        return []
    rows = [
        level_row(group, layer, m, runs, lambda r, m=m: _specialisation(r.final, layer, m))
        for m in SPECIALISATION_METRICS
    ]
    rows += [
        level_row(
            group, layer, f"{m}_mid", runs, lambda r, m=m: _specialisation(_middle(r), layer, m)
        )
        for m in SATURATION_METRICS
    ]
    rows.append(level_row(group, layer, "expert_tokens_replicated", runs, _replicated(layer)))
    return rows


def loss_value(domain: str) -> RunValue:
    def get(run: RunResult) -> float:
        held = run.final.losses.get(domain)
        return NAN if held is None else held.loss

    return get


def overall_loss(run: RunResult) -> float:
    """sum(loss * tokens) / sum(tokens) over the run's final held-out domains; NaN if none."""
    losses = run.final.losses.values()
    tokens = sum(h.tokens for h in losses)
    return sum(h.loss * h.tokens for h in losses) / tokens if tokens > 0 else NAN


def exp_or_inf(value: float) -> float:
    """exp(value); inf past float range (a diverged run), NaN for NaN."""
    try:
        return math.exp(value)
    except OverflowError:
        return math.inf


def _ratio(a: float, b: float) -> float:
    return a / b if b != 0 and not math.isnan(b) else NAN


# ----------------------------------------------------------------------------- rows


def level_row(
    group: str, layer: int | None, metric: str, runs: Sequence[RunResult], get: RunValue
) -> SummaryRow:
    """Mean and t-interval over the group's runs, per-seed values; no test."""
    values = [get(r) for r in runs]
    i = mean_interval(values, confidence=CONFIDENCE)
    return SummaryRow.of(group, layer, metric, i, [r.seed for r in runs], values)


def fold_change_row(group: str, layer: int, runs: Sequence[RunResult]) -> SummaryRow:
    """``nmi_fold_change``: the paired log-ratio test of NMI final over NMI step 0 (family
    ``fold_change``; a reference router's is descriptive: its routing is fixed by
    construction); values: each run's fold change (NaN without a step 0)."""
    after = [final_value(layer, "nmi")(r) for r in runs]
    before = [step0_value(layer, "nmi")(r) for r in runs]
    i = fold_change_interval(after, before, confidence=CONFIDENCE)
    ratios = [_ratio(a, b) if a > 0 and b > 0 else NAN for a, b in zip(after, before, strict=True)]
    seeds = [r.seed for r in runs]
    family = "" if is_reference(runs) else "fold_change"
    return SummaryRow.of(group, layer, "nmi_fold_change", i, seeds, ratios, family=family)


def difference_row(
    group: str,
    layer: int | None,
    metric: str,
    a: Sequence[RunResult],
    b: Sequence[RunResult],
    get: RunValue,
    family: str,
) -> SummaryRow:
    """``get`` of ``a`` minus ``get`` of ``b``: paired by seed when the groups share their
    seeds (values, seeds: the per-seed differences), else Welch (no values); tested in
    ``family``."""
    seeds = shared_seeds(a, b)
    if seeds is None:
        i = difference_interval([get(r) for r in a], [get(r) for r in b], confidence=CONFIDENCE)
        return SummaryRow.of(group, layer, metric, i, family=family)
    by_a, by_b = {r.seed: get(r) for r in a}, {r.seed: get(r) for r in b}
    x, y = [by_a[s] for s in seeds], [by_b[s] for s in seeds]
    i = paired_difference_interval(x, y, confidence=CONFIDENCE)
    diffs = [p - q for p, q in zip(x, y, strict=True)]
    return SummaryRow.of(group, layer, metric, i, seeds, diffs, family=family)


def share_row(
    group: str, layer: int, metric: str, runs: Sequence[RunResult], reference: Sequence[RunResult]
) -> SummaryRow:
    """``<metric>_share_of_domain_router``: per seed, the run's final value over the domain
    router's (paired), else the ratio of the two groups' means."""
    get = final_value(layer, metric)
    name = f"{metric}_share_of_domain_router"
    if shared_seeds(runs, reference) is None:
        mine = mean_interval([get(r) for r in runs])
        theirs = mean_interval([get(r) for r in reference])
        n = min(mine.n, theirs.n)
        value = _ratio(mine.mean, theirs.mean)
        return SummaryRow(group, layer, name, n, value, NAN, NAN, "ratio_of_means")
    by_seed = {r.seed: get(r) for r in reference}
    return level_row(group, layer, name, runs, lambda r: _ratio(get(r), by_seed[r.seed]))
