"""Experts as stacked weights (:class:`StackedExperts`, warm-started as copies of GPT-2's dense
MLP) and the token-to-expert assignments they run (:class:`Dispatch`): a per-expert loop (the
reference) or grouped GEMMs on the device.

Shapes: N tokens (batch x time, flattened), E experts, k experts per token, A = N * k
assignments, d model width, h expert hidden width (4d for GPT-2).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_emergence.errors import UserError
from moe_emergence.model.settings import MoESettings as MOE

# The grouped GEMM: public in torch >= 2.10 (F.grouped_mm), private before (same operator).
grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a matmul of ``x`` runs in: the autocast dtype where autocast is on."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


@dataclass
class Dispatch:
    """The (token, slot) assignments of N tokens to k experts each, sorted by expert (stable:
    within an expert, by token then slot). A = N * k.

    order:   [A] long, position in the flat [N * k] assignments of each sorted row.
    token:   [A] long, the token of each sorted row.
    expert:  [A] long, the expert of each sorted row (non-decreasing).
    ends:    [E] long, ends[e] = rows of experts 0..e (cumulative counts); computed on the
             device by a binary search of ``expert``, so no host sync.
    """

    order: Tensor
    token: Tensor
    expert: Tensor
    ends: Tensor

    @classmethod
    def sort(cls, indices: Tensor, n_experts: int) -> Dispatch:
        """Sort the assignments ``indices`` [N, k] by expert, on their device."""
        flat = indices.reshape(-1)
        order = torch.argsort(flat, stable=True)
        expert = flat[order]
        token = order // indices.shape[1]
        experts = torch.arange(n_experts, device=flat.device, dtype=flat.dtype)
        ends = torch.searchsorted(expert, experts, right=True)
        return cls(order=order, token=token, expert=expert, ends=ends)

    @property
    def counts(self) -> Tensor:
        """[E] long, assignments per expert (on the device)."""
        return torch.diff(self.ends, prepend=self.ends.new_zeros(1))


class StackedExperts(nn.Module):
    """E MLP experts of GPT-2's shape as stacked weights (Conv1D layout, ``x @ W + b``):
    ``c_fc_weight`` [E, d, h], ``c_fc_bias`` [E, h], ``c_proj_weight`` [E, h, d],
    ``c_proj_bias`` [E, d]; expert e maps x [n, d] to
    ``dropout(act(x @ c_fc_weight[e] + c_fc_bias[e]) @ c_proj_weight[e] + c_proj_bias[e])``.

    Two ways to run the assignments of a :class:`Dispatch`, with the same result up to
    rounding: :meth:`loop` (one pair of matmuls per expert: the reference) and :meth:`grouped`
    (two grouped GEMMs over all rows, no host sync). Both return [A, d] in sorted order.
    """

    def __init__(
        self, n_experts: int, d_model: int, d_hidden: int, activation: nn.Module, dropout: float
    ) -> None:
        super().__init__()
        if n_experts < 1:
            raise UserError(f"{MOE.option('n_experts')} must be >= 1, got {n_experts}")
        self.n_experts, self.d_model, self.d_hidden = n_experts, d_model, d_hidden
        self.c_fc_weight = nn.Parameter(torch.zeros(n_experts, d_model, d_hidden))
        self.c_fc_bias = nn.Parameter(torch.zeros(n_experts, d_hidden))
        self.c_proj_weight = nn.Parameter(torch.zeros(n_experts, d_hidden, d_model))
        self.c_proj_bias = nn.Parameter(torch.zeros(n_experts, d_model))
        self.act = activation
        self.dropout = nn.Dropout(dropout)

    @classmethod
    def from_mlp(cls, mlp: nn.Module, n_experts: int) -> StackedExperts:
        """E copies of a GPT-2 MLP (``c_fc``, ``act``, ``c_proj``, ``dropout``), on its device
        and dtype."""
        fc = mlp.c_fc
        d_model, d_hidden = fc.weight.shape
        experts = cls(n_experts, d_model, d_hidden, copy.deepcopy(mlp.act), mlp.dropout.p)
        experts.to(device=fc.weight.device, dtype=fc.weight.dtype)
        with torch.no_grad():
            for name, source in PARAMETERS_OF_MLP.items():
                stacked = getattr(experts, name)
                stacked.copy_(mlp.get_parameter(source).expand_as(stacked))
        return experts

    def loop(self, x: Tensor, routed: Dispatch, counts: list[int]) -> Tensor:
        """Per expert, its rows of ``x`` [N, d] through its MLP (``torch.addmm``, as GPT-2's
        Conv1D): [A, d]. ``counts``: rows per expert on the host. Every expert runs, on zero
        rows if it got none, so all stay in the autograd graph."""
        # One unbind per parameter: indexing [e] per expert would make every expert's backward
        # write a zero gradient of the whole stack (E^2 work).
        fc_w, fc_b, proj_w, proj_b = (getattr(self, name).unbind(0) for name in PARAMETERS_OF_MLP)
        outputs = []
        for e, tokens in enumerate(routed.token.split(counts)):
            hidden = torch.addmm(fc_b[e], x.index_select(0, tokens), fc_w[e])
            outputs.append(self.dropout(torch.addmm(proj_b[e], self.act(hidden), proj_w[e])))
        return torch.cat(outputs)

    def grouped(self, x: Tensor, routed: Dispatch) -> Tensor:
        """All rows of ``x`` [N, d] through their experts' MLPs by two grouped GEMMs
        (:func:`torch.nn.functional.grouped_mm`), in the compute dtype (autocast's where on):
        [A, d]. Offsets come from ``routed.ends`` on the device: no host sync."""
        dtype = compute_dtype(x)
        offsets = routed.ends.to(torch.int32)
        rows = x.index_select(0, routed.token).to(dtype)
        hidden = grouped_mm(rows, self.c_fc_weight.to(dtype), offs=offsets)
        # Biases gathered per row in their own dtype, then cast: their gradient sums the rows
        # in float32 (a bf16 sum of thousands of rows would stall).
        hidden = self.act(hidden + self.c_fc_bias.index_select(0, routed.expert).to(dtype))
        out = grouped_mm(hidden, self.c_proj_weight.to(dtype), offs=offsets)
        return self.dropout(out + self.c_proj_bias.index_select(0, routed.expert).to(dtype))

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}"


# Stacked parameter -> the GPT-2 MLP parameter it stacks (``c_fc.weight`` [d, h], ...).
PARAMETERS_OF_MLP = {
    "c_fc_weight": "c_fc.weight",
    "c_fc_bias": "c_fc.bias",
    "c_proj_weight": "c_proj.weight",
    "c_proj_bias": "c_proj.bias",
}
