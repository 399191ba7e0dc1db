"""The sweep summary of ``python -m moe_emergence.analyze``: runs grouped over seeds (the unit of
replication across runs), each metric as mean, 95% Student t-interval and per-seed values over a
group's runs, and the tests of the study, each in ONE declared Holm family (:class:`Family`).

Groups: the runs with equal :attr:`RunResult.group` (same overrides, seeds apart), runs in seed
order. Rows (:data:`COLUMNS`; ``values``/``seeds``: one per run of the group in seed order, NaN
where a run lacks the value; ``p``/``p_holm``/``family``/``detectable``: only on tested rows).
Scores are read from :class:`LayerScores` by field name; a field a run lacks reads NaN.

primary, ``"A - B"`` for every ``condition=top1`` group A and ``condition=frozen_router`` group
B whose other overrides are equal (:attr:`Summary.primary`)
    ``nmi`` and ``domain_gain`` per shared layer at the final step, A minus B paired by seed
    (Welch when the seeds differ); families ``primary_nmi`` and ``primary_domain_gain``, each
    Holm over its layers (and pairs). The study's test of "learned by the router": the frozen
    twin shares the initial model and trains the same way, its router kept at initialisation.
routing, per MoE layer of MoE groups (values at each run's final checkpoint)
    :data:`ROUTING_METRICS` (``t``, no p); ``nmi_change_low``/``nmi_change_high``: each run's
    document-paired probe interval of its final minus step-0 NMI
    (:attr:`RunResult.nmi_change_intervals`); ``<m>_step0`` and ``<m>_change`` (final minus
    step 0 per run, descriptive: no p) for m in :data:`STEP0_METRICS`;
    ``nmi_fold_change`` (method ``log_t``): the primary test of change from step 0, the
    one-sample t of the per-seed log(NMI final / NMI step 0), reported as the geometric-mean
    fold change with its back-transformed interval (values: each seed's fold change); family
    ``fold_change``, Holm over all MoE groups x layers but the reference routers (hash,
    domain: routing fixed by construction, their row descriptive);
    ``<m>_share_of_domain_router`` for m in :data:`SHARE_METRICS` when a ``domain_router``
    group is present (its twin: equal other overrides, else the only one): per seed, the
    group's value over the domain router's (mean and t-interval of the ratios), or the ratio of
    the means (method ``ratio_of_means``) when the seeds differ;
    the :data:`ABOVE_NULL` counts at the final step: method ``count``, mean = the runs (of n)
    whose permutation p is below :data:`ALPHA` after Holm over all MoE groups x layers x runs
    of that column, the reference routers left out (values: each run's Holm-adjusted p; family
    ``final_<metric>``).
step 0, once per initial model, group ``"step 0: <group> | <group> ..."`` (:attr:`initial_models`)
    Runs whose :attr:`RunResult.initial_model` is equal share their step 0 (same step-0
    weights and same first-choice routing of the probe: top-1, top-2, no LB and the frozen
    router of one seed, typically); each distinct initial model counts once, under the groups
    that share it. :data:`STEP0_METRICS` at step 0 (``t``), and the :data:`ABOVE_NULL` counts
    with Holm over all initial models x layers (family ``step0_<metric>``; none for an initial
    model of reference routers only). A run without a key is its own initial model.
held-out loss (nats), every group with losses, ``layer`` empty
    ``loss_<domain>``, ``ppl_<domain>`` (mean of the per-run exp(loss)), ``loss`` (each run's
    token-weighted mean over its domains); no p.
MoE minus dense, every MoE group with a dense twin (:func:`dense_twins`)
    ``loss_<domain>_minus_dense``, ``loss_minus_dense``: ``paired_t`` over per-seed
    differences when both groups have the same seeds, else ``welch_t``; family ``minus_dense``.
direct contrasts, pairs of groups A < B (by name), group ``"A - B"`` (:attr:`contrasts`)
    ``loss_<domain>``, ``loss`` (A minus B) for every pair that is not an MoE group and its
    dense twin (that test is the MoE - dense row): family ``contrast_loss``; ``nmi_change`` per
    shared layer (A's change from step 0 minus B's) for two MoE groups, neither a reference
    router (hash, domain: routing fixed by construction) and not a primary pair (which shares
    its step 0, so the difference of changes is the primary test again): family
    ``contrast_nmi_change``.

knock-out, per MoE layer of MoE groups whose runs have knock-out readings
(:attr:`RunResult.knockout`; :mod:`moe_emergence.analysis.knockout`)
    ``knockout_share_<D>`` (the preferred expert's share of D's first choices), then per
    measured domain D' ``knockout_<D>_on_<D'>`` (D''s held-out loss change with D's preferred
    expert removed), ``knockout_control_<D>_on_<D'>`` (with the load-matched control removed)
    and ``knockout_excess_<D>_on_<D'>`` (their difference); ``t`` over seeds. The excess on
    D' = D is tested: family ``knockout_own``, Holm over MoE groups x layers x domains, the
    reference routers left out (descriptive).

Every tested row is in exactly one family and shown in one table, so a test has one p_holm.
``detectable``: the smallest effect the row's test detects with :data:`POWER` power at
``ALPHA / m`` (Holm's first threshold in its family of m tests), given the observed SD of its
per-seed values (:func:`detectable_effect`; for ``log_t`` rows as a fold change).

The numbers only: :func:`summarize` returns them as a :class:`Summary`;
:mod:`moe_emergence.analysis.summary_files` renders them (summary.csv, summary.json,
summary.md) and draws the sweep figures.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from moe_emergence.analysis.intervals import (
    Interval,
    detectable_effect,
    difference_interval,
    fold_change_interval,
    holm,
    mean_interval,
    paired_difference_interval,
)
from moe_emergence.analysis.results import (
    CONDITION_KEY,
    CheckpointResult,
    RunResult,
    group_runs,
    split_override,
)

__all__ = [
    "ABOVE_NULL",
    "ALPHA",
    "COLUMNS",
    "CONFIDENCE",
    "POWER",
    "ROUTING_METRICS",
    "STEP0_METRICS",
    "Family",
    "GroupInfo",
    "InitialModel",
    "Summary",
    "SummaryRow",
    "Test",
    "dense_twins",
    "group_runs",
    "initial_models",
    "summarize",
]

CONFIDENCE = 0.95
ALPHA = 0.05  # family-wise error rate of every Holm family
POWER = 0.8  # the power at which ``detectable`` is stated
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
    "family",
    "detectable",
    "seeds",
    "values",
)
LEARNED = "top1"  # the primary contrast: LEARNED minus FROZEN, paired by seed
FROZEN = "frozen_router"
DOMAIN_ROUTER = "domain_router"  # the upper bound every MoE condition is read as a share of
REFERENCE_ROUTERS = ("hash_router", DOMAIN_ROUTER)  # routing fixed by construction
# Each run's value in the row's ``values``: nmi_low / nmi_high are the runs' probe intervals
# (documents resampled; nmi_interval_approximate is 1 where their coverage may fall below 93%);
# *_p the runs' document-level permutation p-values. Each held-out gain sits beside its null
# (chance level).
ROUTING_METRICS = (
    "nmi",
    "nmi_low",
    "nmi_high",
    "nmi_interval_approximate",  # 1 where the run's probe intervals are approximate, else 0
    "null_mean",
    "null_p95",
    "null_p",
    "mi",
    "domain_gain",
    "domain_gain_null_mean",
    "domain_gain_null_p95",
    "domain_gain_p",
    "token_gain",
    "token_gain_null_mean",
    "token_gain_null_p95",
    "token_gain_p",
    "token_gain_ref_domain",
    "token_gain_ref_token",
    "domain_beyond_token_gain",
    "domain_beyond_token_gain_null_mean",
    "domain_beyond_token_gain_null_p95",
    "domain_beyond_token_gain_p",
    "cond_mi_excess",
    "cond_mi_null_p",
    "token_id_nmi",
    "usage_entropy",
    "router_entropy",
)
STEP0_METRICS = (
    "nmi",
    "mi",
    "domain_gain",
    "domain_beyond_token_gain",
    "token_gain",
    "cond_mi_excess",
    "token_id_nmi",
)
# The field's specialisation metrics (specialisation.py), each beside its chance level, at the
# final checkpoint; descriptive rows (no family). Saturation at each run's middle checkpoint
# (``_mid``): at the final it is 1 by definition. expert_tokens_replicated: the share of the
# per-expert token lists that the other half of the documents confirms.
SPECIALISATION_METRICS = (
    "coactivation_strongest",
    "coactivation_strongest_chance",
    "coactivation_uniform",
    "repetition",
    "repetition_chance",
    "repetition_null_mean",
    "repetition_p",
    "repetition_topk",
    "repetition_topk_null_mean",
    "repetition_topk_p",
    "vocab_spec",
    "vocab_spec_chance",
    "vocab_spec_ids",
)
SATURATION_METRICS = (
    "saturation_top1",
    "saturation_top1_chance",
    "saturation_topk",
    "saturation_topk_chance",
)
PRIMARY_METRICS = ("nmi", "domain_gain")
SHARE_METRICS = ("nmi", "domain_gain")
# count metric -> the LayerScores permutation p-value field it counts
ABOVE_NULL = {
    "above_null": "null_p",
    "domain_gain_above_null": "domain_gain_p",
    "domain_beyond_token_above_null": "domain_beyond_token_gain_p",
    "cond_mi_above_null": "cond_mi_null_p",
}
FAMILY_TITLES = {
    "primary_nmi": "top-1 - frozen router: NMI at the final step, paired by seed; every layer",
    "primary_domain_gain": (
        "top-1 - frozen router: held-out domain gain at the final step, paired by seed; every layer"
    ),
    "fold_change": (
        "change from step 0: paired log-ratio log(NMI final / NMI step 0) over seeds; every MoE "
        "condition but the reference routers (hash, domain) x layer"
    ),
    "minus_dense": (
        "MoE - dense held-out loss: every MoE condition with a dense twin x (domains, overall)"
    ),
    "contrast_loss": (
        "direct contrasts of held-out loss: every pair of conditions except an MoE condition and "
        "its dense twin x (domains, overall)"
    ),
    "contrast_nmi_change": (
        "direct contrasts of the NMI change from step 0: every pair of learned-router MoE "
        "conditions except the primary pair x layer"
    ),
    "knockout_own": (
        "knock-out: removing a domain's preferred expert minus removing a load-matched control, "
        "on that domain's own held-out loss, over seeds; every MoE condition but the reference "
        "routers (hash, domain) x layer x domain"
    ),
}
TWIN_FREE_KEYS = ("condition", "model", "experiment")  # and every key under ``model.``
STEP0_PREFIX = "step 0: "
NAN = float("nan")


@dataclass(frozen=True)
class SummaryRow:
    """One group (or contrast ``"A - B"``, or initial model ``"step 0: ..."``) x layer x metric.
    layer: the MoE layer or None. n: runs (or seed pairs) with a value; mean, ci_low, ci_high:
    NaN where undefined; method: ``t``, ``paired_t``, ``welch_t``, ``log_t`` (geometric-mean
    fold change), ``ratio_of_means``, ``none`` (n <= 1) or ``count``; p, p_holm: two-sided p
    against 0 (``log_t``: against a fold change of 1) and its Holm adjustment in ``family``
    (NaN and "" on rows that test nothing); detectable: the effect the test detects with
    :data:`POWER` power at ALPHA / m; seeds, values: the per-seed values in seed order (NaN
    where a run lacks one; empty for Welch rows)."""

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
    family: str = ""
    detectable: float = NAN
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
        family: str = "",
    ) -> SummaryRow:
        """A row of ``interval``; its p kept only when it is in a ``family`` (a test)."""
        i = interval
        values = tuple(float(v) for v in values)
        p = i.p if family else NAN
        return cls(
            group,
            layer,
            metric,
            i.n,
            i.mean,
            i.ci_low,
            i.ci_high,
            i.method,
            p,
            NAN,
            family,
            NAN,
            tuple(seeds),
            values,
        )


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
class InitialModel:
    """The step 0 that one or more groups share: the groups (by name), and the one run per
    distinct initial model its rows rest on (names and seeds, in seed order); reference: all
    its groups are reference routers (no step-0 counts: nothing to test)."""

    groups: list[str]
    runs: list[str]
    seeds: list[int | None]
    reference: bool = False


Test = tuple[str, "int | None", str, "int | None"]  # (group, layer, metric, seed or None)


@dataclass(frozen=True)
class Family:
    """One Holm family, declared once: its name (the rows' ``family``), what it holds, m (its
    tests with a p), each test and the survivors (p_holm < ALPHA) as (group, layer, metric,
    seed: the run's seed for per-run permutation tests, else None), the smallest raw p, Holm's
    first threshold ALPHA / m, and the smallest p a permutation test can give, 1 / (1 + K)
    (NaN for t-tests, or K unknown). The power of a family of seed-level t-tests: n_seeds (the
    fewest seeds behind a test), pooled_sd (the root mean square of the tests' seed-to-seed SDs,
    of the log-ratios for fold changes) and detectable (the effect detected with POWER power at
    ALPHA / m at those; a fold change for fold changes); 0 and NaN for other families."""

    name: str
    title: str
    m: int
    tests: tuple[Test, ...]
    survivors: tuple[Test, ...]
    smallest_p: float
    threshold: float
    resolution: float = NAN
    n_seeds: int = 0
    pooled_sd: float = NAN
    detectable: float = NAN


@dataclass(frozen=True)
class Summary:
    """The rows (the primary contrasts; then groups in name order, each: layers, then losses,
    then MoE - dense; then the step-0 initial models; then the direct contrasts), the groups,
    the contrasts and primary pairs (``"A - B"`` -> (A, B)), the initial models (label ->
    :class:`InitialModel`), the Holm families, and the warnings (one sentence each)."""

    rows: list[SummaryRow]
    groups: dict[str, GroupInfo]
    warnings: list[str] = field(default_factory=list)
    contrasts: dict[str, tuple[str, str]] = field(default_factory=dict)
    primary: dict[str, tuple[str, str]] = field(default_factory=dict)
    initial_models: dict[str, InitialModel] = field(default_factory=dict)
    families: list[Family] = field(default_factory=list)

    def row(self, group: str, metric: str, layer: int | None = None) -> SummaryRow | None:
        """The row of ``group`` (or contrast / initial-model label) x ``layer`` x ``metric``,
        or None."""
        return self._index.get((group, layer, metric))

    @functools.cached_property
    def _index(self) -> dict[tuple[str, int | None, str], SummaryRow]:
        """(group, layer, metric) -> its first row."""
        index: dict[tuple[str, int | None, str], SummaryRow] = {}
        for r in self.rows:
            index.setdefault((r.group, r.layer, r.metric), r)
        return index

    def family(self, name: str) -> Family | None:
        return next((f for f in self.families if f.name == name), None)


# ----------------------------------------------------------------------------- groups


def _parse_overrides(overrides: Sequence[str]) -> dict[str, str]:
    """``key=value`` strings as a dict of bare keys (:func:`split_override`)."""
    return dict(split_override(item) for item in overrides)


def _condition(runs: Sequence[RunResult]) -> str | None:
    """The group's ``condition`` override (None when it sets none)."""
    return _parse_overrides(runs[0].overrides).get(CONDITION_KEY)


def _others(runs: Sequence[RunResult]) -> dict[str, str]:
    """The group's overrides other than ``condition``."""
    found = _parse_overrides(runs[0].overrides)
    found.pop(CONDITION_KEY, None)
    return found


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


def _condition_twin(
    g: str, groups: Mapping[str, Sequence[RunResult]], condition: str, sole: bool
) -> str | None:
    """The group of ``condition`` whose other overrides equal ``g``'s; when ``sole``, else the
    only group of that condition; None otherwise."""
    mine = _others(groups[g])
    found = [h for h, runs in groups.items() if _condition(runs) == condition and h != g]
    same = [h for h in found if _others(groups[h]) == mine]
    if len(same) == 1:
        return same[0]
    return found[0] if sole and len(found) == 1 and not same else None


def _primary_pairs(groups: Mapping[str, Sequence[RunResult]]) -> dict[str, tuple[str, str]]:
    """``"A - B"`` -> (A, B): each ``condition=top1`` MoE group A and the ``frozen_router``
    group B with the same other overrides."""
    pairs = {}
    for a, runs in groups.items():
        if _condition(runs) == LEARNED and _is_moe(runs):
            b = _condition_twin(a, groups, FROZEN, sole=False)
            if b is not None and _is_moe(groups[b]):
                pairs[f"{a} - {b}"] = (a, b)
    return pairs


def _is_moe(runs: Sequence[RunResult]) -> bool:
    return any(run.moe for run in runs)


def _reference(runs: Sequence[RunResult]) -> bool:
    """Whether the group is a reference router (hash, domain): routing fixed by construction,
    read beside the others but tested in no family."""
    return _condition(runs) in REFERENCE_ROUTERS


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
    """The checkpoint's ``metric`` of ``layer``; NaN without the layer or that field."""
    scores = None if checkpoint is None else checkpoint.scores.get(layer)
    value = NAN if scores is None else getattr(scores, metric, NAN)
    return NAN if value is None else float(value)


def _final(layer: int, metric: str) -> RunValue:
    return lambda run: _score(run.final, layer, metric)


def _at_step0(layer: int, metric: str) -> RunValue:
    return lambda run: _score(_step0(run), layer, metric)


def _change(layer: int, metric: str) -> RunValue:
    """Final minus step 0 of one run (NaN without a step-0 checkpoint)."""
    return lambda run: _score(run.final, layer, metric) - _score(_step0(run), layer, metric)


def _change_bound(layer: int, side: int) -> RunValue:
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


def _specialisation_rows(group: str, layer: int, runs: Sequence[RunResult]) -> list[SummaryRow]:
    """Descriptive rows of the field's metrics (:data:`SPECIALISATION_METRICS` at the final
    checkpoint, :data:`SATURATION_METRICS` at the middle one as ``<metric>_mid``)."""
    if not any(r.final.specialisation for r in runs):
        return []
    rows = [
        _level(group, layer, m, runs, lambda r, m=m: _specialisation(r.final, layer, m))
        for m in SPECIALISATION_METRICS
    ]
    rows += [
        _level(group, layer, f"{m}_mid", runs, lambda r, m=m: _specialisation(_middle(r), layer, m))
        for m in SATURATION_METRICS
    ]
    rows.append(_level(group, layer, "expert_tokens_replicated", runs, _replicated(layer)))
    return rows


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


def _ratio(a: float, b: float) -> float:
    return a / b if b != 0 and not math.isnan(b) else NAN


# ----------------------------------------------------------------------------- rows


def _level(
    group: str, layer: int | None, metric: str, runs: Sequence[RunResult], get: RunValue
) -> SummaryRow:
    """Mean and t-interval over the group's runs, per-seed values; no test."""
    values = [get(r) for r in runs]
    i = mean_interval(values, confidence=CONFIDENCE)
    return SummaryRow.of(group, layer, metric, i, [r.seed for r in runs], values)


def _fold_change(group: str, layer: int, runs: Sequence[RunResult]) -> SummaryRow:
    """``nmi_fold_change``: the paired log-ratio test of NMI final over NMI step 0 (family
    ``fold_change``; a reference router's is descriptive: its routing is fixed by
    construction); values: each run's fold change (NaN without a step 0)."""
    after = [_final(layer, "nmi")(r) for r in runs]
    before = [_at_step0(layer, "nmi")(r) for r in runs]
    i = fold_change_interval(after, before, confidence=CONFIDENCE)
    ratios = [_ratio(a, b) if a > 0 and b > 0 else NAN for a, b in zip(after, before, strict=True)]
    seeds = [r.seed for r in runs]
    family = "" if _reference(runs) else "fold_change"
    return SummaryRow.of(group, layer, "nmi_fold_change", i, seeds, ratios, family=family)


def _difference(
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
    seeds = _shared_seeds(a, b)
    if seeds is None:
        i = difference_interval([get(r) for r in a], [get(r) for r in b], confidence=CONFIDENCE)
        return SummaryRow.of(group, layer, metric, i, family=family)
    by_a, by_b = {r.seed: get(r) for r in a}, {r.seed: get(r) for r in b}
    x, y = [by_a[s] for s in seeds], [by_b[s] for s in seeds]
    i = paired_difference_interval(x, y, confidence=CONFIDENCE)
    diffs = [p - q for p, q in zip(x, y, strict=True)]
    return SummaryRow.of(group, layer, metric, i, seeds, diffs, family=family)


def _share(
    group: str, layer: int, metric: str, runs: Sequence[RunResult], reference: Sequence[RunResult]
) -> SummaryRow:
    """``<metric>_share_of_domain_router``: per seed, the run's final value over the domain
    router's (paired), else the ratio of the two groups' means."""
    get = _final(layer, metric)
    name = f"{metric}_share_of_domain_router"
    if _shared_seeds(runs, reference) is None:
        mine = mean_interval([get(r) for r in runs])
        theirs = mean_interval([get(r) for r in reference])
        n = min(mine.n, theirs.n)
        value = _ratio(mine.mean, theirs.mean)
        return SummaryRow(group, layer, name, n, value, NAN, NAN, "ratio_of_means")
    by_seed = {r.seed: get(r) for r in reference}
    return _level(group, layer, name, runs, lambda r: _ratio(get(r), by_seed[r.seed]))


# ----------------------------------------------------------------------------- per-run tests


def _resolution(runs: Iterable[RunResult]) -> float:
    """1 / (1 + K), K the fewest permutations among ``runs`` (NaN when none is known)."""
    ks = [r.null_permutations for r in runs if r.null_permutations]
    return 1 / (1 + min(ks)) if ks else NAN


def _count_rows(
    cells: Sequence[tuple[str, int, Sequence[RunResult]]],
    metric: str,
    field_name: str,
    at_step0: bool,
    family: str,
) -> tuple[list[SummaryRow], Family]:
    """One ``count`` row per (label, layer, runs) cell: the runs whose ``field_name`` p (final,
    or at step 0) is below ALPHA after Holm over every run of every cell (one family)."""
    get = _at_step0 if at_step0 else _final
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


def _final_counts(
    groups: Mapping[str, Sequence[RunResult]],
) -> tuple[dict[tuple[str, int], list[SummaryRow]], list[Family]]:
    cells = [
        (g, layer, runs)
        for g, runs in groups.items()
        if _is_moe(runs) and not _reference(runs)
        for layer in _layers(runs)
    ]
    out: dict[tuple[str, int], list[SummaryRow]] = {
        (g, layer): [] for g, runs in groups.items() if _is_moe(runs) for layer in _layers(runs)
    }
    families = []
    for metric, field_name in ABOVE_NULL.items():
        rows, family = _count_rows(cells, metric, field_name, False, f"final_{metric}")
        for (g, layer, _), row in zip(cells, rows, strict=True):
            out[(g, layer)].append(row)
        families.append(family)
    return out, families


# ----------------------------------------------------------------------------- step 0


def _model_key(run: RunResult) -> str:
    """The run's initial-model key; a run without one is its own."""
    return run.initial_model if run.initial_model is not None else f"run:{run.name}"


def initial_models(
    groups: Mapping[str, Sequence[RunResult]],
) -> dict[str, tuple[InitialModel, list[RunResult]]]:
    """Label ``"step 0: <g1> | <g2> ..."`` -> (the initial model, its runs: one per distinct
    :attr:`RunResult.initial_model` key, the first group's run, in seed order), over the MoE
    runs with a step-0 checkpoint. The groups of a label are those whose runs share its keys."""
    by_key: dict[str, list[tuple[str, RunResult]]] = {}
    for g, runs in groups.items():
        if _is_moe(runs):
            for run in runs:
                if _step0(run) is not None:
                    by_key.setdefault(_model_key(run), []).append((g, run))
    cohorts: dict[tuple[str, ...], list[RunResult]] = {}
    for members in by_key.values():
        names = tuple(dict.fromkeys(g for g, _ in members))
        cohorts.setdefault(names, []).append(members[0][1])
    out = {}
    for names, runs in sorted(cohorts.items()):
        runs = sorted(runs, key=lambda r: (r.seed is None, r.seed or 0, r.name))
        label = STEP0_PREFIX + " | ".join(names)
        reference = all(_reference(groups[g]) for g in names)
        model = InitialModel(list(names), [r.name for r in runs], [r.seed for r in runs], reference)
        out[label] = (model, runs)
    return out


def _step0_rows(
    models: Mapping[str, tuple[InitialModel, list[RunResult]]],
) -> tuple[list[SummaryRow], list[Family]]:
    """Per initial model x layer: :data:`STEP0_METRICS` at step 0 and the step-0 counts (each
    distinct initial model once in every family)."""
    cells = [(label, layer, runs) for label, (_, runs) in models.items() for layer in _layers(runs)]
    levels: dict[tuple[str, int], list[SummaryRow]] = {
        (label, layer): [_level(label, layer, m, runs, _at_step0(layer, m)) for m in STEP0_METRICS]
        for label, layer, runs in cells
    }
    tested = [cell for cell in cells if not models[cell[0]][0].reference]
    families = []
    for metric, field_name in ABOVE_NULL.items():
        rows, family = _count_rows(tested, metric, field_name, True, f"step0_{metric}")
        for (label, layer, _), row in zip(tested, rows, strict=True):
            levels[(label, layer)].append(row)
        families.append(family)
    return [row for rows in levels.values() for row in rows], families


# ----------------------------------------------------------------------------- groups' rows


def _routing_rows(
    group: str,
    runs: Sequence[RunResult],
    counts: Mapping[tuple[str, int], list[SummaryRow]],
    domain_router: Sequence[RunResult] | None,
) -> list[SummaryRow]:
    rows = []
    for layer in _layers(runs):
        rows += [_level(group, layer, m, runs, _final(layer, m)) for m in ROUTING_METRICS]
        for side, name in enumerate(("nmi_change_low", "nmi_change_high")):
            rows.append(_level(group, layer, name, runs, _change_bound(layer, side)))
        for m in STEP0_METRICS:
            rows.append(_level(group, layer, f"{m}_step0", runs, _at_step0(layer, m)))
            rows.append(_level(group, layer, f"{m}_change", runs, _change(layer, m)))
        rows.append(_fold_change(group, layer, runs))
        rows += _specialisation_rows(group, layer, runs)
        if domain_router is not None:
            rows += [_share(group, layer, m, runs, domain_router) for m in SHARE_METRICS]
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
    label: str, a: Sequence[RunResult], b: Sequence[RunResult], suffix: str, family: str
) -> list[SummaryRow]:
    """``loss_<domain><suffix>`` per domain both have, then ``loss<suffix>``: a minus b."""
    b_domains = set(_domains(b))
    rows = [
        _difference(label, None, f"loss_{d}{suffix}", a, b, _loss(d), family)
        for d in _domains(a)
        if d in b_domains
    ]
    if rows:
        rows.append(_difference(label, None, f"loss{suffix}", a, b, _overall_loss, family))
    return rows


def _primary_rows(
    groups: Mapping[str, Sequence[RunResult]], pairs: Mapping[str, tuple[str, str]]
) -> list[SummaryRow]:
    rows = []
    for label, (a, b) in pairs.items():
        shared = sorted(set(_layers(groups[a])) & set(_layers(groups[b])))
        for metric in PRIMARY_METRICS:
            family = f"primary_{metric}"
            get = lambda layer, metric=metric: _final(layer, metric)  # noqa: E731
            rows += [
                _difference(label, layer, metric, groups[a], groups[b], get(layer), family)
                for layer in shared
            ]
    return rows


def _routing_contrast(a: str, b: str, groups: Mapping[str, Sequence[RunResult]]) -> bool:
    """Whether the NMI-change contrast of a and b is a test of its own: both MoE, neither a
    reference router."""
    return all(_is_moe(groups[g]) and not _reference(groups[g]) for g in (a, b))


def _contrast_rows(
    groups: Mapping[str, Sequence[RunResult]],
    twins: Mapping[str, str | None],
    primary: Mapping[str, tuple[str, str]],
) -> tuple[list[SummaryRow], dict[str, tuple[str, str]]]:
    rows, contrasts = [], {}
    primary_pairs = {frozenset(pair) for pair in primary.values()}
    for a, b in itertools.combinations(sorted(groups), 2):
        label = f"{a} - {b}"
        mine = []
        if twins.get(a) != b and twins.get(b) != a:  # else: the MoE - dense row
            mine += _loss_differences(label, groups[a], groups[b], "", "contrast_loss")
        if _routing_contrast(a, b, groups) and frozenset((a, b)) not in primary_pairs:
            shared = sorted(set(_layers(groups[a])) & set(_layers(groups[b])))
            mine += [
                _difference(
                    label,
                    layer,
                    "nmi_change",
                    groups[a],
                    groups[b],
                    _change(layer, "nmi"),
                    "contrast_nmi_change",
                )
                for layer in shared
            ]
        if mine:
            rows += mine
            contrasts[label] = (a, b)
    return rows, contrasts


# ----------------------------------------------------------------------------- knock-out

KNOCKOUT_FAMILY = "knockout_own"


def knockout_metric(kind: str, removed: str, measured: str) -> str:
    """The row name of a knock-out reading: ``kind`` ``preferred`` -> ``knockout_<removed>_on_
    <measured>`` (the change of ``measured``'s held-out loss when ``removed``'s preferred
    expert is removed), ``control`` -> ``knockout_control_...``, ``excess`` ->
    ``knockout_excess_...`` (preferred minus control), ``share`` -> ``knockout_share_<removed>``
    (the preferred expert's share of ``removed``'s first choices)."""
    if kind == "share":
        return f"knockout_share_{removed}"
    prefix = "knockout" if kind == "preferred" else f"knockout_{kind}"
    return f"{prefix}_{removed}_on_{measured}"


def _knockout_value(layer: int, removed: str, measured: str, name: str) -> RunValue:
    """The run's final knock-out reading field ``name`` (NaN without it)."""

    def get(run: RunResult) -> float:
        for e in run.knockout:
            if (e.layer, e.removed, e.measured) == (layer, removed, measured):
                return float(getattr(e, name))
        return NAN

    return get


def _knockout_rows(group: str, runs: Sequence[RunResult]) -> list[SummaryRow]:
    """Per layer and removed domain D (where a run has knock-out readings): the preferred
    expert's share of D's tokens, then per measured domain D' the change of D''s loss with D's
    preferred expert removed, with the control removed, and their difference (mean and
    t-interval over seeds); the difference on D' = D is tested (family ``knockout_own``; a
    reference router's is descriptive)."""
    cells: dict[tuple[int, str], list[str]] = {}  # (layer, D) -> measured domains
    for run in runs:
        for e in run.knockout:
            measured = cells.setdefault((e.layer, e.removed), [])
            if e.measured not in measured:
                measured.append(e.measured)
    family = "" if _reference(runs) else KNOCKOUT_FAMILY
    seeds = [r.seed for r in runs]
    rows = []
    for (layer, removed), measured_domains in sorted(cells.items(), key=lambda c: c[0][0]):
        share = _knockout_value(layer, removed, removed, "preferred_share")
        rows.append(_level(group, layer, knockout_metric("share", removed, ""), runs, share))
        for measured in measured_domains:
            for kind, name in (
                ("preferred", "preferred_change"),
                ("control", "control_change"),
                ("excess", "difference"),
            ):
                values = [_knockout_value(layer, removed, measured, name)(r) for r in runs]
                tested = family if kind == "excess" and measured == removed else ""
                i = mean_interval(values, confidence=CONFIDENCE)
                metric = knockout_metric(kind, removed, measured)
                rows.append(SummaryRow.of(group, layer, metric, i, seeds, values, family=tested))
    return rows


# ----------------------------------------------------------------------------- Holm


def _detectable(row: SummaryRow, m: int) -> float:
    """The effect the row's test detects with POWER power at ALPHA / m, at its n and the SD of
    its per-seed values (a fold change for ``log_t``; NaN for Welch and untested rows)."""
    values = _seed_values(row)
    if len(values) < 2:
        return NAN
    effect = detectable_effect(len(values), float(values.std(ddof=1)), ALPHA / max(m, 1), POWER)
    return _exp(effect) if row.method == "log_t" else effect


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
    return n, sd, _exp(effect) if tested[0].method == "log_t" else effect


def _with_holm(rows: list[SummaryRow]) -> tuple[list[SummaryRow], list[Family]]:
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


def _resolution_warnings(families: Sequence[Family]) -> list[str]:
    """A warning for each permutation family whose smallest possible p, 1 / (1 + K), cannot
    pass Holm's first threshold ALPHA / m: no run could count, whatever the data."""
    return [
        f"{f.name}: Holm over the {f.m} run x layer tests can count no run: with K "
        f"permutations the smallest possible p is 1/(1+K) = {f.resolution:.3g}, not below "
        f"{ALPHA}/{f.m} = {f.threshold:.3g}; raise the permutation count K"
        for f in families
        if f.m and not math.isnan(f.resolution) and f.resolution >= f.threshold
    ]


# ----------------------------------------------------------------------------- summarize


def summarize(results: Sequence[RunResult]) -> Summary:
    """The summary rows, groups, contrasts, initial models, families and warnings of
    ``results`` (each run with >= 1 checkpoint). Raises ValueError for no runs."""
    if not results:
        raise ValueError("no runs to summarise: results is empty")
    groups = group_runs(results)
    twins, warnings = dense_twins(groups)
    counts, count_families = _final_counts(groups)
    primary = _primary_pairs(groups)
    rows = _primary_rows(groups, primary)
    for g, runs in groups.items():
        if _is_moe(runs):
            reference = None
            if _condition(runs) != DOMAIN_ROUTER:
                twin = _condition_twin(g, groups, DOMAIN_ROUTER, sole=True)
                reference = groups[twin] if twin is not None else None
            rows += _routing_rows(g, runs, counts, reference)
            rows += _knockout_rows(g, runs)
        rows += _loss_rows(g, runs)
        if (twin := twins.get(g)) is not None:
            rows += _loss_differences(g, runs, groups[twin], "_minus_dense", "minus_dense")
    models = initial_models(groups)
    step0_rows, step0_families = _step0_rows(models)
    contrast_rows, contrasts = _contrast_rows(groups, twins, primary)
    rows, families = _with_holm(rows + step0_rows + contrast_rows)
    families += count_families + step0_families
    warnings = _step_warnings(groups) + warnings + _resolution_warnings(families)
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
    return Summary(
        rows,
        info,
        warnings,
        contrasts,
        primary,
        {label: model for label, (model, _) in models.items()},
        families,
    )
