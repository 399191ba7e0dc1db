"""What ``python -m moe_emergence.analyze`` measures of one run: the record that the per-run
evaluation (:mod:`moe_emergence.analysis.evaluate`) fills from a run's checkpoints and the
sweep summary (:mod:`moe_emergence.analysis.summary`) reads. Plain data, no torch."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moe_emergence.analysis.scores import LayerScores


@dataclass(frozen=True)
class HeldOutLoss:
    """Token-weighted mean next-token loss (nats) of one domain's held-out blocks at one
    checkpoint, as ``val/loss_<domain>``: ``tokens`` predictions (block_size - 1 per block)."""

    loss: float
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


@dataclass(frozen=True)
class CheckpointResult:
    """One checkpoint of a run, routed and scored in eval mode.

    step: its optimizer step. counts: MoE layer -> domain x expert assignments int64 [D, E] of
    the probe's tokens (k per token for top-k); scores: MoE layer -> its scores (both empty for
    a dense model). losses: domain -> held-out loss (empty without a held-out split).
    token_types: MoE layer -> Python token category x expert int64 [C, E] of the probe's code
    blocks (:data:`moe_emergence.analysis.token_types.CATEGORIES` order); only for the final
    checkpoint, empty elsewhere or without code.
    """

    step: int
    counts: dict[int, np.ndarray] = field(default_factory=dict)
    scores: dict[int, LayerScores] = field(default_factory=dict)
    losses: dict[str, HeldOutLoss] = field(default_factory=dict)
    token_types: dict[int, np.ndarray] = field(default_factory=dict)


@dataclass
class RunResult:
    """Every analysed checkpoint of one run, oldest first (``checkpoints[-1]`` is the final).

    name: the run's folder name (unique within the sweep). overrides: the run's Hydra
    overrides (``key=value``) without ``seed`` and without the keys that name places
    (paths, mirror, cache, checkpoints), sorted; group: them joined with ``,``, or
    ``"(no overrides)"``. seed: the run's ``seed``. moe: whether the model has MoE layers.
    domains: the domain order of every [D, E] table; layers: the MoE layers (block indices).
    probe: ``held_out`` or ``train_sample``; probe_blocks: blocks per domain. dispatch: the
    MoE dispatch path the final checkpoint trained with (None: dense).
    """

    name: str
    run_dir: Path
    group: str
    seed: int | None
    overrides: list[str]
    moe: bool
    domains: tuple[str, ...]
    layers: list[int]
    n_experts: int
    probe: str
    probe_blocks: dict[str, int]
    checkpoints: list[CheckpointResult]
    dispatch: str | None = None

    @property
    def final(self) -> CheckpointResult:
        return self.checkpoints[-1]


def group_runs(results: Iterable[RunResult]) -> dict[str, list[RunResult]]:
    """Runs by :attr:`RunResult.group`, groups sorted by name, runs by (seed, name)."""
    groups: dict[str, list[RunResult]] = {}
    for run in results:
        groups.setdefault(run.group, []).append(run)
    key = lambda r: (r.seed is None, r.seed or 0, r.name)  # noqa: E731
    return {g: sorted(groups[g], key=key) for g in sorted(groups)}


def split_override(item: str) -> tuple[str, str]:
    """A Hydra override ``key=value`` as ``(key, value)``; a leading ``+``/``++``/``~`` is not
    part of the key."""
    key, _, value = str(item).partition("=")
    return key.lstrip("+~"), value
