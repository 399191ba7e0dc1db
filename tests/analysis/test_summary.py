"""The sweep summary on synthetic RunResults with chosen numbers: known intervals, the dense
twin, the files (CSV, JSON, Markdown, PNG figures) and the warnings."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from moe_emergence.analysis.intervals import difference_interval
from moe_emergence.analysis.results import CheckpointResult, HeldOutLoss, RunResult
from moe_emergence.analysis.scores import LayerScores
from moe_emergence.analysis.summary import COLUMNS, dense_twins, group_runs, summarize
from moe_emergence.analysis.summary import write_summary as _write_summary

MOE = "condition=top1,experiment=x"
DENSE = "condition=dense,experiment=x"
DOMAINS = ("code", "math")
TOKENS = {"code": 300, "math": 100}  # overall loss = (3 * code + math) / 4
T1 = stats.t.ppf(0.975, 1)  # 12.706...: the t quantile of two runs
PNG = b"\x89PNG\r\n\x1a\n"


def write_summary(results, out_dir, figures=False):
    """Figures off unless a test asks: they take the file's time."""
    return _write_summary(results, out_dir, figures=figures)


def layer_scores(nmi: float, null_p95: float, share: float = 0.5) -> LayerScores:
    return LayerScores(
        nmi=nmi, null_mean=null_p95 / 2, null_p95=null_p95, cond_mi=0.01, cond_mi_null_mean=0.005,
        cond_mi_null_p95=0.02, token_id_nmi=nmi * share, token_id_share=share,
        usage_entropy=1.3, router_entropy=1.2,
    )  # fmt: skip


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
        name=f"{group}-seed{seed}", run_dir=Path("/nowhere"), group=group, seed=seed,
        overrides=overrides, moe=moe, domains=DOMAINS, layers=[1] if moe else [], n_experts=4,
        probe="held_out", probe_blocks={d: 8 for d in DOMAINS}, checkpoints=checkpoints,
    )  # fmt: skip


def moe_run(seed, nmi, null_p95, share, losses, step=100, overrides=None) -> RunResult:
    early = checkpoint(0, {d: loss + 1.0 for d, loss in losses.items()}, layer_scores(0.01, 0.02))
    final = checkpoint(step, losses, layer_scores(nmi, null_p95, share))
    return run_result(overrides or MOE.split(","), seed, [early, final], moe=True)


def dense_run(seed, losses, overrides=None) -> RunResult:
    early = checkpoint(0, {d: loss + 1.0 for d, loss in losses.items()}, None)
    final = checkpoint(100, losses, None)
    return run_result(overrides or DENSE.split(","), seed, [early, final], moe=False)


def sweep() -> list[RunResult]:
    """2 conditions x 2 seeds. MoE nmi 0.20 / 0.30 over null p95 0.22 / 0.10 (1 of 2 above);
    overall losses MoE 2.25 / 2.30, dense 2.75 / 2.625."""
    return [
        moe_run(0, 0.20, 0.22, 0.4, {"code": 2.0, "math": 3.0}),
        moe_run(1, 0.30, 0.10, 0.6, {"code": 2.2, "math": 2.6}),
        dense_run(0, {"code": 2.5, "math": 3.5}),
        dense_run(1, {"code": 2.4, "math": 3.3}),
    ]


def hand_t(values: list[float]) -> tuple[float, float, float]:
    mean = float(np.mean(values))
    half = T1 * np.std(values, ddof=1) / math.sqrt(2)
    return mean, mean - half, mean + half


