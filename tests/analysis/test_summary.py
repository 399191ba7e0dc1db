"""The sweep summary on synthetic RunResults with chosen numbers: t-intervals and tests equal to
scipy's, the paired log-ratio test of change from step 0 and its power, step 0 once per initial
model, runs above the document-level null after Holm (and the resolution rule), the primary
top-1 - frozen router contrast, shares of the domain router, paired vs Welch differences,
direct contrasts, the Holm families (each test once, one p_holm), the files (CSV, JSON,
Markdown, PNG figures) and the warnings.

Scores are namespaces with LayerScores' field names: the summary reads them by name."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats

from moe_emergence.analysis.intervals import detectable_effect, holm
from moe_emergence.analysis.results import (
    CheckpointResult,
    HeldOutLoss,
    RunResult,
    condition_labels,
)
from moe_emergence.analysis.summary import (
    ABOVE_NULL,
    COLUMNS,
    ROUTING_METRICS,
    STEP0_METRICS,
    dense_twins,
    group_runs,
    summarize,
)
from moe_emergence.analysis.summary_files import render_markdown
from moe_emergence.analysis.summary_files import write_summary as _write_summary
from moe_emergence.analysis.sweep_plots import sweep_saturation_figure

MOE = "condition=top1,experiment=x"  # shown as "top-1" (experiment=x is shared)
MOE2 = "condition=top2,experiment=x"
DENSE = "condition=dense,experiment=x"
DOMAINS = ("code", "math")
TOKENS = {"code": 300, "math": 100}  # overall loss = (3 * code + math) / 4
PNG = b"\x89PNG\r\n\x1a\n"
NAN = float("nan")


def write_summary(results, out_dir, figures=False):
    """Figures off unless a test asks: they take the file's time."""
    return _write_summary(results, out_dir, figures=figures)


def layer_scores(nmi: float, null_p95: float = 0.1, null_p: float = 0.5, **kw) -> SimpleNamespace:
    """Scores with chosen nmi, null_p95, null_p; the rest fixed unless given in ``kw``."""
    values = dict(
        mi=nmi * 1.1,
        nmi=nmi,
        nmi_low=nmi * 0.8,
        nmi_high=nmi * 1.2,
        nmi_interval_approximate=False,
        null_mean=null_p95 / 2,
        null_p95=null_p95,
        null_p=null_p,
        domain_gain=nmi / 4,
        domain_gain_null_mean=-0.01,
        domain_gain_null_p95=0.002,
        domain_gain_p=0.5,
        token_gain=0.3,
        token_gain_null_mean=0.0,
        token_gain_null_p95=0.01,
        token_gain_p=0.5,
        token_gain_ref_domain=0.05,
        token_gain_ref_token=0.6,
        domain_beyond_token_gain=0.01,
        domain_beyond_token_gain_null_mean=0.0,
        domain_beyond_token_gain_null_p95=0.005,
        domain_beyond_token_gain_p=0.5,
        cond_mi_excess=0.01,
        cond_mi_null_p=0.5,
        token_id_nmi=nmi / 2,
        usage_entropy=1.3,
        router_entropy=1.2,
        n_documents=16,
        n_tokens=4096,
    )
    values.update(kw)
    return SimpleNamespace(**values)


def checkpoint(
    step: int, losses: dict[str, float], scores: SimpleNamespace | None
) -> CheckpointResult:
    held = {d: HeldOutLoss(loss, TOKENS[d]) for d, loss in losses.items()}
    if scores is None:
        return CheckpointResult(step, losses=held)
    counts = np.array([[30, 10, 5, 5], [5, 5, 20, 20]], dtype=np.int64)  # [D, E]
    return CheckpointResult(step, counts={1: counts}, scores={1: scores}, losses=held)


def run_result(
    overrides: list[str],
    seed: int,
    checkpoints: list[CheckpointResult],
    moe: bool,
    initial_model: str | None = None,
    null_permutations: int | None = 999,
) -> RunResult:
    group = ",".join(overrides) or "(no overrides)"
    return RunResult(
        name=f"{group}-seed{seed}",
        run_dir=Path("/nowhere"),
        group=group,
        seed=seed,
        overrides=overrides,
        moe=moe,
        domains=DOMAINS,
        layers=[1] if moe else [],
        n_experts=4,
        probe="held_out",
        probe_blocks={d: 8 for d in DOMAINS},
        checkpoints=checkpoints,
        initial_model=initial_model,
        null_permutations=null_permutations,
    )


def moe_run(
    seed, final, losses, start=None, step=100, group=MOE, step0=True, middle=True, **kw
) -> RunResult:
    """An MoE run: a step-0 checkpoint (scores ``start``, default nmi 0.01) unless not
    ``step0``, a middle one at step 50, and the final one at ``step`` (scores ``final``);
    ``kw``: :func:`run_result`'s ``initial_model``, ``null_permutations``."""
    start = start if start is not None else layer_scores(0.01)
    ckpts = [checkpoint(0, {d: x + 1.0 for d, x in losses.items()}, start)] if step0 else []
    if middle:
        ckpts.append(checkpoint(50, {d: x + 0.5 for d, x in losses.items()}, layer_scores(0.1)))
    ckpts.append(checkpoint(step, losses, final))
    return run_result(group.split(","), seed, ckpts, moe=True, **kw)


def dense_run(seed, losses, group=DENSE) -> RunResult:
    early = checkpoint(0, {d: x + 1.0 for d, x in losses.items()}, None)
    return run_result(group.split(","), seed, [early, checkpoint(100, losses, None)], moe=False)


