"""Training on other domain sets, written in YAML only: a 2-domain set (GSM8K vs MATH, a file in
conf/data/domains) and a 4-domain set (the default set with math split in two, from the
command line) on ../shared/hub's files. The model, the routing outputs, ``analyze``'s summary
and its figures carry the set's domains, in order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.mirror import SHARED_HUB
from helpers.script import train_in

from moe_emergence.analysis import sweep_plots
from moe_emergence.analysis.analyze import main as analyze
from moe_emergence.analysis.tables import read_table

pytestmark = pytest.mark.skipif(
    not (SHARED_HUB / "openai" / "gsm8k").is_dir(), reason="../shared/hub is absent"
)

GSM8K = "[{dataset: openai/gsm8k, configs: [main], text: 'Problem: {question} Answer: {answer}'}]"
MATH = (
    "[{dataset: EleutherAI/hendrycks_math, configs: [algebra, geometry], "
    "text: 'Problem: {problem} Solution: {solution}'}]"
)
SETS = {
    "two": (["data/domains=gsm8k_vs_math"], ("gsm8k", "competition_math")),
    "four": (
        [
            "~data.domain_set.math",
            f"+data.domain_set.gsm8k={GSM8K}",
            f"+data.domain_set.competition_math={MATH}",
        ],
        ("code", "prose", "gsm8k", "competition_math"),
    ),
}


@pytest.fixture(scope="module", params=list(SETS))
def trained(request, tmp_path_factory) -> tuple[Path, tuple[str, ...]]:
    """``experiment=debug`` (4 steps, routing every 2, a checkpoint every 2) on the set."""
    overrides, domains = SETS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    run = train_in(
        root,
        "experiment=debug",
        f"data.hub_mirror={SHARED_HUB}",
        f"data.tokenizer={SHARED_HUB / 'gpt2'}",
        "data.size_mb=0.03",
        "data.eval_fraction=0.2",
        "trainer.max_steps=4",
        "callbacks.routing_analysis.every_n_steps=2",
        "callbacks.routing_analysis.null_permutations=49",  # names are checked, not p-values
        "callbacks.model_checkpoint.every_n_train_steps=2",
        *overrides,
    )
    return run, domains


def test_routing_outputs_carry_the_sets_domains(trained):
    run, domains = trained
    report = json.loads((run / "data_report.json").read_text())
    assert tuple(report["domains"]) == domains
    assert set(report["token_counts"]) == set(domains)
    counts = read_table(run / "routing" / "counts.csv")
    assert {r["domain"] for r in counts} == set(domains)
    assert {r["step"] for r in counts} == {"0", "2", "4"}
    metrics = (run / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {f"train/loss_{d}" for d in domains} <= set(metrics)
    assert (run / "routing" / "heatmap.png").read_bytes()[:4] == b"\x89PNG"


def test_analyze_summary_and_figures_carry_the_sets_domains(trained, tmp_path, monkeypatch):
    run, domains = trained
    drawn: list[tuple[str, ...]] = []
    panel = sweep_plots.heatmap_panel

    def recording_panel(ax, table, panel_domains, title):
        drawn.append(tuple(panel_domains))
        return panel(ax, table, panel_domains, title)

    monkeypatch.setattr(sweep_plots, "heatmap_panel", recording_panel)
    assert analyze([str(run), "--out", str(tmp_path), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    metrics = {r["metric"] for r in summary["rows"]}
    assert {f"loss_{d}" for d in domains} <= metrics
    assert drawn and set(drawn) == {domains}  # every heatmap row is one of the set's domains
    [folder] = (tmp_path / "runs").iterdir()
    assert {r["domain"] for r in read_table(folder / "counts.csv")} == set(domains)
    assert (tmp_path / "heatmaps.png").read_bytes()[:4] == b"\x89PNG"
