"""The routing analysis in the trainer's loggers: each analysis's per-layer scores, equal to the
rows of ``routing/trajectory.csv`` at the same steps, as ``routing/layer{L}/{score}`` scalars in
every logger (TensorBoard's event file, the CSV logger's metrics.csv); at the end of fit the
router saturation of every analysis step, equal to ``routing/saturation.csv``, at that step;
the heatmap and emergence figures as images where the logger takes them, when ``log_figures``
says, and the saturation figure at the end; rank 0 only."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from helpers.callback import stub_trainer, two_document_probe
from helpers.configs import tiny_overrides
from helpers.moe import tiny_module
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import OmegaConf, open_dict
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from moe_emergence.analysis import callback as callback_module
from moe_emergence.analysis.callback import RoutingAnalysis
from moe_emergence.analysis.logger_sink import (
    LOGGED_SCORES,
    SATURATION_SCORES,
    log_routing_figures,
    log_routing_scalars,
    log_saturation_scalars,
    routing_scalars,
)
from moe_emergence.analysis.tables import read_table
from moe_emergence.config import compose_config, config_dir
from moe_emergence.train import train

FIGURES = ("routing/heatmap", "routing/emergence")
SATURATION_FIGURE = "routing/saturation"  # once, at the end of fit (unless log_figures=never)


class Recording(Logger):
    """A logger without images: records ``log_metrics`` calls."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))


class RecordingWandb(WandbLogger):
    """A WandbLogger (no wandb run) that records what it is handed."""

    def __init__(self) -> None:  # no super().__init__: it would need wandb
        self.metrics: list[tuple[int | None, dict[str, float]]] = []
        self.images: list[tuple[str, list[Any], int | None]] = []

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_image(self, key: str, images: list[Any], step: int | None = None, **kw: Any) -> None:
        self.images.append((key, images, step))


def table_scalars(run_dir: Path) -> dict[tuple[int, str], float]:
    """(step, key) -> value of the logged scores, from the run's routing/trajectory.csv and
    routing/saturation.csv."""
    return {
        (int(row["step"]), f"routing/layer{row['layer']}/{name}"): float(row[name])
        for table, names in (("trajectory", LOGGED_SCORES), ("saturation", SATURATION_SCORES))
        for row in read_table(run_dir / "routing" / f"{table}.csv")
        for name in names
    }