def sweep() -> list[RunResult]:
    """2 conditions x 2 seeds. MoE nmi 0.20 / 0.30 (step 0: 0.01 / 0.03); overall losses
    MoE 2.25 / 2.30, dense 2.75 / 2.625."""
    return [
        moe_run(
            0,
            layer_scores(0.20, 0.22, null_p=0.01),
            {"code": 2.0, "math": 3.0},
            start=layer_scores(0.01, null_p=0.6),
        ),
        moe_run(
            1,
            layer_scores(0.30, 0.10, null_p=0.02),
            {"code": 2.2, "math": 2.6},
            start=layer_scores(0.03, null_p=0.01),
        ),
        dense_run(0, {"code": 2.5, "math": 3.5}),
        dense_run(1, {"code": 2.4, "math": 3.3}),
    ]


def t_row(values) -> tuple[float, float, float]:
    """scipy's mean and 95% t-interval."""
    low, high = stats.ttest_1samp(values, 0.0).confidence_interval(0.95)
    return float(np.mean(values)), float(low), float(high)


def interval(row) -> tuple[float, float, float]:
    return row.mean, row.ci_low, row.ci_high


# ----------------------------------------------------------------------------- routing


@pytest.mark.parametrize("n", [3, 10])
def test_routing_rows_are_scipy_t_intervals_with_per_seed_values(n):
    nmis = np.random.default_rng(n).uniform(0.1, 0.4, size=n).tolist()
    runs = [moe_run(s, layer_scores(v), {"code": 2.0}) for s, v in enumerate(nmis)]
    row = summarize(runs).row(MOE, "nmi", layer=1)
    assert (row.n, row.method) == (n, "t")  # t at n = 10 too: no bootstrap
    assert interval(row) == pytest.approx(t_row(nmis), rel=1e-9)
    assert row.values == pytest.approx(nmis) and row.seeds == tuple(range(n))
    assert math.isnan(row.p) and math.isnan(row.p_holm)  # a level tests nothing


def test_the_routing_metrics_of_a_layer():
    summary = summarize(sweep())
    metrics = {r.metric for r in summary.rows if r.group == MOE and r.layer == 1}
    changes = {f"{m}_{s}" for m in STEP0_METRICS for s in ("step0", "change")}
    runs = {"nmi_change_low", "nmi_change_high", "nmi_fold_change"}
    assert metrics == set(ROUTING_METRICS) | changes | runs | set(ABOVE_NULL)
    assert "domain_only_nmi" not in metrics and "cond_mi" not in metrics  # gone (#25)
    assert not any("share" in r.metric for r in summary.rows)  # no domain router here
    assert not [r for r in summary.rows if r.group == DENSE and r.layer is not None]
    assert summary.row(MOE, "domain_gain", layer=1).mean == pytest.approx(0.25 / 4)
    assert summary.row(MOE, "domain_gain_null_p95", layer=1).mean == pytest.approx(0.002)


def test_fields_a_run_lacks_read_nan():
    old = SimpleNamespace(**{k: v for k, v in vars(layer_scores(0.2)).items() if k != "mi"})
    runs = [moe_run(0, old, {"code": 2.0}), moe_run(1, layer_scores(0.3), {"code": 2.0})]
    row = summarize(runs).row(MOE, "mi", layer=1)
    assert row.n == 1 and math.isnan(row.values[0]) and row.values[1] == pytest.approx(0.33)


def test_the_raw_change_from_step_0_is_descriptive():
    summary = summarize(sweep())
    start = summary.row(MOE, "nmi_step0", layer=1)
    assert start.values == pytest.approx((0.01, 0.03)) and math.isnan(start.p)
    change = summary.row(MOE, "nmi_change", layer=1)
    assert (change.n, change.method) == (2, "t")
    assert interval(change) == pytest.approx(t_row([0.19, 0.27]), rel=1e-9)
    assert change.values == pytest.approx((0.19, 0.27))
    assert math.isnan(change.p) and math.isnan(change.p_holm) and change.family == ""
    token = summary.row(MOE, "token_id_nmi_change", layer=1)
    assert token.mean == pytest.approx((0.19 + 0.27) / 4)


# The case: every run rises 15- to 146-fold from step 0, 3 seeds, seed-to-seed spread
# large on the raw scale.
STEP0_NMI = (0.004, 0.006, 0.001)
FOLDS = (146.0, 15.0, 40.0)


def rising_runs(group=MOE, key=None):
    return [
        moe_run(
            s,
            layer_scores(b * f),
            {"code": 2.0},
            start=layer_scores(b),
            group=group,
            initial_model=None if key is None else f"{key}{s}",
        )
        for s, (b, f) in enumerate(zip(STEP0_NMI, FOLDS, strict=True))
    ]


def test_the_paired_log_ratio_detects_what_the_raw_difference_cannot():
    summary = summarize(rising_runs())
    fold = summary.row(MOE, "nmi_fold_change", layer=1)
    logs = np.log(FOLDS)
    want = stats.ttest_1samp(logs, 0.0)
    low, high = want.confidence_interval(0.95)
    assert (fold.n, fold.method, fold.family) == (3, "log_t", "fold_change")
    assert fold.mean == pytest.approx(math.exp(logs.mean()), rel=1e-9)  # geometric mean
    assert (fold.ci_low, fold.ci_high) == pytest.approx((math.exp(low), math.exp(high)))
    assert fold.values == pytest.approx(FOLDS)
    assert fold.p == pytest.approx(want.pvalue, rel=1e-9) and 0.005 < fold.p < 0.03
    assert fold.p_holm == fold.p  # a family of one
    raw = [b * (f - 1) for b, f in zip(STEP0_NMI, FOLDS, strict=True)]
    assert stats.ttest_1samp(raw, 0.0).pvalue > 0.05  # the old tested row fails
    assert summary.row(MOE, "nmi_change", layer=1).values == pytest.approx(raw)


