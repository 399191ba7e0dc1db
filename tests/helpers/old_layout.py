"""Checkpoints as the per-expert layout wrote them (one module per expert), made from today's
stacked-expert checkpoints: ``...mlp.experts.c_fc_weight`` [E, d, h] becomes
``...mlp.experts.<e>.c_fc.weight`` [d, h] for each e, and no dispatch path is recorded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moe_emergence.checkpoints import write_sidecar
from moe_emergence.model.module import DISPATCH_KEY
from moe_emergence.model.moe import PARAMETERS_OF_MLP


def per_expert_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stacked expert parameters split into one set of GPT-2 MLP parameters per expert."""
    out = {}
    for key, value in state.items():
        prefix, _, name = key.rpartition(".")
        if prefix.endswith(".mlp.experts") and name in PARAMETERS_OF_MLP:
            for e in range(value.shape[0]):
                out[f"{prefix}.{e}.{PARAMETERS_OF_MLP[name]}"] = value[e].clone()
        else:
            out[key] = value
    return out


def to_per_expert_checkpoint(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """A Lightning checkpoint dict in the per-expert layout (state dict split, no dispatch)."""
    old = dict(checkpoint)
    old["state_dict"] = per_expert_state(checkpoint["state_dict"])
    old.pop(DISPATCH_KEY, None)
    return old


def write_per_expert_copy(ckpt: Path, out: Path) -> Path:
    """Write ``ckpt`` in the per-expert layout to ``out``, with its SHA-256 sidecar."""
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(to_per_expert_checkpoint(checkpoint), out)
    write_sidecar(out)
    return out
