"""The routing analysis's CSV tables: their columns, the rows of the routing tables (one builder
for the training callback and ``analyze``), and writing them whole (temp file, rename).

counts.csv              step, layer, probe, domain, expert, tokens
    eval-mode assignments of the probe's tokens (k per token for top-k), every analysis step
trajectory.csv          step, layer, probe, then the fields of
                        :class:`~moe_emergence.analysis.scores.LayerScores`
    the scores at every analysis step, step 0 (the random router's baseline) first
train_window_counts.csv step_start, step_end, layer, domain, expert, assignments
    TRAINING-TIME figures: noisy router, train mode, the training batches of the optimizer
    steps in (step_start, step_end], summed over ranks; not a measurement of the model
losses.csv              step, domain, loss, perplexity, tokens   (``analyze`` only)
    token-weighted mean next-token loss (nats) of the domain's held-out blocks, eval mode
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np

from moe_emergence.analysis.scores import LayerScores
from moe_emergence.files import write_atomic

COUNTS = ("step", "layer", "probe", "domain", "expert", "tokens")
TRAJECTORY = ("step", "layer", "probe", *(f.name for f in fields(LayerScores)))
TRAIN_WINDOWS = ("step_start", "step_end", "layer", "domain", "expert", "assignments")
LOSSES = ("step", "domain", "loss", "perplexity", "tokens")


def routing_rows(
    step: int,
    probe_kind: str,
    domains: Sequence[str],
    counts: Mapping[int, np.ndarray],
    scores: Mapping[int, LayerScores],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The :data:`COUNTS` rows and the :data:`TRAJECTORY` rows of one routed checkpoint or
    analysis step (``probe_kind``: ``held_out`` or ``train_sample``): ``counts`` and ``scores``
    per MoE layer (as
    :func:`moe_emergence.analysis.probe.score_probe_routing` gives them; ``counts[layer]`` the
    domain x expert table int [D, E], rows of ``domains``). Layers in ``scores`` order; counts
    by layer, domain, expert."""
    count_rows, trajectory_rows = [], []
    for layer, layer_scores in scores.items():
        trajectory_rows.append(
            {"step": step, "layer": layer, "probe": probe_kind, **asdict(layer_scores)}
        )
        table = counts[layer]
        for d, domain in enumerate(domains):
            for e in range(table.shape[1]):
                count_rows.append(
                    {
                        "step": step,
                        "layer": layer,
                        "probe": probe_kind,
                        "domain": domain,
                        "expert": e,
                        "tokens": int(table[d, e]),
                    }
                )
    return count_rows, trajectory_rows


def write_table(path: str | os.PathLike, columns: Sequence[str], rows: Iterable[dict]) -> Path:
    """Write ``rows`` (dicts keyed by ``columns``) as CSV; readers never see half a file."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(columns))
    writer.writeheader()
    writer.writerows(rows)  # floats as repr: full precision, they read back equal
    return write_atomic(path, text.getvalue())


def read_table(path: str | os.PathLike) -> list[dict[str, str]]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))
