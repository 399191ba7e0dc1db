"""Domain x expert routing statistics: counting, CSV, heatmap, collapse check.

``counts[layer]`` is a LongTensor [n_domains, n_experts]: how many routing assignments of
tokens from blocks of each domain went to each expert (top-k: k per token).
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

COLLAPSE_SHARE = 0.9


def count_assignments(
    domain_ids: torch.Tensor, indices: torch.Tensor, n_domains: int, n_experts: int
) -> torch.Tensor:
    """[n_domains, n_experts] counts from per-token domain ids [N] and expert indices [N, k]."""
    k = indices.shape[-1]
    flat = domain_ids.repeat_interleave(k) * n_experts + indices.reshape(-1)
    return torch.bincount(flat, minlength=n_domains * n_experts).view(n_domains, n_experts)


def router_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the routing distribution's entropy (nats); probs [N, E]."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()


def shares(counts: torch.Tensor) -> torch.Tensor:
    """Each row divided by its total (a domain's share of tokens per expert); 0 for empty rows."""
    totals = counts.sum(-1, keepdim=True).clamp_min(1)
    return counts.double() / totals


def write_routing_csv(
    counts: Mapping[int, torch.Tensor], domains: Sequence[str], path: str | os.PathLike
) -> Path:
    """One row per (layer, domain): assignments and the share sent to each expert."""
    path = Path(path)
    n_experts = next(iter(counts.values())).shape[1]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["layer", "domain", "assignments", *[f"expert_{e}" for e in range(n_experts)]]
        )
        for layer, table in sorted(counts.items()):
            for d, domain in enumerate(domains):
                row_shares = shares(table)[d].tolist()
                writer.writerow(
                    [layer, domain, int(table[d].sum()), *[f"{s:.4f}" for s in row_shares]]
                )
    return path


def plot_routing(
    counts: Mapping[int, torch.Tensor], domains: Sequence[str], path: str | os.PathLike
) -> Path:
    """A heatmap per MoE layer: rows = domains, columns = experts, cells = share of tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(counts)
    n_experts = counts[layers[0]].shape[1]
    fig, axes = plt.subplots(
        1, len(layers), figsize=(1.2 + 0.7 * n_experts * len(layers), 0.6 * len(domains) + 1.6),
        squeeze=False, constrained_layout=True,
    )  # fmt: skip
    for ax, layer in zip(axes[0], layers, strict=True):
        table = shares(counts[layer]).numpy()
        image = ax.imshow(table, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_title(f"layer {layer}")
        ax.set_xticks(range(n_experts), [str(e) for e in range(n_experts)])
        ax.set_yticks(range(len(domains)), list(domains))
        ax.set_xlabel("expert")
        for d in range(len(domains)):
            for e in range(n_experts):
                color = "black" if table[d, e] > 0.5 else "white"
                ax.text(
                    e, d, f"{table[d, e]:.2f}", ha="center", va="center", fontsize=7, color=color
                )
    fig.colorbar(image, ax=axes[0].tolist(), label="share of the domain's tokens")
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def collapsed_layers(counts: Mapping[int, torch.Tensor]) -> dict[int, tuple[int, float]]:
    """Layers where one expert took more than 90% of all assignments: layer -> (expert, share)."""
    out = {}
    for layer, table in counts.items():
        per_expert = table.sum(0)
        total = int(per_expert.sum())
        if total == 0:
            continue
        top = int(per_expert.argmax())
        share = float(per_expert[top]) / total
        if share > COLLAPSE_SHARE:
            out[layer] = (top, share)
    return out