def test_routing_rows_are_t_intervals_by_hand():
    summary = summarize(sweep())
    nmi = summary.row(MOE, "nmi", layer=1)
    assert (nmi.n, nmi.method) == (2, "t")
    assert (nmi.mean, nmi.ci_low, nmi.ci_high) == pytest.approx(hand_t([0.20, 0.30]), rel=1e-12)
    share = summary.row(MOE, "token_id_share", layer=1)
    assert (share.mean, share.ci_low, share.ci_high) == pytest.approx(hand_t([0.4, 0.6]))
    metrics = {r.metric for r in summary.rows if r.group == MOE and r.layer == 1}
    assert metrics == {
        "nmi", "null_mean", "null_p95", "token_id_nmi", "token_id_share", "cond_mi",
        "cond_mi_null_p95", "usage_entropy", "router_entropy", "above_null", "cond_mi_above_null",
    }  # fmt: skip
    assert not [r for r in summary.rows if r.group == DENSE and r.layer is not None]


def test_above_null_is_the_share_of_runs_whose_nmi_beats_the_null_p95():
    above = summarize(sweep()).row(MOE, "above_null", layer=1)
    assert (above.n, above.mean, above.method) == (2, 0.5, "count")  # 0.20 < 0.22, 0.30 > 0.10
    assert math.isnan(above.ci_low) and math.isnan(above.ci_high)
    beyond = summarize(sweep()).row(MOE, "cond_mi_above_null", layer=1)
    assert (beyond.n, beyond.mean, beyond.method) == (2, 0.0, "count")  # cond_mi 0.01 < 0.02


def test_overall_loss_is_token_weighted_and_perplexity_is_per_run():
    summary = summarize(sweep())
    overall = summary.row(MOE, "loss")
    assert overall.layer is None and overall.n == 2
    assert (overall.mean, overall.ci_low, overall.ci_high) == pytest.approx(hand_t([2.25, 2.30]))
    assert summary.row(DENSE, "loss").mean == pytest.approx((2.75 + 2.625) / 2)
    assert summary.row(MOE, "loss_math").mean == pytest.approx(2.8)
    ppl = summary.row(MOE, "ppl_code")
    assert ppl.mean == pytest.approx((math.exp(2.0) + math.exp(2.2)) / 2)
    assert ppl.ci_high == pytest.approx(hand_t([math.exp(2.0), math.exp(2.2)])[2])


def test_dense_twin_is_found_and_the_difference_rows_are_welch_intervals():
    summary = summarize(sweep())
    assert summary.groups[MOE].dense_twin == DENSE and summary.groups[DENSE].dense_twin is None
    assert not summary.warnings
    want = difference_interval([2.0, 2.2], [2.5, 2.4])
    got = summary.row(MOE, "loss_code_minus_dense")
    assert (got.n, got.mean, got.ci_low, got.ci_high, got.method) == (
        want.n, want.mean, want.ci_low, want.ci_high, want.method,
    )  # fmt: skip
    overall = summary.row(MOE, "loss_minus_dense")
    assert overall.mean == pytest.approx(want_overall := (2.25 + 2.30 - 2.75 - 2.625) / 2)
    assert overall.ci_low < want_overall < overall.ci_high
    assert summary.row(DENSE, "loss_code_minus_dense") is None


def test_twin_rule_keys_missing_or_outside_model_condition_experiment_exclude_a_twin():
    moe = moe_run(0, 0.2, 0.1, 0.5, {"code": 2.0}, overrides=["condition=top1", "data.mb=1"])
    other_data = dense_run(0, {"code": 2.0}, overrides=["condition=dense", "data.mb=2"])
    missing = dense_run(0, {"code": 2.0}, overrides=["condition=dense"])
    twins, warnings = dense_twins(group_runs([moe, other_data, missing]))
    assert twins == {moe.group: None} and not warnings
    # model.* keys and the model group may differ; the closest candidate wins
    moe = moe_run(0, 0.2, 0.1, 0.5, {"code": 2.0}, overrides=["model.n_experts=8", "model=moe"])
    near = dense_run(0, {"code": 2.0}, overrides=["model=gpt2"])
    far = dense_run(0, {"code": 2.0}, overrides=["+model.dropout=0", "model=gpt2"])
    twins, warnings = dense_twins(group_runs([moe, far, near]))
    assert twins == {moe.group: near.group} and not warnings


