"""The MoE layer's auxiliary losses and their statistics: the load-balancing loss (per
micro-batch, or over a global window of :class:`GlobalAssignmentCounts`), the router z-loss and
the router entropy.

Shapes: N tokens (batch x time, flattened), E experts, k experts per token, W micro-batches in
the global load-balancing window.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_emergence.distributed import sum_over_ranks
from moe_emergence.errors import UserError
from moe_emergence.model.settings import LB_SCOPES
from moe_emergence.model.settings import ModelSettings as MODEL
from moe_emergence.settings import is_int


def router_entropy(logits: Tensor) -> Tensor:
    """Mean over tokens of the entropy (nats) of ``softmax(logits)``; logits [N, E] -> scalar.

    Pass the clean logits: the entropy of the router itself, not of its training noise.
    """
    log_p = logits.float().log_softmax(dim=-1)
    return -(log_p.exp() * log_p).sum(-1).mean()


def load_balancing_loss(probs: Tensor, indices: Tensor, n_experts: int) -> Tensor:
    """Switch Transformer balance loss ``E * sum_i f_i * P_i`` (scalar); ``lb_scope=batch``.

    probs: [N, E] router probabilities; indices: [N, k] selected experts. f_i is the fraction
    of the N * k assignments sent to expert i (no gradient), P_i the mean probability of i.
    Equals 1.0 for uniform routing and grows as routing concentrates.
    """
    assignments = F.one_hot(indices.reshape(-1), n_experts).to(probs.dtype)  # [N*k, E]
    fraction = assignments.mean(dim=0)
    mean_prob = probs.mean(dim=0)
    return n_experts * (fraction * mean_prob).sum()


def global_load_balancing_loss(probs: Tensor, fraction: Tensor) -> Tensor:
    """Global-batch balance loss ``E * sum_i f_i * P_i`` (scalar; Qiu et al. 2025).

    probs: [N, E] this micro-batch's router probabilities (P_i = their mean over the N tokens,
    the only path of the gradient); fraction: [E] the share f_i of expert i among the
    assignments of a larger batch (e.g. :meth:`GlobalAssignmentCounts.fraction`), sums to 1,
    no gradient. Routing that specialises per micro-batch but is balanced over that larger
    batch scores 1.0, where :func:`load_balancing_loss` scores up to E.
    """
    n_experts = probs.shape[-1]
    return n_experts * (fraction.detach().to(probs.dtype) * probs.mean(dim=0)).sum()


def check_lb_settings(scope: str, window: int) -> None:
    """Refuse a scope outside :data:`LB_SCOPES` or a window that is not an integer >= 1."""
    if scope not in LB_SCOPES:
        raise UserError(
            f"{MODEL.option('lb_scope')} must be one of {', '.join(LB_SCOPES)}, got {scope!r}: set "
            f"{MODEL.option('lb_scope', 'batch')} (per micro-batch) or "
            f"{MODEL.option('lb_scope', 'global')}."
        )
    if not is_int(window) or window < 1:
        raise UserError(
            f"{MODEL.option('lb_window')} must be an integer >= 1 (micro-batches) or null, got "
            f"{window!r}: e.g. {MODEL.option('lb_window', '4')}, or null for "
            f"trainer.accumulate_grad_batches."
        )


class GlobalAssignmentCounts:
    """Expert-assignment counts of the last ``window`` training micro-batches, summed over ranks.

    ``counts`` [W, E] int64 is a ring buffer: :meth:`update` all-reduces one micro-batch's
    local counts [E] (sum over the DDP ranks of the default process group; no gradient) and
    overwrites the oldest row. Before W updates the unwritten rows are 0, so f covers the
    micro-batches seen so far. Every rank pushes the same reduced row, so all ranks hold the
    same buffer (and rank 0's is the one to checkpoint). :meth:`update` is a collective: call
    it on every rank equally often (training forwards), never in eval or no-grad forwards.

    A plain object, not a module or buffer: DDP would broadcast rank 0's buffers, and it is
    not part of the state_dict (see :meth:`state_dict` for checkpoints).
    """

    def __init__(self, n_experts: int, window: int) -> None:
        check_lb_settings("global", window)
        self.n_experts = n_experts
        self.window = window
        self.reset()

    def reset(self) -> None:
        """Empty the window."""
        self.counts = torch.zeros(self.window, self.n_experts, dtype=torch.long)
        self.position = 0  # the row the next update writes
        self.updates = 0  # updates since the last reset

    @torch.compiler.disable  # host-side ring position; a compiled block breaks its graph here
    @torch.no_grad()
    def update(self, local_counts: Tensor) -> Tensor:
        """Push this rank's counts [E] of one micro-batch (collective); return :meth:`fraction`."""
        row = sum_over_ranks(local_counts.detach().to(dtype=torch.long))
        if self.counts.device != row.device:
            self.counts = self.counts.to(row.device)
        self.counts[self.position] = row
        self.position = (self.position + 1) % self.window
        self.updates += 1
        return self.fraction()

    def fraction(self) -> Tensor:
        """f [E] float32: each expert's share of the window's assignments (zeros when empty)."""
        total = self.counts.sum(dim=0)
        return total.float() / total.sum().clamp(min=1).float()

    def state_dict(self) -> dict[str, Any]:
        """The window for a checkpoint: counts (CPU), position, updates."""
        return {
            "counts": self.counts.cpu().clone(),
            "position": self.position,
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; refuse one of another window or expert count."""
        counts = state["counts"]
        if tuple(counts.shape) != (self.window, self.n_experts):
            raise ValueError(
                f"saved load-balancing window has shape {tuple(counts.shape)}, expected "
                f"{(self.window, self.n_experts)} (window, n_experts)"
            )
        self.counts = counts.to(device=self.counts.device, dtype=torch.long).clone()
        self.position = int(state["position"])
        self.updates = int(state["updates"])


def z_loss(logits: Tensor) -> Tensor:
    """Router z-loss (ST-MoE): mean over tokens of ``logsumexp(logits) ** 2``; logits [N, E]."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()