def test_a_run_without_a_positive_step_0_drops_out_of_the_log_ratio():
    runs = rising_runs()
    runs.append(moe_run(3, layer_scores(0.2), {"code": 2.0}, start=layer_scores(0.0)))
    fold = summarize(runs).row(MOE, "nmi_fold_change", layer=1)
    assert fold.n == 3 and math.isnan(fold.values[3])
    assert fold.p == pytest.approx(stats.ttest_1samp(np.log(FOLDS), 0.0).pvalue)


def test_change_rows_count_only_runs_with_a_step_0_checkpoint_and_warn():
    runs = [
        moe_run(0, layer_scores(0.20), {"code": 2.0}),
        moe_run(1, layer_scores(0.30), {"code": 2.0}, start=layer_scores(0.05)),
        moe_run(2, layer_scores(0.50), {"code": 2.0}, step0=False),
    ]
    summary = summarize(runs)
    change = summary.row(MOE, "nmi_change", layer=1)
    assert change.n == 2 and change.values[:2] == pytest.approx((0.19, 0.25))
    assert math.isnan(change.values[2])
    assert summary.row(MOE, "nmi_fold_change", layer=1).n == 2
    assert summary.row(MOE, "nmi", layer=1).n == 3
    [label] = summary.initial_models
    assert summary.row(label, "above_null", layer=1).n == 2
    assert summary.groups[MOE].has_step0 == [True, True, False]
    assert any("1 of 3 runs have no step-0 checkpoint" in w for w in summary.warnings)


def test_fold_change_p_holm_is_holm_over_all_groups_and_layers():
    runs = [*rising_runs(), *rising_runs(MOE2)]
    runs[-1] = moe_run(2, layer_scores(0.02), {"code": 2.0}, start=layer_scores(0.01), group=MOE2)
    summary = summarize(runs)
    rows = [summary.row(g, "nmi_fold_change", layer=1) for g in (MOE, MOE2)]
    assert [r.p_holm for r in rows] == pytest.approx(holm([r.p for r in rows]))
    assert rows[0].p_holm > rows[0].p
    family = summary.family("fold_change")
    assert family.m == 2 and family.threshold == pytest.approx(0.025)
    assert set(family.tests) == {
        (MOE, 1, "nmi_fold_change", None),
        (MOE2, 1, "nmi_fold_change", None),
    }


def test_the_power_of_the_primary_test_at_its_n_and_family_size():
    runs = [*rising_runs(), *rising_runs(MOE2)]
    summary = summarize(runs)
    family = summary.family("fold_change")
    sd = float(np.std(np.log(FOLDS), ddof=1))  # both groups: the same log-ratios
    want = math.exp(detectable_effect(3, sd, 0.05 / 2, 0.8))
    assert (family.n_seeds, family.pooled_sd) == (3, pytest.approx(sd))
    assert family.detectable == pytest.approx(want)
    assert summary.row(MOE, "nmi_fold_change", layer=1).detectable == pytest.approx(want)
    # noncentral t: at that fold change the t-test at 0.025 rejects 80% of the time
    nc = math.log(want) / (sd / math.sqrt(3))
    crit = stats.t.ppf(1 - 0.025 / 2, 2)
    assert stats.nct.sf(crit, 2, nc) == pytest.approx(0.8, abs=1e-3)
    md = render_markdown(summary)
    line = next(x for x in md.splitlines() if x.startswith("Power of the primary test"))
    assert "2 fold-change tests" in line and "n = 3 seeds" in line
    assert f"x{want:.3g}" in line and f"{sd:.3g}" in line


# ----------------------------------------------------------------------------- step 0


def test_step_0_counts_once_per_initial_model_shared_by_three_conditions():
    """top-1, top-2 and no LB of one seed share their initial model: the step-0 family holds
    each seed once (m = 2, not 6; the hash router's own step 0 is a reference, tested in no
    family), so a step-0 p of 0.01 passes Holm (0.02) where counting each condition (0.06)
    would not."""
    groups = [MOE, MOE2, "condition=no_lb,experiment=x"]
    runs = [
        moe_run(
            s,
            layer_scores(0.2 + g / 10),
            {"code": 2.0},
            group=group,
            initial_model=f"m{s}",
            start=layer_scores(0.01 * (s + 1), null_p=0.01),
        )
        for g, group in enumerate(groups)
        for s in range(2)
    ]
    runs.append(  # a router that routes otherwise at step 0: its own initial model
        moe_run(
            0,
            layer_scores(0.3),
            {"code": 2.0},
            group="condition=hash_router,experiment=x",
            initial_model="h0",
            start=layer_scores(0.05, null_p=0.5),
        )
    )
    summary = summarize(runs)
    shared = "step 0: " + " | ".join(sorted(groups))
    hashed = "step 0: condition=hash_router,experiment=x"
    assert list(summary.initial_models) == [hashed, shared]  # by their groups' names
    model = summary.initial_models[shared]
    assert model.groups == sorted(groups) and model.seeds == [0, 1]
    nmi = summary.row(shared, "nmi", layer=1)
    assert nmi.n == 2 and nmi.values == pytest.approx((0.01, 0.02))
    above = summary.row(shared, "above_null", layer=1)
    assert (above.n, above.mean) == (2, 2.0) and above.values == pytest.approx((0.02, 0.02))
    assert summary.row(hashed, "above_null", layer=1) is None
    assert summary.row(hashed, "nmi", layer=1).mean == pytest.approx(0.05)
    family = summary.family("step0_above_null")
    assert family.m == 2 and family.survivors == (
        (shared, 1, "above_null", 0),
        (shared, 1, "above_null", 1),
    )
    assert not [r for r in summary.rows if r.metric.endswith("above_null_step0")]
    md = render_markdown(summary)
    assert "| no LB / top-1 / top-2 | 0, 1 | 1 | 0.0150 [" in md


def test_runs_without_a_key_are_each_their_own_initial_model():
    summary = summarize(sweep())
    [label] = summary.initial_models
    assert summary.initial_models[label].runs == [f"{MOE}-seed0", f"{MOE}-seed1"]


