"""The sweep summary on synthetic RunResults with chosen numbers: t-intervals and tests equal to
scipy's, changes from step 0, runs above the document-level null after Holm, paired vs Welch
differences, direct contrasts, the files (CSV, JSON, Markdown, PNG figures) and the warnings."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from moe_emergence.analysis.intervals import holm
from moe_emergence.analysis.results import CheckpointResult, HeldOutLoss, RunResult
from moe_emergence.analysis.scores import LayerScores
from moe_emergence.analysis.summary import (
    COLUMNS,
    ROUTING_METRICS,
    dense_twins,
    group_runs,
    summarize,
)
from moe_emergence.analysis.summary_files import render_markdown
from moe_emergence.analysis.summary_files import write_summary as _write_summary

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


def layer_scores(nmi: float, null_p95: float = 0.1, null_p: float = 0.5, **kw) -> LayerScores:
    """Scores with chosen nmi, null_p95, null_p; the rest fixed unless given in ``kw``."""
    values = dict(
        nmi=nmi,
        nmi_low=nmi * 0.8,
        nmi_high=nmi * 1.2,
        null_mean=null_p95 / 2,
        null_p95=null_p95,
        null_p=null_p,
        cond_mi=0.01,
        cond_mi_null_mean=0.005,
        cond_mi_null_p95=0.02,
        cond_mi_null_p=0.5,
        token_id_nmi=nmi / 2,
        domain_only_nmi=nmi * 0.9,
        usage_entropy=1.3,
        router_entropy=1.2,
        n_documents=16,
    )
    values.update(kw)
    return LayerScores(**values)


def checkpoint(step: int, losses: dict[str, float], scores: LayerScores | None) -> CheckpointResult:
    held = {d: HeldOutLoss(loss, TOKENS[d]) for d, loss in losses.items()}
    if scores is None:
        return CheckpointResult(step, losses=held)
    counts = np.array([[30, 10, 5, 5], [5, 5, 20, 20]], dtype=np.int64)  # [D, E]
    return CheckpointResult(step, counts={1: counts}, scores={1: scores}, losses=held)


def run_result(
    overrides: list[str], seed: int, checkpoints: list[CheckpointResult], moe: bool
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
    )


def moe_run(
    seed, final, losses, start=None, step=100, group=MOE, step0=True, middle=True
) -> RunResult:
    """An MoE run: a step-0 checkpoint (scores ``start``, default nmi 0.01) unless not
    ``step0``, a middle one at step 50, and the final one at ``step`` (scores ``final``)."""
    start = start if start is not None else layer_scores(0.01)
    ckpts = [checkpoint(0, {d: x + 1.0 for d, x in losses.items()}, start)] if step0 else []
    if middle:
        ckpts.append(checkpoint(50, {d: x + 0.5 for d, x in losses.items()}, layer_scores(0.1)))
    ckpts.append(checkpoint(step, losses, final))
    return run_result(group.split(","), seed, ckpts, moe=True)


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
    changes = {
        f"{m}_{s}"
        for m in ("nmi", "cond_mi", "token_id_nmi", "domain_only_nmi")
        for s in ("step0", "change")
    }
    counts = {"above_null", "cond_mi_above_null", "above_null_step0", "cond_mi_above_null_step0"}
    assert metrics == set(ROUTING_METRICS) | changes | counts
    assert not any("share" in r.metric for r in summary.rows)
    assert not [r for r in summary.rows if r.group == DENSE and r.layer is not None]
    domain_only = summary.row(MOE, "domain_only_nmi", layer=1)
    assert domain_only.mean == pytest.approx(0.25 * 0.9)


def test_change_from_step_0_is_per_run_then_a_t_test_against_0():
    summary = summarize(sweep())
    start = summary.row(MOE, "nmi_step0", layer=1)
    assert start.values == pytest.approx((0.01, 0.03)) and math.isnan(start.p)
    change = summary.row(MOE, "nmi_change", layer=1)
    want = stats.ttest_1samp([0.19, 0.27], 0.0)
    assert (change.n, change.method) == (2, "t")
    assert interval(change) == pytest.approx(t_row([0.19, 0.27]), rel=1e-9)
    assert change.values == pytest.approx((0.19, 0.27))
    assert change.p == pytest.approx(want.pvalue, rel=1e-9)
    assert change.p_holm == pytest.approx(want.pvalue, rel=1e-9)  # a family of one test
    token = summary.row(MOE, "token_id_nmi_change", layer=1)
    assert token.mean == pytest.approx((0.19 + 0.27) / 4)


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
    assert summary.row(MOE, "nmi", layer=1).n == 3
    assert summary.row(MOE, "above_null_step0", layer=1).n == 2
    assert summary.groups[MOE].has_step0 == [True, True, False]
    assert any("1 of 3 runs have no step-0 checkpoint" in w for w in summary.warnings)


def test_change_p_holm_is_holm_over_all_groups_and_layers():
    runs = [
        *sweep()[:2],
        moe_run(0, layer_scores(0.05), {"code": 2.0}, group=MOE2),
        moe_run(1, layer_scores(0.09), {"code": 2.0}, group=MOE2),
    ]
    summary = summarize(runs)
    rows = [summary.row(g, "nmi_change", layer=1) for g in (MOE, MOE2)]
    assert [r.p_holm for r in rows] == pytest.approx(holm([r.p for r in rows]))
    assert rows[0].p_holm > rows[0].p


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
    assert summary.row(MOE2, "above_null", layer=1).mean == 0.0
    # step 0 is its own family: every step-0 null_p is 0.5 (layer_scores' default)
    assert summary.row(MOE, "above_null_step0", layer=1).mean == 0.0
    assert summary.row(MOE, "cond_mi_above_null", layer=1).mean == 0.0


def test_above_null_at_step_0_shows_a_random_router_above_its_null():
    summary = summarize(sweep())
    # final null_p 0.01, 0.02 -> Holm 0.02, 0.02: both; step 0: 0.6, 0.01 -> 0.6, 0.02: one
    assert summary.row(MOE, "above_null", layer=1).mean == 2.0
    assert summary.row(MOE, "above_null_step0", layer=1).mean == 1.0
    assert not summary.warnings


def test_a_family_holm_can_never_pass_warns_about_the_permutation_count():
    runs = [moe_run(s, layer_scores(0.2, null_p=0.03), {"code": 2.0}) for s in range(2)]
    summary = summarize(runs)  # 2 * 0.03 = 0.06: no run can count
    assert summary.row(MOE, "above_null", layer=1).mean == 0.0
    assert any(w.startswith("above_null: Holm over the 2") for w in summary.warnings)


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


def test_direct_contrasts_of_every_pair_with_holm_per_table():
    runs = [
        *sweep(),
        moe_run(0, layer_scores(0.05), {"code": 2.1, "math": 2.9}, group=MOE2),
        moe_run(1, layer_scores(0.08), {"code": 2.3, "math": 2.8}, group=MOE2),
    ]
    summary = summarize(runs)
    labels = [f"{DENSE} - {MOE}", f"{DENSE} - {MOE2}", f"{MOE} - {MOE2}"]
    assert list(summary.contrasts) == labels
    assert summary.contrasts[labels[2]] == (MOE, MOE2)
    loss = summary.row(labels[2], "loss_code")
    want = stats.ttest_rel([2.0, 2.2], [2.1, 2.3])
    assert loss.method == "paired_t" and loss.mean == pytest.approx(-0.1)
    assert loss.p == pytest.approx(want.pvalue, rel=1e-9)
    loss_family = [r for r in summary.rows if r.group in labels and r.metric.startswith("loss")]
    assert len(loss_family) == 3 * 3  # pairs x (code, math, overall)
    assert [r.p_holm for r in loss_family] == pytest.approx(holm([r.p for r in loss_family]))
    change = summary.row(labels[2], "nmi_change", layer=1)  # (0.19, 0.27) - (0.04, 0.07)
    want = stats.ttest_rel([0.19, 0.27], [0.04, 0.07])
    assert change.values == pytest.approx((0.15, 0.20))
    assert change.p == pytest.approx(want.pvalue, rel=1e-9) == change.p_holm  # family of one
    assert summary.row(labels[0], "nmi_change", layer=1) is None  # dense has no routing


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
        assert float(line["mean"]) == row.mean  # full precision: reads back equal
        assert line["layer"] == ("" if row.layer is None else str(row.layer))
        assert [float(v) for v in line["values"].split(";") if v] == pytest.approx(row.values)
    nmi = next(line for line in table if line["metric"] == "nmi")
    assert nmi["values"] == "0.2;0.3" and nmi["seeds"] == "0;1" and nmi["p"] == ""
    change = next(line for line in table if line["metric"] == "nmi_change")
    assert float(change["p"]) == summary.row(MOE, "nmi_change", 1).p and change["p_holm"]

    doc = json.loads(files.json.read_text())
    assert doc["confidence"] == 0.95 and "Student" in doc["interval"]
    assert "bootstrap" not in doc["interval"] and "Holm" in doc["p_values"]
    assert doc["contrasts"] == {f"{DENSE} - {MOE}": [DENSE, MOE]}
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
    change = summary.row(MOE, "nmi_change", 1)
    nmi = (
        f"| top-1 | 1 | {start.mean:.4f} [{start.ci_low:.4f}, {start.ci_high:.4f}] "
        "(0.0100, 0.0300) | 0.2500 ["
    )
    row = next(line for line in lines if line.startswith(nmi))
    assert "(0.2000, 0.3000)" in row and "(0.1900, 0.2700)" in row
    assert f"| {change.p:.3f} / {change.p_holm:.3f} | 0.1600 | 2/2 | 1/2 |" in row
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
    assert "## Direct contrasts: held-out loss A - B" in md
    contrast = summary.row(f"{DENSE} - {MOE}", "loss")
    assert f"| dense - top-1 | overall | {contrast.mean:.3f} [" in md
    assert f"| {_p(contrast.p)} | {_p(contrast.p_holm)} |" in md


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
    assert {r["n"] for r in doc["rows"]} == {1} and doc["groups"][MOE]["dense_twin"] is None
    md = files.markdown.read_text()
    assert "| 0.2000 (n=1) |" in md and "| 2.000 (n=1) |" in md and "1/1" in md


def test_the_three_sweep_figures_are_written(tmp_path):
    files = write_summary(sweep(), tmp_path, figures=True)
    names = [p.name for p in files.figures]
    assert names == ["emergence.png", "heatmaps.png", "held_out_loss.png"]
    for path in files.figures:
        assert path.read_bytes()[:8] == PNG


def test_only_the_figures_with_something_to_draw(tmp_path):
    dense = [dense_run(0, {"code": 2.5}), dense_run(1, {"code": 2.4})]
    files = write_summary(dense, tmp_path, figures=True)
    assert [p.name for p in files.figures] == ["held_out_loss.png"]
    assert "Routing" not in files.markdown.read_text()
