"""Figures of a seed sweep: per group (runs over seeds), the mean NMI over steps with its 95%
t-interval over runs, its chance level (null p95) and its step-0 level; the final domain x
expert shares of each run; router saturation over steps (mean over runs, band, chance); and the
held-out loss over steps. Bands are not clipped: a
t-interval of a non-negative score can reach below 0 with few seeds. Groups are shown by their
condition's name (:func:`moe_emergence.analysis.results.condition_labels`: ``top-1``, ``no LB``,
...), never by their override strings."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from matplotlib import rcParams
from matplotlib.axes import Axes
from matplotlib.figure import Figure  # no pyplot: leaves the user's backend alone

from moe_emergence.analysis.intervals import mean_interval
from moe_emergence.analysis.plots import heatmap_panel, save_figure
from moe_emergence.analysis.results import (
    CheckpointResult,
    RunResult,
    condition_labels,
    group_runs,
)

__all__ = [
    "has_saturation",
    "plot_held_out_loss",
    "plot_sweep_emergence",
    "plot_sweep_heatmaps",
    "plot_sweep_saturation",
    "sweep_saturation_figure",
]

# A checkpoint's value of one quantity, or None where the checkpoint lacks it.
Getter = Callable[[CheckpointResult], float | None]


def _palette(results: Sequence[RunResult]) -> dict[str, str]:
    """group -> colour, the same in every figure of the sweep."""
    colors = rcParams["axes.prop_cycle"].by_key()["color"]
    return {g: colors[n % len(colors)] for n, g in enumerate(group_runs(results))}


def _legend(fig: Figure, axes: Sequence[Axes], title: str) -> None:
    """One legend below the panels of every labelled line of ``axes`` (each label once)."""
    found: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            found.setdefault(label, handle)
    if found:
        fig.legend(
            list(found.values()),
            list(found),
            loc="outside lower center",
            fontsize=7,
            title=title,
            title_fontsize=7,
        )


def _over_steps(runs: Sequence[RunResult], get: Getter) -> tuple[list[int], list[list[float]]]:
    """(steps every run has a value at, sorted; per step the runs' values)."""
    per_run = [{c.step: v for c in run.checkpoints if (v := get(c)) is not None} for run in runs]
    steps = sorted(set.intersection(*(set(values) for values in per_run))) if per_run else []
    return steps, [[values[s] for values in per_run] for s in steps]


def _mean_band(ax: Axes, runs: Sequence[RunResult], get: Getter, color: str, label: str) -> bool:
    """Mean over runs against step, with a shaded 95% interval where n >= 2. False when the
    runs share no step with a value (nothing drawn)."""
    steps, values = _over_steps(runs, get)
    if not steps:
        return False
    intervals = [mean_interval(v) for v in values]
    ax.plot(steps, [i.mean for i in intervals], color=color, marker=".", label=label)
    if any(i.n >= 2 for i in intervals):
        low = [i.ci_low if i.n >= 2 else math.nan for i in intervals]
        high = [i.ci_high if i.n >= 2 else math.nan for i in intervals]
        ax.fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0)
    return True


def _layer_getter(layer: int, metric: str, table: str = "scores") -> Getter:
    """A checkpoint's ``<table>[layer].<metric>`` (``table``: ``scores`` or
    ``specialisation``); None where it has no such layer."""

    def get(c: CheckpointResult) -> float | None:
        s = getattr(c, table).get(layer)
        return None if s is None else float(getattr(s, metric))

    return get


def _loss_getter(domain: str) -> Getter:
    def get(c: CheckpointResult) -> float | None:
        held = c.losses.get(domain)
        return None if held is None else held.loss

    return get


