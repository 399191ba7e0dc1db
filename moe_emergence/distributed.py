"""Across DDP ranks: the one place where counters and loss sums are reduced, and where a
per-rank state is gathered for a checkpoint."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` summed over the ranks of the default process group (just a copy
    when not distributed). Collective: every rank must call it, in the same order."""
    out = tensor.clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, by rank (collective under DDP; ``[obj]`` in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
