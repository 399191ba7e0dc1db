"""Helpers for the MoE tests: random stacked experts, one expert's MLP written out from its
stacked slices (the reference the dispatch paths are checked against), and a tiny module."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

from moe_emergence.model.module import MoEGPT2Module
from moe_emergence.model.moe import StackedExperts

DOMAINS = ("code", "math", "prose")  # the default domain set (conf/data/domains)


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


def tiny_module_kwargs(**overrides: Any) -> dict[str, Any]:
    """Keyword arguments of a tiny from-scratch :class:`MoEGPT2Module`: AdamW (lr 1e-3),
    blocks of 8 tokens, vocabulary 32, 2 layers of width 16 and 2 heads, 2 experts in block 1,
    the data's domains; ``overrides`` replace or add any."""
    return {
        "optimizer": functools.partial(torch.optim.AdamW, lr=1e-3),
        "block_size": 8,
        "pretrained": None,
        "vocab_size": 32,
        "n_positions": 8,
        "n_embd": 16,
        "n_layer": 2,
        "n_head": 2,
        "dropout": 0.0,
        "domains": DOMAINS,
        "moe": {"layers": [1], "n_experts": 2},
        **overrides,
    }


def tiny_module(**overrides: Any) -> MoEGPT2Module:
    """A :class:`MoEGPT2Module` of :func:`tiny_module_kwargs`."""
    return MoEGPT2Module(**tiny_module_kwargs(**overrides))
