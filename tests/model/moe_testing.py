"""Helpers for the MoE tests (not a test module): random stacked experts and one expert's MLP
written out from its stacked slices, the reference the dispatch paths are checked against."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moe_emergence.model.moe import StackedExperts


def random_experts(
    n_experts: int, d_model: int, d_hidden: int, seed: int = 0, bias_std: float = 0.1
) -> StackedExperts:
    """E distinct experts (GELU, no dropout) with weights N(0, 1 / fan_in) and biases
    N(0, bias_std^2), drawn from a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    experts = StackedExperts(n_experts, d_model, d_hidden, nn.GELU(), dropout=0.0)
    with torch.no_grad():
        for name, fan_in in (
            ("c_fc_weight", d_model),
            ("c_fc_bias", None),
            ("c_proj_weight", d_hidden),
            ("c_proj_bias", None),
        ):
            param = getattr(experts, name)
            std = bias_std if fan_in is None else fan_in**-0.5
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    return experts


def expert_forward(experts: StackedExperts, e: int, x: Tensor) -> Tensor:
    """Expert ``e``'s MLP on ``x`` [n, d] from its stacked slices, in GPT-2's Conv1D layout:
    ``dropout(act(x @ W_fc[e] + b_fc[e]) @ W_proj[e] + b_proj[e])``."""
    hidden = experts.act(x @ experts.c_fc_weight[e] + experts.c_fc_bias[e])
    return experts.dropout(hidden @ experts.c_proj_weight[e] + experts.c_proj_bias[e])
