"""What ``python -m moe_emergence.analyze`` measures of one run: the record that the per-run
evaluation (:mod:`moe_emergence.analysis.evaluate`) fills from a run's checkpoints and the
sweep summary (:mod:`moe_emergence.analysis.summary`) reads, and the names tables and figures
show for its groups (:func:`condition_labels`: ``top-1``, not ``condition=top1``). Plain data,
no torch."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moe_emergence.analysis.scores import LayerScores
from moe_emergence.analysis.specialisation import ExpertTokens, LayerSpecialisation
from moe_emergence.runs.record import split_override


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
    specialisation: MoE layer -> the field's metrics with their chance levels
    (:mod:`moe_emergence.analysis.specialisation`; ``analyze`` only). expert_tokens: MoE layer
    -> each expert's over-represented token ids, found on one half of the documents and checked
    on the other; only for the final checkpoint.
    """

    step: int
    counts: dict[int, np.ndarray] = field(default_factory=dict)
    scores: dict[int, LayerScores] = field(default_factory=dict)
    losses: dict[str, HeldOutLoss] = field(default_factory=dict)
    token_types: dict[int, np.ndarray] = field(default_factory=dict)
    specialisation: dict[int, LayerSpecialisation] = field(default_factory=dict)
    expert_tokens: dict[int, ExpertTokens] = field(default_factory=dict)


@dataclass(frozen=True)
class KnockoutEffect:
    """One knock-out reading of one run's final checkpoint (:mod:`moe_emergence.analysis.knockout`):
    at MoE ``layer``, the expert that domain ``removed``'s held-out tokens choose first most
    often (``preferred``) is removed, and separately a load-matched ``control`` expert that
    ``removed`` does not prefer; ``measured`` is the domain whose held-out loss is read.

    preferred_share, control_share: the share of ``removed``'s held-out tokens whose first
    choice is that expert. intact: ``measured``'s held-out loss (nats per token) of the intact
    model; preferred_change, control_change: its loss with that expert removed minus intact;
    difference: preferred_change - control_change. ``*_interval``: (low, high), 95%
    studentised bootstrap over ``measured``'s held-out documents (the same resamples for all
    three). tokens: ``measured``'s predictions.
    """

    layer: int
    removed: str
    measured: str
    preferred: int
    control: int
    preferred_share: float
    control_share: float
    intact: float
    preferred_change: float
    control_change: float
    difference: float
    preferred_interval: tuple[float, float]
    control_interval: tuple[float, float]
    difference_interval: tuple[float, float]
    tokens: int


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

    nmi_change_intervals: MoE layer -> (low, high), the run's 95% probe interval of NMI at the
    final checkpoint minus NMI at step 0, the same probe documents resampled for both (empty
    without a step-0 checkpoint). initial_model: the identity of the run's step-0 model (SHA-256
    of its step-0 weights and of its step-0 first-choice routing of the probe; None without a
    step-0 checkpoint): runs with equal keys share their step 0, which the summary counts once.
    null_permutations: K, the permutations behind each permutation p-value (its smallest value
    is 1 / (1 + K)); None when unknown. knockout: the final checkpoint's knock-out readings,
    layer x removed domain x measured domain (empty: dense, or no held-out split).
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
    nmi_change_intervals: dict[int, tuple[float, float]] = field(default_factory=dict)
    initial_model: str | None = None
    null_permutations: int | None = None
    knockout: list[KnockoutEffect] = field(default_factory=list)

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


# What a table or figure shows for a group: the condition as people say it, not its overrides.
CONDITION_KEY = "condition"
CONDITION_NAMES = {
    "top1": "top-1",
    "top2": "top-2",
    "no_lb": "no LB",
    "dense": "dense",
    "global_lb": "global LB",
    "frozen_router": "frozen router",
    "hash_router": "hash router",
    "domain_router": "domain router",
}
NO_OVERRIDES = "(no overrides)"


def group_of(overrides: Iterable[str]) -> str:
    """:attr:`RunResult.group` of a run with these condition ``overrides`` (sorted)."""
    return ",".join(overrides) or NO_OVERRIDES


DEFAULTS_LABEL = "defaults"


def group_overrides(group: str) -> list[str]:
    """The override items of a group key (:attr:`RunResult.group`, items joined with ``,``):
    split at the commas between items, never at those inside ``[...]``, ``{...}``, ``(...)`` or
    quotes (``model.moe.layers=[10,11]`` is one item). ``"(no overrides)"`` has none."""
    if group == NO_OVERRIDES or not group:
        return []
    items, start, depth, quote = [], 0, 0, ""
    for i, char in enumerate(group):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(group[start:i])
            start = i + 1
    items.append(group[start:])
    return [item for item in items if item]


def readable_override(item: str) -> str:
    """One override as people say it: ``condition=top1`` -> ``top-1`` (:data:`CONDITION_NAMES`;
    an unknown condition keeps its name), ``data.block_size=128`` -> ``block_size 128``,
    ``data/size=1mb`` -> ``size 1mb``, ``~callbacks.routing_analysis`` ->
    ``no routing_analysis``."""
    key, value = split_override(item)
    if key == CONDITION_KEY:
        return CONDITION_NAMES.get(value, value)
    name = key.replace("/", ".").rsplit(".", 1)[-1]
    if str(item).startswith("~"):
        return f"no {name}"
    return f"{name} {value}"


def condition_label(group: str, shared: Iterable[str] = ()) -> str:
    """The label a table or figure shows for one group key: its condition first
    (``condition=no_lb`` -> ``no LB``), then its other overrides readably
    (:func:`readable_override`), leaving out those in ``shared`` (the items every group has,
    e.g. ``experiment=study_cpu``). A group left with nothing shows all its items; one with no
    overrides shows ``defaults``."""
    items = group_overrides(group)
    if not items:
        return DEFAULTS_LABEL
    shared = set(shared)
    first = [i for i in items if split_override(i)[0] == CONDITION_KEY]
    rest = [i for i in items if split_override(i)[0] != CONDITION_KEY and i not in shared]
    shown = first + rest or items
    return ", ".join(readable_override(item) for item in shown)


def condition_labels(groups: Iterable[str]) -> dict[str, str]:
    """Group key -> its label (:func:`condition_label`), the items every group shares left
    out. Keys are unchanged (grouping, JSON and CSV use them); only what is shown changes.
    Groups whose labels would coincide show their keys instead."""
    groups = list(dict.fromkeys(groups))
    item_sets = [set(group_overrides(g)) for g in groups]
    shared = set.intersection(*item_sets) if item_sets else set()
    labels = {g: condition_label(g, shared) for g in groups}
    seen: dict[str, int] = {}
    for label in labels.values():
        seen[label] = seen.get(label, 0) + 1
    return {g: (g if seen[label] > 1 else label) for g, label in labels.items()}
