"""The routing analysis sent to the trainer's Lightning loggers (``trainer.loggers``).

Scalars, at every analysis: per MoE layer, the :data:`LOGGED_SCORES` of the step's
``trajectory.csv`` rows (the measurement core's values, not computed again) as
``routing/layer{L}/{score}`` at ``trainer.global_step``, through ``logger.log_metrics``: every
logger takes them (the CSV logger as columns of its metrics.csv).

Router saturation, once, at the end of fit (it reads against the final routing): per MoE layer
and earlier analysis step ``s`` (and the final one, 1 by definition), the
:data:`~moe_emergence.analysis.tables.SATURATION_SCORES` of the step's ``saturation.csv`` rows as
``routing/layer{L}/{score}`` at step ``s`` (``logger.log_metrics(..., step=s)``: TensorBoard and
the CSV logger place them at ``s``; W&B at ``trainer/global_step`` = ``s``, its x axis). A run
resumed in place sends them again at its end against its own last analysis; its metrics.csv
history drops the earlier start's (:func:`moe_emergence.runs.start.continue_csv_history`).

Figures (``callbacks.routing_analysis.log_figures``): the heatmap and emergence figures as images
``routing/heatmap`` and ``routing/emergence``, and at the end of fit the saturation figure as
``routing/saturation``, rendered as their PNG files are, to the loggers that take images:
TensorBoard (``add_image``) and Weights & Biases (``log_image``); any other logger is skipped.

Rank 0 only. The callback has already summed the routing over ranks: nothing here is collective.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from matplotlib.figure import Figure
from PIL import Image

from moe_emergence.analysis.plots import DPI
from moe_emergence.analysis.tables import SATURATION_SCORES

LOGGED_SCORES = ("nmi", "null_p95", "token_id_nmi", "usage_entropy", "router_entropy")
KEY_PREFIX = "routing"


def routing_scalars(rows: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Key -> value of the logged scores of one analysis step's trajectory rows (one row per
    layer, as :func:`moe_emergence.analysis.tables.routing_rows` builds them)."""
    return {
        f"{KEY_PREFIX}/layer{row['layer']}/{name}": float(row[name])
        for row in rows
        for name in LOGGED_SCORES
    }


def log_routing_scalars(trainer: Any, rows: Iterable[Mapping[str, Any]]) -> None:
    """Send :func:`routing_scalars` of ``rows`` to every logger of ``trainer`` (rank 0)."""
    if trainer.global_rank != 0 or not trainer.loggers:
        return
    metrics = routing_scalars(rows)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


def saturation_scalars(rows: Iterable[Mapping[str, Any]]) -> dict[int, dict[str, float]]:
    """Step -> key -> value of the :data:`SATURATION_SCORES` of ``saturation.csv`` rows (as
    :func:`moe_emergence.analysis.tables.saturation_rows` builds them), steps ascending."""
    out: dict[int, dict[str, float]] = {}
    for row in sorted(rows, key=lambda r: int(r["step"])):
        metrics = out.setdefault(int(row["step"]), {})
        for name in SATURATION_SCORES:
            metrics[f"{KEY_PREFIX}/layer{row['layer']}/{name}"] = float(row[name])
    return out


def is_saturation_key(key: str) -> bool:
    """Whether ``key`` is one of :func:`saturation_scalars`'s keys: values that read against the
    final analysis of the start that sent them (a run resumed in place sends them again)."""
    parts = key.split("/")
    return (
        len(parts) == 3
        and parts[0] == KEY_PREFIX
        and parts[1].startswith("layer")
        and parts[2] in SATURATION_SCORES
    )


def log_saturation_scalars(trainer: Any, rows: Iterable[Mapping[str, Any]]) -> None:
    """Send :func:`saturation_scalars` of ``rows`` to every logger of ``trainer``, each step's
    at that step (rank 0)."""
    if trainer.global_rank != 0 or not trainer.loggers:
        return
    for step, metrics in saturation_scalars(rows).items():
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


def takes_images(logger: Logger) -> bool:
    """Whether figures are sent to ``logger``."""
    return isinstance(logger, TensorBoardLogger | WandbLogger)


def figure_image(fig: Figure) -> np.ndarray:
    """``fig`` as its PNG file shows it (:data:`~moe_emergence.analysis.plots.DPI`): RGB uint8
    [H, W, 3]."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    buffer.seek(0)
    with Image.open(buffer) as image:
        return np.asarray(image.convert("RGB"))


def log_routing_figures(trainer: Any, figures: Mapping[str, Figure]) -> None:
    """Send ``figures`` (name -> figure) as images ``routing/<name>`` at
    ``trainer.global_step`` to the loggers that take images (rank 0); none: nothing is drawn."""
    loggers = [logger for logger in trainer.loggers if takes_images(logger)]
    if trainer.global_rank != 0 or not loggers:
        return
    step = trainer.global_step
    images = {f"{KEY_PREFIX}/{name}": figure_image(fig) for name, fig in figures.items()}
    for logger in loggers:
        for tag, image in images.items():
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(tag, image, step, dataformats="HWC")
            else:
                logger.log_image(key=tag, images=[image], step=step)
