"""Figures of the routing analysis: the final domain x expert heatmap, NMI over steps, and
router saturation over steps beside the NMI."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import rcParams
from matplotlib.axes import Axes
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure  # no pyplot: leaves the user's backend alone

from moe_emergence.analysis.scores import LayerScores, shares
from moe_emergence.files import atomic_path

DPI = 120  # of the PNG files, and of the images sent to the loggers


def heatmap_figure(
    tables: Mapping[int, np.ndarray],
    scores: Mapping[int, LayerScores],
    domains: Sequence[str],
    title: str = "",
) -> Figure:
    """One panel per MoE layer: rows = domains, columns = experts, cell = the share of the
    domain's probe tokens sent to the expert. The colour scale is centred on the uniform
    share 1/E (white), so "as by chance" and "never" look different. For top-k the shares
    count every slot; the NMI in the titles reads the first choice."""
    layers = sorted(tables)
    n_experts = tables[layers[0]].shape[1]
    fig = Figure(
        figsize=(1.4 + 0.75 * n_experts * len(layers), 0.6 * len(domains) + 2.0),
        layout="constrained",
    )
    axes = fig.subplots(1, len(layers), squeeze=False)
    for ax, layer in zip(axes[0], layers, strict=True):
        s = scores[layer]
        panel = f"layer {layer}\nNMI {s.nmi:.3f} (document null p95 {s.null_p95:.3f})"
        image = heatmap_panel(ax, tables[layer], domains, panel)
    bar = fig.colorbar(image, ax=axes[0].tolist(), label="share of the domain's probe tokens")
    bar.ax.axhline(1.0 / n_experts, color="black", linewidth=0.8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def heatmap_panel(ax: Axes, table: np.ndarray, domains: Sequence[str], title: str) -> Any:
    """Draw the shares of one domain x expert table [D, E] on ``ax``: colour scale centred on
    the uniform share 1/E (white), so "as by chance" and "never" look different; every cell
    annotated. Returns the image (for a colour bar)."""
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
            ax.text(
                e,
                d,
                f"{frac[d, e]:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if dark else "black",
            )
    return image


def emergence_figure(
    trajectory: Mapping[int, Sequence[tuple[int, LayerScores]]], title: str = ""
) -> Figure:
    """NMI against optimizer step, one line per MoE layer, over a band from 0 to the
    document-level permutation null's 95th percentile (chance); dashed: the cross-fitted
    token-id router's NMI. The first point is step 0: the random router's baseline."""
    fig = Figure(figsize=(6.4, 3.8), layout="constrained")
    ax = fig.subplots()
    colors = rcParams["axes.prop_cycle"].by_key()["color"]
    for n, (layer, points) in enumerate(sorted(trajectory.items())):
        steps = [step for step, _ in points]
        color = colors[n % len(colors)]
        ax.fill_between(
            steps, 0, [s.null_p95 for _, s in points], color=color, alpha=0.15, linewidth=0
        )
        ax.plot(steps, [s.nmi for _, s in points], color=color, marker=".", label=f"layer {layer}")
        ax.plot(
            steps, [s.token_id_nmi for _, s in points], color=color, linestyle="--", linewidth=0.9
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("NMI = I(domain; expert) / H(domain)")
    ax.set_ylim(bottom=0)
    legend = (
        "solid: NMI (first point: step 0);\ndashed: token-id router (cross-fitted);\n"
        "band: document null 95th pct"
    )
    ax.legend(fontsize=8, title=legend, title_fontsize=7)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def saturation_figure(
    nmi: Mapping[int, Sequence[tuple[int, LayerScores]]],
    saturation: Mapping[int, Sequence[tuple[int, Any]]],
    title: str = "",
) -> Figure:
    """Router saturation over training beside the NMI: right, per MoE layer, the share of
    probe tokens whose first choice (solid) and top-k (dashed) agree with the final
    checkpoint's, with the agreement two independent routers of these usages get (dotted:
    first-choice chance); left, the NMI over its document null's 95th percentile (band).
    ``saturation[layer]``: (step, :class:`~moe_emergence.analysis.specialisation.
    LayerSpecialisation`) pairs, or (step, any object with its ``saturation_top1``,
    ``saturation_topk`` and ``saturation_top1_chance``: the training callback's rows)."""
    fig = Figure(figsize=(10.0, 3.8), layout="constrained")
    left, right = fig.subplots(1, 2)
    colors = rcParams["axes.prop_cycle"].by_key()["color"]
    for n, (layer, points) in enumerate(sorted(nmi.items())):
        color = colors[n % len(colors)]
        steps = [step for step, _ in points]
        left.fill_between(
            steps, 0, [s.null_p95 for _, s in points], color=color, alpha=0.15, linewidth=0
        )
        left.plot(
            steps, [s.nmi for _, s in points], color=color, marker=".", label=f"layer {layer}"
        )
    for n, (layer, points) in enumerate(sorted(saturation.items())):
        color = colors[n % len(colors)]
        steps = [step for step, _ in points]
        right.plot(
            steps,
            [m.saturation_top1 for _, m in points],
            color=color,
            marker=".",
            label=f"layer {layer}",
        )
        right.plot(steps, [m.saturation_topk for _, m in points], color=color, linestyle="--")
        right.plot(
            steps,
            [m.saturation_top1_chance for _, m in points],
            color=color,
            linestyle=":",
            linewidth=0.9,
        )
    left.set(xlabel="optimizer step", ylabel="NMI (band: document null 95th pct)")
    left.set_ylim(bottom=0)
    right.set(xlabel="optimizer step", ylabel="agreement with the final checkpoint")
    right.set_ylim(0, 1.02)
    right.legend(
        fontsize=8,
        title="solid: first choice; dashed: top-k;\ndotted: independent routers (chance)",
        title_fontsize=7,
    )
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` as ``path`` (PNG at :data:`DPI`) through a temp file: never half a file."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format=path.suffix.lstrip(".") or "png")
    return path