def test_a_run_logs_its_routing_tables_to_csv_and_tensorboard(
    tiny_mirror, tiny_tokenizer_dir, tmp_path
):
    """One run (3 steps) with ``logger=tensorboard`` and the ``logger=csv`` node beside it."""
    cfg = compose_config(
        tiny_overrides(
            tiny_mirror,
            tiny_tokenizer_dir,
            tmp_path,
            "logger=tensorboard",
            "callbacks.routing_analysis.every_n_steps=2",
            "callbacks.routing_analysis.null_permutations=19",
        )
    )
    with open_dict(cfg):
        cfg.logger = [OmegaConf.load(config_dir() / "logger" / "csv.yaml"), cfg.logger]
    train(cfg)
    expected = table_scalars(tmp_path)
    assert {step for step, _ in expected} == {0, 2, 3}  # step 0, every 2 steps, the end
    assert {key for _, key in expected} >= {"routing/layer2/nmi", "routing/layer3/null_p95"}
    for step in (0, 2, 3):  # saturation at every analysis step, sent at the end
        for name in SATURATION_SCORES:
            assert (step, f"routing/layer3/{name}") in expected
    assert expected[3, "routing/layer2/saturation_top1"] == 1.0  # the final against itself

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    logged = {
        (event.step, tag): event.value
        for tag in events.Tags()["scalars"]
        if tag.startswith("routing/")
        for event in events.Scalars(tag)
    }
    assert logged == {key: float(np.float32(value)) for key, value in expected.items()}
    assert sorted(events.Tags()["images"]) == sorted((*FIGURES, SATURATION_FIGURE))
    for tag in (*FIGURES, SATURATION_FIGURE):  # log_figures=end (the default): at the last step
        (image,) = events.Images(tag)
        assert image.step == 3
        with Image.open(tmp_path / "routing" / f"{tag.split('/')[1]}.png") as png:
            assert (image.width, image.height) == png.size

    with (tmp_path / "csv" / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    in_csv = {
        (int(row["step"]), key): float(value)
        for row in rows
        for key, value in row.items()
        if key.startswith("routing/") and value != ""
    }
    assert in_csv == expected  # written as repr: equal to the tables' values


@pytest.mark.parametrize(
    ("log_figures", "image_steps"), [("end", [4]), ("every", [0, 4]), ("never", [])]
)
def test_log_figures_says_when_the_figures_go(log_figures, image_steps, tmp_path, monkeypatch):
    """The callback's own hooks on a tiny model: analyses at step 0 and at the end (step 4)."""
    torch.manual_seed(0)
    module = tiny_module()
    probe = two_document_probe(module.domains, vocab_size=32, block_size=8)
    monkeypatch.setattr(callback_module, "build_probe", lambda *args, **kwargs: probe)
    wandb, plain = RecordingWandb(), Recording()
    trainer = stub_trainer(tmp_path, [wandb, plain])
    callback = RoutingAnalysis(batch_size=4, null_permutations=9, log_figures=log_figures)
    callback.setup(trainer, module, "fit")
    callback.on_train_start(trainer, module)
    trainer.global_step = 4
    callback.on_train_end(trainer, module)

    expected = table_scalars(tmp_path)
    for logger in (wandb, plain):
        # each analysis's scores at its step; at the end, saturation of step 0 and of step 4
        assert [step for step, _ in logger.metrics] == [0, 4, 0, 4]
        got = {(step, key): v for step, metrics in logger.metrics for key, v in metrics.items()}
        assert got == expected
    saturation = [(SATURATION_FIGURE, 4)] if image_steps else []
    assert sorted((key, step) for key, _, step in wandb.images) == sorted(
        [(key, step) for key in FIGURES for step in image_steps] + saturation
    )
    for _, images, _ in wandb.images:
        (image,) = images
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    for name in ("heatmap.png", "emergence.png", "saturation.png"):  # whatever log_figures says
        assert (tmp_path / "routing" / name).stat().st_size > 0


ROWS = [
    {"layer": 2, "nmi": 0.25, "null_p95": 0.01, "token_id_nmi": 0.05, "usage_entropy": 1.3}
    | {"router_entropy": 1.2, "nmi_low": 0.2},
    {"layer": 3, "nmi": 0.5, "null_p95": 0.02, "token_id_nmi": 0.1, "usage_entropy": 1.1}
    | {"router_entropy": 0.9, "nmi_low": 0.4},
]
NOT_DRAWN = {"heatmap": object()}  # would fail if drawn: proves no figure was rendered


def test_scalars_are_the_rows_logged_scores():
    scalars = routing_scalars(ROWS)
    assert len(scalars) == 2 * len(LOGGED_SCORES)
    assert scalars["routing/layer2/nmi"] == 0.25
    assert scalars["routing/layer3/router_entropy"] == 0.9
    assert "routing/layer2/nmi_low" not in scalars


def test_a_logger_without_images_gets_the_scalars_only():
    plain = Recording()
    trainer = SimpleNamespace(global_rank=0, global_step=5, loggers=[plain])
    log_routing_scalars(trainer, ROWS)
    log_routing_figures(trainer, NOT_DRAWN)
    assert plain.metrics == [(5, routing_scalars(ROWS))]


SATURATION_ROWS = [
    {"step": s, "layer": layer, "saturation_top1": s / 10 + layer / 100}
    | {"saturation_top1_chance": 0.3, "saturation_topk": 0.5, "saturation_topk_chance": 0.4}
    for s in (5, 0)
    for layer in (2, 3)
]


def test_saturation_goes_to_every_logger_at_each_analysis_step():
    """Sent at the end of fit (global step 5), each step's values at that step, steps
    ascending, one log_metrics call per step and logger."""
    wandb, plain = RecordingWandb(), Recording()
    trainer = SimpleNamespace(global_rank=0, global_step=5, loggers=[wandb, plain])
    log_saturation_scalars(trainer, SATURATION_ROWS)
    for logger in (wandb, plain):
        assert [step for step, _ in logger.metrics] == [0, 5]
        step0 = logger.metrics[0][1]
        assert len(step0) == 2 * len(SATURATION_SCORES)
        assert step0["routing/layer3/saturation_top1"] == 0.03
        assert logger.metrics[1][1]["routing/layer2/saturation_top1"] == 0.52


def test_nothing_is_logged_off_rank_zero():
    wandb, plain = RecordingWandb(), Recording()
    trainer = SimpleNamespace(global_rank=1, global_step=5, loggers=[wandb, plain])
    log_routing_scalars(trainer, ROWS)
    log_saturation_scalars(trainer, SATURATION_ROWS)
    log_routing_figures(trainer, NOT_DRAWN)
    assert wandb.metrics == wandb.images == plain.metrics == []
