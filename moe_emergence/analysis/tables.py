"""The routing analysis's CSV tables: their columns, and writing them whole (temp file, rename).

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
import os
from collections.abc import Iterable, Sequence
from dataclasses import fields
from pathlib import Path

from moe_emergence.analysis.scores import LayerScores

COUNTS = ("step", "layer", "probe", "domain", "expert", "tokens")
TRAJECTORY = ("step", "layer", "probe", *(f.name for f in fields(LayerScores)))
TRAIN_WINDOWS = ("step_start", "step_end", "layer", "domain", "expert", "assignments")
LOSSES = ("step", "domain", "loss", "perplexity", "tokens")


def write_table(path: str | os.PathLike, columns: Sequence[str], rows: Iterable[dict]) -> Path:
    """Write ``rows`` (dicts keyed by ``columns``) as CSV; readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)  # floats as repr: full precision, they read back equal
    os.replace(tmp, path)
    return path


def read_table(path: str | os.PathLike) -> list[dict[str, str]]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))