# ----------------------------------------------------------------------------- above null


def test_above_null_counts_runs_below_0_05_after_holm_over_groups_layers_runs():
    # final null_p: MOE 0.001, 0.02; MOE2 0.3, 0.5. Holm over the 4: 0.004, 0.06, 0.6, 0.6.
    # Unadjusted, both MOE runs would count; after Holm only the first does.
    runs = [
        moe_run(0, layer_scores(0.2, null_p=0.001), {"code": 2.0}),
        moe_run(1, layer_scores(0.3, null_p=0.02), {"code": 2.0}),
        moe_run(0, layer_scores(0.1, null_p=0.3), {"code": 2.0}, group=MOE2),
        moe_run(1, layer_scores(0.1, null_p=0.5), {"code": 2.0}, group=MOE2),
    ]
    summary = summarize(runs)
    above = summary.row(MOE, "above_null", layer=1)
    assert (above.n, above.mean, above.method) == (2, 1.0, "count")
    assert above.values == pytest.approx((0.004, 0.06)) and math.isnan(above.ci_low)
    assert above.family == "final_above_null"
    assert summary.row(MOE2, "above_null", layer=1).mean == 0.0
    assert summary.family("final_above_null").survivors == ((MOE, 1, "above_null", 0),)
    # step 0 is its own family: every step-0 null_p is 0.5 (layer_scores' default)
    assert summary.row(f"step 0: {MOE}", "above_null", layer=1).mean == 0.0
    assert summary.row(MOE, "cond_mi_above_null", layer=1).mean == 0.0


def test_above_null_at_step_0_shows_a_random_router_above_its_null():
    summary = summarize(sweep())
    # final null_p 0.01, 0.02 -> Holm 0.02, 0.02: both; step 0: 0.6, 0.01 -> 0.6, 0.02: one
    assert summary.row(MOE, "above_null", layer=1).mean == 2.0
    assert summary.row(f"step 0: {MOE}", "above_null", layer=1).mean == 1.0
    assert not summary.warnings


@pytest.mark.parametrize("permutations", [19, 999])
def test_the_resolution_warning_only_where_1_over_1_plus_k_cannot_pass_holm(permutations):
    runs = [
        moe_run(s, layer_scores(0.2, null_p=0.05), {"code": 2.0}, null_permutations=permutations)
        for s in range(2)
    ]
    summary = summarize(runs)  # m = 2: Holm's first threshold 0.025; 2 * 0.05 = 0.1
    assert summary.row(MOE, "above_null", layer=1).mean == 0.0
    family = summary.family("final_above_null")
    assert family.resolution == pytest.approx(1 / (1 + permutations))
    warned = [w for w in summary.warnings if w.startswith("final_above_null:")]
    md = render_markdown(summary)
    line = next(x for x in md.splitlines() if x.startswith("- `final_above_null`"))
    if permutations == 19:  # 1/20 = 0.05 >= 0.025: no run could ever count
        assert len(warned) == 1 and "1/(1+K) = 0.05" in warned[0] and "0.025" in warned[0]
    else:  # 1/1000 < 0.025: the data, not the resolution
        assert not warned
    assert "No run passes Holm (smallest p 0.050)" in line


# ----------------------------------------------------------------------------- losses


def test_overall_loss_is_token_weighted_and_perplexity_is_per_run():
    summary = summarize(sweep())
    overall = summary.row(MOE, "loss")
    assert overall.layer is None and overall.n == 2 and math.isnan(overall.p)
    assert interval(overall) == pytest.approx(t_row([2.25, 2.30]))
    assert overall.values == pytest.approx((2.25, 2.30))
    assert summary.row(DENSE, "loss").mean == pytest.approx((2.75 + 2.625) / 2)
    assert summary.row(MOE, "loss_math").mean == pytest.approx(2.8)
    ppl = summary.row(MOE, "ppl_code")
    assert interval(ppl) == pytest.approx(t_row([math.exp(2.0), math.exp(2.2)]))


def test_moe_minus_dense_is_paired_when_the_seeds_are_shared():
    summary = summarize(sweep())
    assert summary.groups[MOE].dense_twin == DENSE and summary.groups[DENSE].dense_twin is None
    got = summary.row(MOE, "loss_code_minus_dense")
    want = stats.ttest_rel([2.0, 2.2], [2.5, 2.4])
    low, high = want.confidence_interval(0.95)
    assert (got.n, got.method) == (2, "paired_t")
    assert (got.mean, got.ci_low, got.ci_high, got.p) == pytest.approx(
        (-0.35, low, high, want.pvalue), rel=1e-9
    )
    assert got.seeds == (0, 1) and got.values == pytest.approx((-0.5, -0.2))
    family = [
        summary.row(MOE, m)
        for m in ("loss_code_minus_dense", "loss_math_minus_dense", "loss_minus_dense")
    ]
    assert [r.p_holm for r in family] == pytest.approx(holm([r.p for r in family]))
    assert summary.row(DENSE, "loss_code_minus_dense") is None


def test_moe_minus_dense_is_welch_when_the_seeds_differ():
    runs = sweep()
    runs[3] = dense_run(7, {"code": 2.4, "math": 3.3})
    got = summarize(runs).row(MOE, "loss_code_minus_dense")
    want = stats.ttest_ind([2.0, 2.2], [2.5, 2.4], equal_var=False)
    low, high = want.confidence_interval(0.95)
    assert got.method == "welch_t" and got.values == () and got.seeds == ()
    assert (got.ci_low, got.ci_high, got.p) == pytest.approx((low, high, want.pvalue), rel=1e-9)


