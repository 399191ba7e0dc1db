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
    (:attr:`RunResult.nmi_change_intervals`); ``<m>step0_of`` and ``<m>change_value`` (final minus
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
summary.md) and draws the sweep figures. The parts: summary_rows.py (settings, columns, the
records), summary_groups.py (groups, twins, initial models), summary_values.py (per-run values
and the rows over a group), summary_contrasts.py (differences between groups),
summary_knockout.py (the knock-out rows), summary_holm.py (the Holm families); this module
puts the rows together.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from moe_emergence.analysis.results import RunResult, group_runs
from moe_emergence.analysis.summary_contrasts import contrast_rows, loss_differences, primary_rows
from moe_emergence.analysis.summary_groups import (
    DOMAIN_ROUTER,
    condition_of,
    condition_twin,
    dense_twins,
    initial_models,
    is_moe,
    primary_pairs,
    step0_of,
    step_warnings,
)
from moe_emergence.analysis.summary_holm import (
    count_families,
    final_counts,
    resolution_warnings,
    with_holm,
)
from moe_emergence.analysis.summary_knockout import (
    KNOCKOUT_FAMILY,
    knockout_metric,
    knockout_summary_rows,
)
from moe_emergence.analysis.summary_rows import (
    ABOVE_NULL,
    ALPHA,
    COLUMNS,
    CONFIDENCE,
    POWER,
    ROUTING_METRICS,
    SHARE_METRICS,
    STEP0_METRICS,
    Family,
    GroupInfo,
    InitialModel,
    Summary,
    SummaryRow,
    Test,
)
from moe_emergence.analysis.summary_values import (
    change_bound,
    change_value,
    domains_of,
    exp_or_inf,
    final_value,
    fold_change_row,
    layers_of,
    level_row,
    loss_value,
    overall_loss,
    share_row,
    specialisation_rows,
    step0_value,
)

__all__ = [
    "ABOVE_NULL",
    "ALPHA",
    "COLUMNS",
    "CONFIDENCE",
    "KNOCKOUT_FAMILY",
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
    "knockout_metric",
    "summarize",
]


def _step0_rows(
    models: Mapping[str, tuple[InitialModel, list[RunResult]]],
) -> tuple[list[SummaryRow], list[Family]]:
    """Per initial model x layer: :data:`STEP0_METRICS` at step 0 and the step-0 counts (each
    distinct initial model once in every family)."""
    cells = [
        (label, layer, runs) for label, (_, runs) in models.items() for layer in layers_of(runs)
    ]
    levels: dict[tuple[str, int], list[SummaryRow]] = {
        (label, layer): [
            level_row(label, layer, m, runs, step0_value(layer, m)) for m in STEP0_METRICS
        ]
        for label, layer, runs in cells
    }
    tested = [cell for cell in cells if not models[cell[0]][0].reference]
    families = count_families(tested, True, levels)
    return [row for rows in levels.values() for row in rows], families


# ----------------------------------------------------------------------------- groups' rows


def _routing_rows(
    group: str,
    runs: Sequence[RunResult],
    counts: Mapping[tuple[str, int], list[SummaryRow]],
    domain_router: Sequence[RunResult] | None,
) -> list[SummaryRow]:
    rows = []
    for layer in layers_of(runs):
        rows += [level_row(group, layer, m, runs, final_value(layer, m)) for m in ROUTING_METRICS]
        for side, name in enumerate(("nmi_change_low", "nmi_change_high")):
            rows.append(level_row(group, layer, name, runs, change_bound(layer, side)))
        for m in STEP0_METRICS:
            rows.append(level_row(group, layer, f"{m}_step0", runs, step0_value(layer, m)))
            rows.append(level_row(group, layer, f"{m}_change", runs, change_value(layer, m)))
        rows.append(fold_change_row(group, layer, runs))
        rows += specialisation_rows(group, layer, runs)
        if domain_router is not None:
            rows += [share_row(group, layer, m, runs, domain_router) for m in SHARE_METRICS]
        rows += counts[(group, layer)]
    return rows


def _loss_rows(group: str, runs: Sequence[RunResult]) -> list[SummaryRow]:
    rows = []
    for d in domains_of(runs):
        rows.append(level_row(group, None, f"loss_{d}", runs, loss_value(d)))
        get = loss_value(d)
        rows.append(level_row(group, None, f"ppl_{d}", runs, lambda r, get=get: exp_or_inf(get(r))))
    if rows:
        rows.append(level_row(group, None, "loss", runs, overall_loss))
    return rows


# ----------------------------------------------------------------------------- summarize


def summarize(results: Sequence[RunResult]) -> Summary:
    """The summary rows, groups, contrasts, initial models, families and warnings of
    ``results`` (each run with >= 1 checkpoint). Raises ValueError for no runs."""
    if not results:
        raise ValueError("no runs to summarise: results is empty")
    groups = group_runs(results)
    twins, warnings = dense_twins(groups)
    counts, final_families = final_counts(groups)
    primary = primary_pairs(groups)
    rows = primary_rows(groups, primary)
    for g, runs in groups.items():
        if is_moe(runs):
            reference = None
            if condition_of(runs) != DOMAIN_ROUTER:
                twin = condition_twin(g, groups, DOMAIN_ROUTER, sole=True)
                reference = groups[twin] if twin is not None else None
            rows += _routing_rows(g, runs, counts, reference)
            rows += knockout_summary_rows(g, runs)
        rows += _loss_rows(g, runs)
        if (twin := twins.get(g)) is not None:
            rows += loss_differences(g, runs, groups[twin], "_minus_dense", "minus_dense")
    models = initial_models(groups)
    step0_rows, step0_families = _step0_rows(models)
    contrast_lines, contrasts = contrast_rows(groups, twins, primary)
    rows, families = with_holm(rows + step0_rows + contrast_lines)
    families += final_families + step0_families
    warnings = step_warnings(groups) + warnings + resolution_warnings(families)
    info = {
        g: GroupInfo(
            runs=[r.name for r in runs],
            seeds=[r.seed for r in runs],
            moe=is_moe(runs),
            final_steps=[r.final.step for r in runs],
            dense_twin=twins.get(g),
            has_step0=[step0_of(r) is not None for r in runs],
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
