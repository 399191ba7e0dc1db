"""The routing analysis's settings, written once (see :mod:`moe_emergence.settings`): the
``callbacks.routing_analysis.*`` keys, read by the training callback and, from a run's record,
by ``analyze`` (which rebuilds the training-time probe and nulls from them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moe_emergence.settings import Settings, setting


@dataclass
class ProbeSettings(Settings):
    """When the routing is measured, on which probe, its permutation null, and which figures
    go to the trainer's loggers (the per-layer scores always do)."""

    PREFIX: ClassVar[str] = "callbacks.routing_analysis"

    every_n_steps: int = setting(
        200, low=1, help="optimizer steps between analyses (also at step 0 and at the end)"
    )
    train_sample_blocks: int = setting(
        64, low=1, probe=True, help="probe without a held-out split: training blocks per domain"
    )
    held_out_blocks: int | None = setting(
        None,
        low=1,
        probe=True,
        help="probe with data.eval_fraction > 0: blocks per domain (null: all)",
    )
    probe_seed: int = setting(0, low=0, probe=True, help="which blocks the probe takes")
    size_matched: bool = setting(
        False,
        probe=True,
        help="score the same number of documents per domain and the same number of tokens "
        "from each (each document's first), so that the document-label permutation null is "
        "exact; what it keeps and drops goes to the log and probe.json",
    )
    null_permutations: int = setting(
        999,
        low=1,
        probe=True,
        help="document-label permutations (nulls) and bootstrap draws (probe interval); "
        "p >= 1/(n+1): 999 is enough for Holm over ~50 tests",
    )
    null_seed: int = setting(
        0, low=0, probe=True, help="seed of the permutations and bootstrap draws"
    )
    vocab_min_count: int = setting(
        10,
        low=1,
        probe=True,
        help="vocabulary specialisation and per-expert token lists: a token id counts once "
        "seen this many times on the probe's scored tokens (rare ids read as specialised)",
    )
    batch_size: int = setting(32, low=1, probe=True, help="probe blocks per forward (no grad)")
    out_dir: str | None = setting(None, help="where the tables go (null: <run dir>/routing)")
    log_figures: str = setting(
        "end",
        choices=("end", "every", "never"),
        help="heatmap and emergence figures to the loggers that take images (TensorBoard, "
        "W&B): at the end of fit, at every analysis, or never (the saturation figure: at the "
        "end of fit unless never)",
    )

    # What decides the probe and its nulls (analyze rebuilds them from the run's record): the
    # fields marked probe=True.
    PROBE_KEYS: ClassVar[tuple[str, ...]]


ProbeSettings.PROBE_KEYS = ProbeSettings.flagged("probe")