def test_direct_contrasts_leave_out_the_twin_pairs_and_dense_routing():
    runs = [
        *sweep(),
        moe_run(0, layer_scores(0.05), {"code": 2.1, "math": 2.9}, group=MOE2),
        moe_run(1, layer_scores(0.08), {"code": 2.3, "math": 2.8}, group=MOE2),
    ]
    summary = summarize(runs)
    # dense - top-1 and dense - top-2 are the MoE - dense rows: not again as direct contrasts
    assert list(summary.contrasts) == [f"{MOE} - {MOE2}"]
    label = f"{MOE} - {MOE2}"
    assert summary.contrasts[label] == (MOE, MOE2)
    loss = summary.row(label, "loss_code")
    want = stats.ttest_rel([2.0, 2.2], [2.1, 2.3])
    assert loss.method == "paired_t" and loss.mean == pytest.approx(-0.1)
    assert loss.p == pytest.approx(want.pvalue, rel=1e-9) and loss.family == "contrast_loss"
    loss_family = [r for r in summary.rows if r.family == "contrast_loss"]
    assert len(loss_family) == 3  # (code, math, overall)
    assert [r.p_holm for r in loss_family] == pytest.approx(holm([r.p for r in loss_family]))
    change = summary.row(label, "nmi_change", layer=1)  # (0.19, 0.27) - (0.04, 0.07)
    want = stats.ttest_rel([0.19, 0.27], [0.04, 0.07])
    assert change.values == pytest.approx((0.15, 0.20))
    assert change.p == pytest.approx(want.pvalue, rel=1e-9) == change.p_holm  # family of one
    assert summary.row(f"{DENSE} - {MOE}", "loss") is None
    assert summary.row(MOE2, "loss_minus_dense").family == "minus_dense"


FROZEN = "condition=frozen_router,experiment=x"
DOMAIN_ROUTER = "condition=domain_router,experiment=x"
TOP1_NMI = (0.30, 0.42, 0.35)
FROZEN_NMI = (0.20, 0.25, 0.31)


def primary_sweep() -> list[RunResult]:
    """top-1 and its frozen-router twin, 3 seeds, sharing their initial model per seed; the
    top-1 domain gain is twice its NMI / 4, the frozen router's its NMI / 4."""
    runs = []
    for s, (a, b) in enumerate(zip(TOP1_NMI, FROZEN_NMI, strict=True)):
        runs.append(
            moe_run(s, layer_scores(a, domain_gain=a / 2), {"code": 2.0}, initial_model=f"m{s}")
        )
        runs.append(moe_run(s, layer_scores(b), {"code": 2.1}, group=FROZEN, initial_model=f"m{s}"))
    return runs


def test_the_primary_contrast_top1_minus_frozen_router_paired_by_seed():
    summary = summarize(primary_sweep())
    label = f"{MOE} - {FROZEN}"
    assert summary.primary == {label: (MOE, FROZEN)}
    nmi = summary.row(label, "nmi", layer=1)
    want = stats.ttest_rel(TOP1_NMI, FROZEN_NMI)
    assert (nmi.method, nmi.family, nmi.seeds) == ("paired_t", "primary_nmi", (0, 1, 2))
    assert nmi.values == pytest.approx(np.subtract(TOP1_NMI, FROZEN_NMI))
    assert nmi.p == pytest.approx(want.pvalue, rel=1e-9) == nmi.p_holm  # one layer
    gain = summary.row(label, "domain_gain", layer=1)
    want = stats.ttest_rel(np.divide(TOP1_NMI, 2), np.divide(FROZEN_NMI, 4))
    assert gain.family == "primary_domain_gain" and gain.p == pytest.approx(want.pvalue)
    # the pair shares its step 0: its NMI-change contrast would be the same test again
    assert summary.row(label, "nmi_change", layer=1) is None and label not in summary.contrasts
    # the loss contrast is a test of its own (a direct contrast, groups in name order)
    assert summary.row(f"{FROZEN} - {MOE}", "loss").family == "contrast_loss"
    assert summary.row(f"{FROZEN} - {MOE}", "nmi_change", layer=1) is None
    assert list(summary.initial_models) == [f"step 0: {FROZEN} | {MOE}"]
    md = render_markdown(summary)
    first = next(x for x in md.splitlines() if x.startswith("## "))
    assert first.startswith("## Primary: top-1 - frozen router at the final step")
    family = summary.family("primary_nmi")
    sd = float(np.std(np.subtract(TOP1_NMI, FROZEN_NMI), ddof=1))
    assert family.detectable == pytest.approx(detectable_effect(3, sd, 0.05)) == nmi.detectable
    assert f"the smallest NMI difference detected with 80% power is {family.detectable:.3g}" in md
    name = condition_labels([MOE, FROZEN])[FROZEN]  # the label results.py gives it
    assert f"| top-1 - {name} | 1 | NMI | {np.mean(TOP1_NMI):.4f} [" in md


def test_the_primary_family_is_holm_over_layers():
    runs = primary_sweep()
    for run in runs:  # a second MoE layer: NMI shifted by 0.1 in the top-1 runs
        run.layers = [1, 2]
        for c in run.checkpoints:
            shift = 0.1 if run.group == MOE else 0.0
            c.scores[2] = layer_scores(c.scores[1].nmi + shift)
    summary = summarize(runs)
    label = f"{MOE} - {FROZEN}"
    rows = [summary.row(label, "nmi", layer) for layer in (1, 2)]
    assert [r.p_holm for r in rows] == pytest.approx(holm([r.p for r in rows]))
    assert summary.family("primary_nmi").m == 2