def _moe_groups(results: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    return {g: runs for g, runs in group_runs(results).items() if any(r.moe for r in runs)}


def _step0_level(runs: Sequence[RunResult], get: Getter) -> float:
    """Mean over the runs with a step-0 checkpoint (their first, at step 0) of its value; NaN
    without one."""
    values = [
        v
        for r in runs
        if r.checkpoints and r.checkpoints[0].step == 0 and (v := get(r.checkpoints[0])) is not None
    ]
    return mean_interval(values).mean


def _layer_panels(
    results: Sequence[RunResult],
    value: Callable[[int], Getter],
    chance: Callable[[int], Getter],
    step0: bool = False,
) -> tuple[Figure, Sequence[Axes]]:
    """One panel per MoE layer: per MoE group, the mean over its runs of ``value(layer)``
    against optimizer step with its band (:func:`_mean_band`), dashed the runs' mean
    ``chance(layer)`` and, with ``step0``, dotted the runs' mean value at step 0."""
    groups = _moe_groups(results)
    layers = sorted({layer for runs in groups.values() for r in runs for layer in r.layers})
    fig = Figure(figsize=(1.0 + 4.2 * max(len(layers), 1), 4.4), layout="constrained")
    axes = fig.subplots(1, max(len(layers), 1), squeeze=False, sharey=True)[0]
    palette, labels = _palette(results), condition_labels(group_runs(results))
    for ax, layer in zip(axes, layers, strict=False):
        for g, runs in groups.items():
            get = value(layer)
            if not _mean_band(ax, runs, get, palette[g], labels[g]):
                continue
            steps, chances = _over_steps(runs, chance(layer))
            level = [mean_interval(v).mean for v in chances]  # NaNs dropped
            ax.plot(steps, level, color=palette[g], linestyle="--", linewidth=0.9)
            start = _step0_level(runs, get) if step0 else math.nan
            if math.isfinite(start):
                ax.axhline(start, color=palette[g], linestyle=":", linewidth=0.9)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("optimizer step")
    return fig, axes


def plot_sweep_emergence(results: Sequence[RunResult], path: str | os.PathLike) -> Path:
    """One panel per MoE layer: per MoE group, the mean NMI over its runs against optimizer
    step (the steps all its runs have), a 95% t band where n >= 2, dashed its runs' mean
    permutation-null 95th percentile (chance), dotted its runs' mean step-0 NMI."""
    nmi = functools.partial(_layer_getter, metric="nmi")
    null_p95 = functools.partial(_layer_getter, metric="null_p95")
    fig, axes = _layer_panels(results, nmi, null_p95, step0=True)
    axes[0].set_ylabel("NMI = I(domain; expert) / H(domain)")
    _legend(
        fig,
        axes,
        "solid: mean NMI, band: 95% t-interval over runs\n"
        "dashed: mean null p95 (chance); dotted: mean NMI at step 0",
    )
    return save_figure(fig, path)


def plot_sweep_heatmaps(results: Sequence[RunResult], path: str | os.PathLike) -> Path:
    """One row per MoE run (by group, then seed), one column per MoE layer: the domain x expert
    shares of the run's final checkpoint (:func:`moe_emergence.analysis.plots.heatmap_panel`).
    Runs are never pooled: expert numbers are arbitrary per run (expert 2 of one seed is not
    expert 2 of another), so summed counts would hide specialisation."""
    runs = [r for group in _moe_groups(results).values() for r in group]
    labels = condition_labels(group_runs(results))
    layers = sorted({layer for r in runs for layer in r.layers})
    n_experts = max((r.n_experts for r in runs), default=1)
    n_domains = max((len(r.domains) for r in runs), default=1)
    fig = Figure(
        figsize=(
            1.8 + 0.75 * n_experts * max(len(layers), 1),
            (0.6 * n_domains + 2.0) * max(len(runs), 1) + 0.4,
        ),
        layout="constrained",
    )
    fig.suptitle(
        "final checkpoint, one row per run (expert numbers differ between runs)", fontsize=10
    )
    rows = fig.subfigures(max(len(runs), 1), 1, squeeze=False)[:, 0]
    for sub, run in zip(rows, runs, strict=False):
        sub.suptitle(f"{labels[run.group]}, seed {run.seed} (step {run.final.step})", fontsize=9)
        axes = sub.subplots(1, max(len(layers), 1), squeeze=False)[0]
        image = None
        for ax, layer in zip(axes, layers, strict=False):
            table, scores = run.final.counts.get(layer), run.final.scores.get(layer)
            if table is None or scores is None:
                ax.axis("off")
                continue
            title = f"layer {layer}: NMI {scores.nmi:.3f} (null p95 {scores.null_p95:.3f})"
            image = heatmap_panel(ax, table, run.domains, title)
        if image is not None:
            sub.colorbar(image, ax=axes.tolist(), label="share of the domain's probe tokens")
    return save_figure(fig, path)


def has_saturation(results: Sequence[RunResult]) -> bool:
    """Whether an MoE run has router saturation (``analyze``'s specialisation metrics)."""
    return any(c.specialisation for r in results if r.moe for c in r.checkpoints)


def sweep_saturation_figure(results: Sequence[RunResult]) -> Figure:
    """One panel per MoE layer: per MoE group, the mean over its runs of router saturation
    (the share of probe tokens whose first choice is that of the run's own final checkpoint; 1
    there by definition) against optimizer step (the steps all its runs have), a 95% t band
    where n >= 2, dashed the runs' mean chance level (two independent routers with these
    first-choice usages)."""
    top1 = functools.partial(_layer_getter, metric="saturation_top1", table="specialisation")
    chance = functools.partial(
        _layer_getter, metric="saturation_top1_chance", table="specialisation"
    )
    fig, axes = _layer_panels(results, top1, chance)
    axes[0].set_ylabel("first-choice agreement with the final checkpoint")
    axes[0].set_ylim(0, 1.02)
    fig.suptitle("router saturation: each checkpoint against its run's final one", fontsize=10)
    _legend(
        fig,
        axes,
        "solid: mean over runs, band: 95% t-interval over runs\n"
        "dashed: mean chance (independent routers with these usages)",
    )
    return fig


def plot_sweep_saturation(results: Sequence[RunResult], path: str | os.PathLike) -> Path:
    """:func:`sweep_saturation_figure` written to ``path``."""
    return save_figure(sweep_saturation_figure(results), path)


def plot_held_out_loss(results: Sequence[RunResult], path: str | os.PathLike) -> Path:
    """One panel per domain: per group (dense included), the mean held-out loss (nats) over its
    runs against optimizer step (the steps all its runs have), a 95% band where n >= 2."""
    groups = group_runs(results)
    domains: dict[str, None] = {}
    for r in results:
        for c in r.checkpoints:
            domains.update(dict.fromkeys(c.losses))
    fig = Figure(figsize=(1.0 + 4.2 * max(len(domains), 1), 4.4), layout="constrained")
    axes = fig.subplots(1, max(len(domains), 1), squeeze=False)[0]
    palette, labels = _palette(results), condition_labels(groups)
    for ax, domain in zip(axes, domains, strict=False):
        for g, runs in groups.items():
            _mean_band(ax, runs, _loss_getter(domain), palette[g], labels[g])
        ax.set_title(domain, fontsize=9)
        ax.set_xlabel("optimizer step")
    axes[0].set_ylabel("held-out loss (nats per token)")
    _legend(fig, axes, "mean over runs; band: 95% CI over runs")
    return save_figure(fig, path)