def test_an_ambiguous_twin_warns_and_gives_no_difference_rows(tmp_path):
    runs = [
        *sweep(),
        dense_run(0, {"code": 2.5, "math": 3.5}, overrides=["condition=dense2", "experiment=x"]),
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
    runs[1] = moe_run(1, 0.30, 0.10, 0.6, {"code": 2.2, "math": 2.6}, step=90)
    files = write_summary(runs, tmp_path)
    assert (
        len(files.warnings) == 1 and MOE in files.warnings[0] and "[90, 100]" in files.warnings[0]
    )
    doc = json.loads(files.json.read_text())
    assert doc["groups"][MOE]["final_steps"] == [100, 90] and doc["warnings"] == files.warnings
    assert summarize(runs).row(MOE, "nmi", layer=1).mean == pytest.approx(0.25)


def test_csv_json_and_markdown_hold_the_rows(tmp_path):
    runs = sweep()
    summary = summarize(runs)
    files = write_summary(runs, tmp_path)
    assert files.figures == [] and not list(tmp_path.glob(".*"))  # no temp files left

    with files.csv.open(newline="") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == COLUMNS and len(table) == len(summary.rows)
    for line, row in zip(table, summary.rows, strict=True):
        assert float(line["mean"]) == row.mean  # full precision: reads back equal
        assert line["layer"] == ("" if row.layer is None else str(row.layer))
    above = next(line for line in table if line["metric"] == "above_null")
    assert above["ci_low"] == above["ci_high"] == "" and above["method"] == "count"

    doc = json.loads(files.json.read_text())
    assert doc["confidence"] == 0.95 and "bootstrap" in doc["interval"]
    assert {r["n"] for r in doc["rows"]} == {2}
    above = next(r for r in doc["rows"] if r["metric"] == "above_null")
    assert above["ci_low"] is None and above["layer"] == 1
    assert doc["groups"][MOE] == {
        "runs": [f"{MOE}-seed0", f"{MOE}-seed1"], "seeds": [0, 1], "moe": True,
        "final_steps": [100, 100], "dense_twin": DENSE,
    }  # fmt: skip
    assert doc["groups"][DENSE]["moe"] is False

    md = files.markdown.read_text().splitlines()
    assert "final checkpoint" in md[0] and f"`{MOE}` 2" in md[0]
    mean, low, high = hand_t([0.20, 0.30])
    s_mean, s_low, s_high = hand_t([0.4, 0.6])
    routing = (
        f"| {MOE} | 1 | {mean:.4f} [{low:.4f}, {high:.4f}] | 0.1600 | "
        f"{s_mean:.0%} [{s_low:.0%}, {s_high:.0%}] | 1/2 | 0/2 |"
    )
    assert routing in md
    code, math_, overall = hand_t([2.0, 2.2]), hand_t([3.0, 2.6]), hand_t([2.25, 2.30])
    loss = f"| {MOE} | " + " | ".join(f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in
                                      (code, math_, overall)) + " |"  # fmt: skip
    assert loss in md
    diff = difference_interval([2.0, 2.2], [2.5, 2.4])
    diff_line = next(line for line in md if line.startswith(f"| {MOE} | {DENSE} |"))
    assert f"{diff.mean:.3f} [{diff.ci_low:.3f}, {diff.ci_high:.3f}]" in diff_line


def test_a_single_run_gives_n1_rows_with_empty_bounds(tmp_path):
    files = write_summary([moe_run(0, 0.2, 0.1, 0.5, {"code": 2.0, "math": 3.0})], tmp_path)
    with files.csv.open(newline="") as f:
        table = list(csv.DictReader(f))
    nmi = next(line for line in table if line["metric"] == "nmi")
    assert (nmi["n"], nmi["mean"], nmi["ci_low"], nmi["ci_high"], nmi["method"]) == (
        "1", "0.2", "", "", "none",
    )  # fmt: skip
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