def test_every_moe_condition_as_a_share_of_the_domain_router():
    runs = primary_sweep()
    runs += [
        moe_run(s, layer_scores(1.0, domain_gain=0.5), {"code": 2.0}, group=DOMAIN_ROUTER)
        for s in range(3)
    ]
    summary = summarize(runs)
    share = summary.row(MOE, "nmi_share_of_domain_router", layer=1)
    assert share.values == pytest.approx(TOP1_NMI) and share.method == "t"
    gain = summary.row(FROZEN, "domain_gain_share_of_domain_router", layer=1)
    assert gain.values == pytest.approx(np.divide(FROZEN_NMI, 4) / 0.5)
    assert summary.row(DOMAIN_ROUTER, "nmi_share_of_domain_router", layer=1) is None
    # its routing is fixed by construction: its fold change is shown, not tested
    fold = summary.row(DOMAIN_ROUTER, "nmi_fold_change", layer=1)
    assert fold.family == "" and math.isnan(fold.p) and summary.family("fold_change").m == 2
    assert summary.row(DOMAIN_ROUTER, "above_null", layer=1) is None  # nor its null counts
    assert summary.family("final_above_null").m == 6
    # a reference router is no direct routing contrast; its loss contrasts stay
    assert summary.row(f"{DOMAIN_ROUTER} - {MOE}", "nmi_change", layer=1) is None
    md = render_markdown(summary)
    assert "share of domain router" in md
    row = next(x for x in md.splitlines() if x.startswith("| top-1 | 1 | 0.3567 ["))
    assert f"{np.mean(TOP1_NMI):.3f} [" in row.split("|")[7]


def test_share_of_the_domain_router_unpaired_is_a_ratio_of_means():
    runs = [
        *primary_sweep()[::2],
        moe_run(7, layer_scores(0.8), {"code": 2.0}, group=DOMAIN_ROUTER),
        moe_run(8, layer_scores(1.0), {"code": 2.0}, group=DOMAIN_ROUTER),
    ]
    share = summarize(runs).row(MOE, "nmi_share_of_domain_router", layer=1)
    assert share.method == "ratio_of_means" and share.mean == pytest.approx(np.mean(TOP1_NMI) / 0.9)


def test_each_test_is_in_one_family_and_one_table():
    runs = [
        *primary_sweep(),
        *[dense_run(s, {"code": 2.5, "math": 3.5}) for s in range(3)],
        *[moe_run(s, layer_scores(0.1 + s / 50), {"code": 2.2}, group=MOE2) for s in range(3)],
    ]
    summary = summarize(runs)
    tested = [r for r in summary.rows if r.family and r.method != "count"]
    keys = [(r.group, r.layer, r.metric) for r in tested]
    assert len(keys) == len(set(keys))
    names = [f.name for f in summary.families]
    assert len(names) == len(set(names))
    for family in summary.families:
        members = [r for r in tested if r.family == family.name]
        if members:
            assert family.m == sum(not math.isnan(r.p) for r in members)
            assert [r.p_holm for r in members] == pytest.approx(holm([r.p for r in members]))
            survivors = {(r.group, r.layer, r.metric, None) for r in members if r.p_holm < 0.05}
            assert set(family.survivors) == survivors
    # top-2 vs dense on loss: only the MoE - dense row, never a direct contrast as well
    pairs = [set(pair) for pair in summary.contrasts.values()]
    assert {MOE2, DENSE} not in pairs and {MOE, DENSE} not in pairs
    # each tested row's p_holm is printed in exactly one table line of summary.md
    md = render_markdown(summary)
    families = md[md.index("## Holm families") :]
    assert families.count("- `") == len([f for f in summary.families if f.m])
    for f in summary.families:
        if f.m:
            assert families.count(f"`{f.name}` (m = {f.m};") == 1


def test_twin_rule_keys_missing_or_outside_model_condition_experiment_exclude_a_twin():
    moe = moe_run(0, layer_scores(0.2), {"code": 2.0}, group="condition=top1,data.mb=1")
    other_data = dense_run(0, {"code": 2.0}, group="condition=dense,data.mb=2")
    missing = dense_run(0, {"code": 2.0}, group="condition=dense")
    twins, warnings = dense_twins(group_runs([moe, other_data, missing]))
    assert twins == {moe.group: None} and not warnings
    # model.* keys and the model group may differ; the closest candidate wins
    moe = moe_run(0, layer_scores(0.2), {"code": 2.0}, group="model.n_experts=8,model=moe")
    near = dense_run(0, {"code": 2.0}, group="model=gpt2")
    far = dense_run(0, {"code": 2.0}, group="+model.dropout=0,model=gpt2")
    twins, warnings = dense_twins(group_runs([moe, far, near]))
    assert twins == {moe.group: near.group} and not warnings


def test_an_ambiguous_twin_warns_and_gives_no_difference_rows(tmp_path):
    runs = [
        *sweep(),
        dense_run(0, {"code": 2.5, "math": 3.5}, group="condition=dense2,experiment=x"),
    ]
    files = write_summary(runs, tmp_path)
    assert len(files.warnings) == 1 and "'condition=dense2,experiment=x'" in files.warnings[0]
    assert DENSE in files.warnings[0]
    doc = json.loads(files.json.read_text())
    assert doc["warnings"] == files.warnings and doc["groups"][MOE]["dense_twin"] is None
    assert not [r for r in doc["rows"] if r["metric"].endswith("_minus_dense")]
    assert "## MoE - dense" not in files.markdown.read_text()


def test_runs_ending_at_different_steps_are_summarised_with_a_warning(tmp_path):
    runs = sweep()
    runs[1] = moe_run(1, layer_scores(0.30, null_p=0.02), {"code": 2.2, "math": 2.6}, step=90)
    files = write_summary(runs, tmp_path)
    assert len(files.warnings) == 1
    assert MOE in files.warnings[0] and "[90, 100]" in files.warnings[0]
    doc = json.loads(files.json.read_text())
    assert doc["groups"][MOE]["final_steps"] == [100, 90] and doc["warnings"] == files.warnings
    assert summarize(runs).row(MOE, "nmi", layer=1).mean == pytest.approx(0.25)


# ----------------------------------------------------------------------------- files


