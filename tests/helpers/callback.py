"""What the routing callback's own hooks are driven with outside a Lightning run: a small
probe and a stand-in trainer."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from moe_emergence.analysis.probe import Probe, make_probe


def two_document_probe(domains, vocab_size: int, block_size: int) -> Probe:
    """Two documents of two blocks per domain (random ids, seed 0): 4 blocks of
    ``block_size`` tokens per domain, domains in order."""
    rng = np.random.default_rng(0)
    n = 4 * len(domains)
    ids = rng.integers(0, vocab_size, size=(n, block_size))
    block_domains = np.repeat(np.arange(len(domains)), 4)
    texts = np.repeat(np.tile([0, 0, 1, 1], len(domains))[:, None], block_size, axis=1)
    return make_probe(ids, block_domains, domains, "held_out", texts)


def stub_trainer(
    tmp_path: Path,
    loggers: Any = (),
    global_step: int = 0,
    max_steps: int | None = None,
    progress_bar: object | None = None,
) -> SimpleNamespace:
    """The trainer attributes the callback reads: rank 0 of 1, outputs under ``tmp_path``, no
    datamodule, a no-op precision context, these ``loggers``; ``max_steps`` (None: the
    ``global_step``), ``progress_bar`` as its ``progress_bar_callback`` (None: no bar)."""
    return SimpleNamespace(
        global_step=global_step,
        max_steps=global_step if max_steps is None else max_steps,
        progress_bar_callback=progress_bar,
        global_rank=0,
        world_size=1,
        default_root_dir=str(tmp_path),
        datamodule=None,
        precision_plugin=SimpleNamespace(forward_context=contextlib.nullcontext),
        loggers=list(loggers),
    )
