"""Sums over DDP ranks: the one place where counters and loss sums are reduced."""

from __future__ import annotations

import torch
import torch.distributed as dist


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` summed over the ranks of the default process group (just a copy
    when not distributed). Collective: every rank must call it, in the same order."""
    out = tensor.clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out