def test_csv_and_json_hold_the_rows_with_p_values_and_per_seed_values(tmp_path):
    runs = sweep()
    summary = summarize(runs)
    files = write_summary(runs, tmp_path)
    assert files.figures == [] and not list(tmp_path.glob(".*"))  # no temp files left

    with files.csv.open(newline="") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == COLUMNS and len(table) == len(summary.rows)
    assert {"p", "p_holm", "values"} <= set(COLUMNS)
    for line, row in zip(table, summary.rows, strict=True):
        mean = float(line["mean"]) if line["mean"] else NAN  # NaN: an empty cell
        assert mean == row.mean or math.isnan(mean) == math.isnan(row.mean) is True
        assert line["layer"] == ("" if row.layer is None else str(row.layer))
        values = [float(v) for v in line["values"].split(";") if v]
        assert values == pytest.approx(row.values, nan_ok=True)
    nmi = next(line for line in table if line["metric"] == "nmi")
    assert nmi["values"] == "0.2;0.3" and nmi["seeds"] == "0;1" and nmi["p"] == ""
    fold = next(line for line in table if line["metric"] == "nmi_fold_change")
    assert float(fold["p"]) == summary.row(MOE, "nmi_fold_change", 1).p and fold["p_holm"]
    assert fold["family"] == "fold_change" and float(fold["detectable"]) > 1
    assert next(line for line in table if line["metric"] == "nmi_change")["p"] == ""

    doc = json.loads(files.json.read_text())
    assert doc["confidence"] == 0.95 and "Student" in doc["interval"]
    assert "bootstrap" not in doc["interval"] and "Holm" in doc["p_values"]
    assert doc["contrasts"] == {} and doc["primary"] == {}  # dense - top-1 is MoE - dense
    assert doc["initial_models"] == {
        f"step 0: {MOE}": {
            "groups": [MOE],
            "runs": [f"{MOE}-seed0", f"{MOE}-seed1"],
            "seeds": [0, 1],
            "reference": False,
        }
    }
    families = {f["name"]: f for f in doc["families"]}
    assert families["fold_change"]["m"] == 1 and families["minus_dense"]["m"] == 3
    assert families["fold_change"]["resolution"] is None  # a t-test
    assert families["final_above_null"]["resolution"] == pytest.approx(1 / 1000)
    above = next(r for r in doc["rows"] if r["metric"] == "above_null")
    assert above["ci_low"] is None and above["layer"] == 1 and above["method"] == "count"
    nmi = next(r for r in doc["rows"] if r["metric"] == "nmi")
    assert nmi["values"] == [0.2, 0.3] and nmi["seeds"] == [0, 1] and nmi["p"] is None
    assert doc["groups"][MOE] == {
        "runs": [f"{MOE}-seed0", f"{MOE}-seed1"],
        "seeds": [0, 1],
        "moe": True,
        "final_steps": [100, 100],
        "dense_twin": DENSE,
        "has_step0": [True, True],
    }


def test_markdown_tables_show_per_seed_values_p_and_p_holm(tmp_path):
    summary = summarize(sweep())
    md = render_markdown(summary)
    lines = md.splitlines()
    assert "unit of replication" in lines[0].lower() and "n - 1 df" in lines[0]
    assert (
        "below 0" in lines[0]
        and "Holm" in lines[0]
        and "id share" not in md
        and "id_share" not in md
    )
    start = summary.row(MOE, "nmi_step0", 1)
    fold = summary.row(MOE, "nmi_fold_change", 1)
    nmi = (
        f"| top-1 | 1 | {start.mean:.4f} [{start.ci_low:.4f}, {start.ci_high:.4f}] "
        "(0.0100, 0.0300) | 0.2500 ["
    )
    row = next(line for line in lines if line.startswith(nmi))
    assert "(0.2000, 0.3000)" in row and "(0.1900, 0.2700)" in row and "(20, 10)" in row
    assert f"| {fold.p:.3f} / {fold.p_holm:.3f} | x{fold.detectable:.3g} |" in row
    routing = next(line for line in lines if line.startswith("| top-1 | 1 | 0.2500 ["))
    assert "| 0.1600 (0.0800) | 2/2 |" in routing  # null p95 (mean), runs above it
    step0 = next(line for line in lines if line.startswith("| top-1 | 0, 1 | 1 |"))
    assert "| 1/2 |" in step0  # a random router above its null at step 0, once per model
    runs = [line for line in lines if line.startswith("| top-1 | 0 | 1 | 0.0100 | 0.2000 |")]
    assert runs == ["| top-1 | 0 | 1 | 0.0100 | 0.2000 | 0.1900 [-, -] |"]  # no interval here
    assert "| condition | code | math | overall (token-weighted) |" in lines
    assert (
        "| top-1 | 2.100 [0.829, 3.371] (2.000, 2.200) | 2.800 [0.259, 5.341] "
        "(3.000, 2.600) | 2.275 [1.957, 2.593] (2.250, 2.300) |"
    ) in lines
    diff = summary.row(MOE, "loss_code_minus_dense")
    assert (
        f"| top-1 | dense | code | {diff.mean:.3f} [{diff.ci_low:.3f}, "
        f"{diff.ci_high:.3f}] (-0.500, -0.200) | paired_t | {diff.p:.3f} | "
        f"{diff.p_holm:.3f} |"
    ) in lines
    assert "## Direct contrasts" not in md  # dense - top-1 is the MoE - dense table's
    assert "## Holm families" in md and "- `minus_dense` (m = 3;" in md


def test_the_per_run_change_interval_is_shown_per_run():
    runs = sweep()
    runs[0].nmi_change_intervals[1] = (0.12, 0.25)
    md = render_markdown(summarize(runs))
    assert "| top-1 | 0 | 1 | 0.0100 | 0.2000 | 0.1900 [0.1200, 0.2500] |" in md.splitlines()


