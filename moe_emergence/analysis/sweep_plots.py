"""Figures of a seed sweep: per group (runs over seeds), the mean NMI over steps with its 95%
interval, the final domain x expert shares, and the held-out loss over steps."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from matplotlib import rcParams
from matplotlib.axes import Axes
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure  # no pyplot: leaves the user's backend alone

from moe_emergence.analysis.intervals import mean_interval
from moe_emergence.analysis.plots import save_figure
from moe_emergence.analysis.results import CheckpointResult, RunResult, group_runs
from moe_emergence.analysis.scores import shares

__all__ = ["plot_held_out_loss", "plot_sweep_emergence", "plot_sweep_heatmaps"]

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
        fig.legend(list(found.values()), list(found), loc="outside lower center", fontsize=7,
                   title=title, title_fontsize=7)  # fmt: skip


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
    intervals = [mean_interval(v, seed=0) for v in values]
    ax.plot(steps, [i.mean for i in intervals], color=color, marker=".", label=label)
    if any(i.n >= 2 for i in intervals):
        low = [i.ci_low if i.n >= 2 else math.nan for i in intervals]
        high = [i.ci_high if i.n >= 2 else math.nan for i in intervals]
        ax.fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0)
    return True


def _score_getter(layer: int, metric: str) -> Getter:
    def get(c: CheckpointResult) -> float | None:
        s = c.scores.get(layer)
        return None if s is None else float(getattr(s, metric))

    return get


def _loss_getter(domain: str) -> Getter:
    def get(c: CheckpointResult) -> float | None:
        held = c.losses.get(domain)
        return None if held is None else held.loss

    return get


def _moe_groups(results: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    return {g: runs for g, runs in group_runs(results).items() if any(r.moe for r in runs)}


def plot_sweep_emergence(results: Sequence[RunResult], path: str | os.PathLike) -> Path:
    """One panel per MoE layer: per MoE group, the mean NMI over its runs against optimizer
    step (the steps all its runs have), a 95% band where n >= 2, and dashed its runs' mean
    permutation-null 95th percentile (chance)."""
    groups = _moe_groups(results)
    layers = sorted({layer for runs in groups.values() for r in runs for layer in r.layers})
    fig = Figure(figsize=(1.0 + 4.2 * max(len(layers), 1), 4.4), layout="constrained")
    axes = fig.subplots(1, max(len(layers), 1), squeeze=False, sharey=True)[0]
    palette = _palette(results)
    for ax, layer in zip(axes, layers, strict=False):
        for g, runs in groups.items():
            if _mean_band(ax, runs, _score_getter(layer, "nmi"), palette[g], g):
                steps, nulls = _over_steps(runs, _score_getter(layer, "null_p95"))
                chance = [mean_interval(v).mean for v in nulls]  # NaNs dropped
                ax.plot(steps, chance, color=palette[g], linestyle="--", linewidth=0.9)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylim(bottom=0)
    axes[0].set_ylabel("NMI = I(domain; expert) / H(domain)")
    _legend(fig, axes, "solid: mean NMI, band: 95% CI over runs; dashed: mean null p95 (chance)")
    return save_figure(fig, path)


def _summed_counts(runs: Sequence[RunResult], layer: int) -> np.ndarray | None:
    """[D, E] final-checkpoint counts of ``layer`` summed over the runs that have them."""
    tables = [r.final.counts[layer] for r in runs if layer in r.final.counts]
    return np.sum(tables, axis=0) if tables else None


def _heatmap_panel(ax: Axes, table: np.ndarray, domains: Sequence[str], title: str):
    """Shares of one [D, E] table, colour scale centred on 1/E, each cell annotated."""
    n_experts = table.shape[1]
    uniform = 1.0 / n_experts
    norm = TwoSlopeNorm(vmin=0.0, vcenter=uniform, vmax=1.0) if n_experts > 1 else Normalize(0, 1)
    frac = shares(table)
    image = ax.imshow(frac, norm=norm, cmap="RdBu_r", aspect="auto")
    ax.set_title(title, fontsize=9)
    ax.set_xticks(range(n_experts), [str(e) for e in range(n_experts)])
    ax.set_yticks(range(len(domains)), list(domains))
    ax.set_xlabel("expert")
    for d in range(frac.shape[0]):
        for e in range(n_experts):
            dark = abs(frac[d, e] - uniform) > 0.35 * (1 - uniform)
            ax.text(e, d, f"{frac[d, e]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if dark else "black")  # fmt: skip
    return image


def plot_sweep_heatmaps(results: Sequence[RunResult], path: str | os.PathLike) -> Path:
    """Rows = MoE groups, columns = MoE layers: the domain x expert shares of the final
    checkpoints' counts summed over the group's runs, centred on 1/E (white) as
    :func:`moe_emergence.analysis.plots.plot_heatmap`; title: layer and the runs' mean NMI."""
    groups = _moe_groups(results)
    layers = sorted({layer for runs in groups.values() for r in runs for layer in r.layers})
    n_experts = max((r.n_experts for runs in groups.values() for r in runs), default=1)
    n_domains = max((len(r.domains) for runs in groups.values() for r in runs), default=1)
    fig = Figure(
        figsize=(1.8 + 0.75 * n_experts * max(len(layers), 1),
                 (0.6 * n_domains + 2.2) * max(len(groups), 1)),
        layout="constrained",
    )  # fmt: skip
    rows = fig.subfigures(max(len(groups), 1), 1, squeeze=False)[:, 0]
    for sub, (g, runs) in zip(rows, groups.items(), strict=False):
        sub.suptitle(f"{g} (n={len(runs)} runs)", fontsize=9)
        axes = sub.subplots(1, max(len(layers), 1), squeeze=False)[0]
        image = None
        for ax, layer in zip(axes, layers, strict=False):
            table = _summed_counts(runs, layer)
            if table is None:
                ax.axis("off")
                continue
            nmis = [s.nmi for r in runs if (s := r.final.scores.get(layer)) is not None]
            nmi = mean_interval(nmis).mean
            image = _heatmap_panel(ax, table, runs[0].domains, f"layer {layer}, mean NMI {nmi:.3f}")
        if image is not None:
            sub.colorbar(image, ax=axes.tolist(), label="share of the domain's probe tokens")
    return save_figure(fig, path)


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
    palette = _palette(results)
    for ax, domain in zip(axes, domains, strict=False):
        for g, runs in groups.items():
            _mean_band(ax, runs, _loss_getter(domain), palette[g], g)
        ax.set_title(domain, fontsize=9)
        ax.set_xlabel("optimizer step")
    axes[0].set_ylabel("held-out loss (nats per token)")
    _legend(fig, axes, "mean over runs; band: 95% CI over runs")
    return save_figure(fig, path)