def _p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def test_five_or_more_seeds_show_no_per_seed_values():
    runs = [moe_run(s, layer_scores(0.2 + s / 100), {"code": 2.0}) for s in range(5)]
    md = render_markdown(summarize(runs))
    line = next(x for x in md.splitlines() if x.startswith("| top-1 | 1 |"))
    assert "0.2000, 0.2100" not in line and line.count("(") == 0


def test_a_single_run_gives_n1_rows_with_empty_bounds(tmp_path):
    run = moe_run(0, layer_scores(0.2, null_p=0.01), {"code": 2.0, "math": 3.0})
    files = write_summary([run], tmp_path)
    with files.csv.open(newline="") as f:
        table = list(csv.DictReader(f))
    nmi = next(line for line in table if line["metric"] == "nmi")
    assert (nmi["n"], nmi["mean"], nmi["ci_low"], nmi["ci_high"], nmi["method"]) == (
        "1",
        "0.2",
        "",
        "",
        "none",
    )
    assert not [line for line in table if "minus_dense" in line["metric"]]
    doc = json.loads(files.json.read_text())
    assert {r["n"] for r in doc["rows"] if not r["metric"].startswith("nmi_change_")} == {1}
    assert doc["groups"][MOE]["dense_twin"] is None
    md = files.markdown.read_text()
    assert "| 0.2000 (n=1) |" in md and "| 2.000 (n=1) |" in md and "1/1" in md


def test_the_three_sweep_figures_are_written(tmp_path):
    files = write_summary(sweep(), tmp_path, figures=True)
    names = [p.name for p in files.figures]
    assert names == ["emergence.png", "heatmaps.png", "held_out_loss.png"]
    for path in files.figures:
        assert path.read_bytes()[:8] == PNG


def with_saturation(run: RunResult, top1: dict[int, float], chance: float) -> RunResult:
    """``run`` with router saturation at its checkpoints: first choice ``top1[step]``, chance
    ``chance`` (top-k: half of them), as analyze's specialisation metrics give it."""
    checkpoints = [
        replace(
            c,
            specialisation={
                1: SimpleNamespace(
                    saturation_top1=top1[c.step],
                    saturation_top1_chance=chance,
                    saturation_topk=top1[c.step] / 2,
                    saturation_topk_chance=chance / 2,
                )
            },
        )
        for c in run.checkpoints
    ]
    return replace(run, checkpoints=checkpoints)


def saturation_sweep() -> list[RunResult]:
    """top-1 and top-2, 2 seeds each, with saturation at steps 0, 50, 100; dense beside."""
    losses = {"code": 2.0, "math": 3.0}
    return [
        with_saturation(moe_run(0, layer_scores(0.2), losses), {0: 0.3, 50: 0.6, 100: 1.0}, 0.3),
        with_saturation(moe_run(1, layer_scores(0.3), losses), {0: 0.4, 50: 0.8, 100: 1.0}, 0.5),
        with_saturation(
            moe_run(0, layer_scores(0.1), losses, group=MOE2), {0: 0.2, 50: 0.5, 100: 1.0}, 0.25
        ),
        with_saturation(
            moe_run(1, layer_scores(0.1), losses, group=MOE2), {0: 0.3, 50: 0.4, 100: 1.0}, 0.35
        ),
        dense_run(0, losses),
        dense_run(1, losses),
    ]


def test_the_sweep_saturation_figure_draws_each_conditions_mean_band_and_chance(tmp_path):
    """Per MoE condition and layer: the mean top-1 saturation over seeds (labelled by the
    condition), its 95% band over seeds, the mean chance level dashed; written beside the
    other sweep figures and listed with them."""
    runs = saturation_sweep()
    fig = sweep_saturation_figure(runs)
    (ax,) = fig.axes  # one MoE layer
    assert ax.get_title() == "layer 1"
    solid = [line for line in ax.lines if line.get_linestyle() == "-"]
    dashed = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert [line.get_label() for line in solid] == ["top-1", "top-2"]  # no dense line
    assert len(dashed) == 2 and len(ax.collections) == 2  # a chance line and a band each
    for line, expected in zip(
        solid + dashed,
        ([0.35, 0.7, 1.0], [0.25, 0.45, 1.0], [0.4] * 3, [0.3] * 3),
        strict=True,
    ):
        assert list(line.get_xdata()) == [0, 50, 100]
        assert np.allclose(line.get_ydata(), expected)

    files = write_summary(runs, tmp_path, figures=True)
    names = [p.name for p in files.figures]
    assert names == ["emergence.png", "heatmaps.png", "saturation.png", "held_out_loss.png"]
    assert (tmp_path / "saturation.png").read_bytes()[:8] == PNG


def test_only_the_figures_with_something_to_draw(tmp_path):
    dense = [dense_run(0, {"code": 2.5}), dense_run(1, {"code": 2.4})]
    files = write_summary(dense, tmp_path, figures=True)
    assert [p.name for p in files.figures] == ["held_out_loss.png"]
    assert "Routing" not in files.markdown.read_text()


def test_approximate_probe_intervals_are_marked_in_each_runs_change_table(tmp_path):
    """A run whose probe intervals may cover less than 93% (unmatched or few documents) is
    marked ``approx.``; one whose probe is matched is not."""
    runs = [
        moe_run(0, layer_scores(0.2, nmi_interval_approximate=True), {"code": 2.0}),
        moe_run(1, layer_scores(0.3), {"code": 2.1}),
    ]
    summary = summarize(runs)
    assert summary.row(MOE, "nmi_interval_approximate", layer=1).values == (1.0, 0.0)
    text = write_summary(runs, tmp_path).markdown.read_text()
    table = text.split("## Each run's change from step 0")[1].split("\n## ")[0]
    lines = [line for line in table.splitlines() if line.startswith("| top-1 |")]
    assert len(lines) == 2
    assert lines[0].endswith("approx. |") and not lines[1].endswith("approx. |")
    assert "approx.: an interval whose coverage may fall below 93%" in table
