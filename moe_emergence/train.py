"""Compose -> instantiate -> fit: the body of ``train.py``, importable for tests and notebooks."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig, OmegaConf

from moe_emergence.checkpoints import (
    HashedCheckpointIO,
    RandomStates,
    StepZeroCheckpoint,
    load_initial_weights,
)
from moe_emergence.config import check_moe_node, compose_config
from moe_emergence.errors import UserError
from moe_emergence.model.module import DISPATCH_KEY, check_compile
from moe_emergence.runs.folder import (
    SUMMARY_FILE,
    RunSummary,
    remove_partial_writes,
    start_or_put_back,
)
from moe_emergence.runs.history import StartRecord
from moe_emergence.runs.resume_settings import trainer_settings
from moe_emergence.runs.start import RunStart
from moe_emergence.settings import is_int

log = logging.getLogger(__name__)

SEED_LIMIT = 2**32  # numpy and seed_everything take seeds below this


def _strategy_name(strategy: Any) -> str:
    if isinstance(strategy, str):
        return strategy
    if isinstance(strategy, DictConfig | dict):
        return str(strategy.get("_target_", ""))
    return type(strategy).__name__


def check_launch(cfg: DictConfig, multirun: bool, launcher: str = "BasicLauncher") -> None:
    """Refuse Lightning's ``ddp`` inside a multirun of Hydra's basic (in-process) launcher: it
    re-launches the script per rank and every rank would start its own sweep. Cluster
    launchers (submitit: one SLURM job per sweep point, ranks started by SLURM) are fine."""
    name = _strategy_name(cfg.trainer.get("strategy", "auto")).lower()
    in_process = "basiclauncher" in launcher.lower()
    if multirun and in_process and "ddp" in name and "spawn" not in name:
        raise ValueError(
            f"trainer.strategy={name!r} cannot run inside a Hydra multirun (-m): Lightning's "
            f"ddp re-launches the script per rank and each would start its own sweep. Use "
            f"trainer.strategy=ddp_spawn for sweeps, or run single jobs without -m."
        )


def build_module(model_cfg: DictConfig, datamodule: Any) -> L.LightningModule:
    """The model node instantiated with what the data decides: its ``block_size``, its
    tokenizer's ``vocab_size`` and its ``domains`` (the config composes without loading the
    last two)."""
    return instantiate(
        model_cfg,
        block_size=datamodule.settings.block_size,
        vocab_size=datamodule.vocab_size,
        domains=list(datamodule.domains),
    )


def datamodule_from_config(
    overrides: Sequence[str] = (), config_dir: str | os.PathLike | None = None
) -> Any:
    """The data node of the project's config (outside ``train.py``: notebooks, scripts),
    composed with command-line style ``overrides``, e.g. ``["data/size=1mb",
    "data.block_size=128", "data.hub_mirror=../shared/hub"]``; nothing is read yet."""
    return instantiate(compose_config(overrides, config_dir).data)


def _plugins(cfg: DictConfig) -> list[Any]:
    """The trainer config's own plugins, plus checkpoint IO that writes SHA-256 sidecars."""
    own = cfg.trainer.get("plugins")
    found = instantiate(own) if own is not None else []
    found = list(found) if isinstance(found, list | tuple) or OmegaConf.is_list(found) else [found]
    return [*found, HashedCheckpointIO()]


def _start(
    cfg: DictConfig, multirun: bool, launcher: str
) -> tuple[Any, L.LightningModule, L.Trainer, RunStart]:
    """Every check that may refuse the start, and the datamodule, model and trainer it builds:
    ``(datamodule, model, trainer, start)``."""
    check_launch(cfg, multirun, launcher)
    seed = cfg.get("seed")
    if not is_int(seed) or not 0 <= seed < SEED_LIMIT:
        raise UserError(
            f"seed must be an integer in [0, {SEED_LIMIT}) (numpy's and Lightning's seed "
            f"range), got {seed!r} (e.g. seed=42)."
        )
    check_moe_node(cfg)
    moe = cfg.model.get("moe") or {}
    check_compile(cfg.model.get("compile", False), moe.get("dispatch"), cfg.trainer.precision)
    start = RunStart.read(cfg)  # ckpt_path / init_from, each checkpoint read once, here
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)  # checks its settings; reads no data yet
    start.check_settings(cfg, datamodule.vocab_size)  # a resume's, before the model is built
    model = build_module(cfg.model, datamodule)
    if (init := start.init_from) is not None:
        step = load_initial_weights(model, init.contents, init.path)
        log.info("Weights from %s (its step %d); this run starts at step 0.", init.path, step)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    if cfg.trainer.get("enable_progress_bar") is False:  # else Lightning refuses the bar callback
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=logger, plugins=_plugins(cfg)
    )
    checkpoints = getattr(trainer.checkpoint_callback, "dirpath", None)
    if checkpoints and trainer.is_global_zero:
        for path in remove_partial_writes(Path(checkpoints)):
            log.info("Removed %s, left by a checkpoint write that did not finish.", path)
    trainer.callbacks.append(RunSummary(Path(trainer.default_root_dir) / SUMMARY_FILE))
    trainer.callbacks.append(RandomStates(seed=cfg.seed))
    trainer.callbacks.append(StartRecord(trainer_settings(cfg)))  # before StepZeroCheckpoint
    trainer.callbacks.append(StepZeroCheckpoint())  # after RoutingAnalysis: its step-0 rows
    start.check_data(datamodule, trainer.world_size)  # a resume's; opens the token cache
    return datamodule, model, trainer, start


def train(
    cfg: DictConfig, multirun: bool = False, launcher: str = "BasicLauncher"
) -> dict[str, Any]:
    """Seed, build datamodule, model and trainer from ``cfg``, fit; return where outputs are.

    ``multirun`` / ``launcher``: whether this is a sweep job and the Hydra launcher's target.
    ``ckpt_path`` resumes a run (refused when data settings, seed or world size changed);
    ``init_from`` starts a new run from a checkpoint's weights.
    """
    with start_or_put_back():  # a refused start leaves the run's .hydra/ as it was
        datamodule, model, trainer, start = _start(cfg, multirun, launcher)
    run_dir = Path(trainer.default_root_dir)
    ckpt_path = start.resume(trainer)  # None for a new run
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)

    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    outputs = {
        "run_dir": run_dir,
        "checkpoints": trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback else None,
        "metrics": _metrics_location(trainer.logger),
        "routing": run_dir / "routing" if (run_dir / "routing").is_dir() else None,
        "data_report": run_dir / "data_report.json",
        "summary": run_dir / SUMMARY_FILE,
        "resumed_from": ckpt_path,
        "init_from": start.init_from.path if start.init_from is not None else None,
        **summary,
    }
    if trainer.is_global_zero:
        _print_summary(outputs)
    return outputs


def _metrics_location(logger: Any) -> Path | None:
    """Where the logger wrote: its ``metrics.csv`` (the CSV logger), else its folder
    (TensorBoard's event files); None without one."""
    folder = getattr(logger, "log_dir", None) if logger is not None else None
    if folder is None:
        return None
    csv_file = Path(folder) / "metrics.csv"
    return csv_file if csv_file.is_file() else Path(folder)


def _print_summary(outputs: dict[str, Any]) -> None:
    lines = [f"Finished at step {outputs['global_step']}. Outputs in {outputs['run_dir']}:"]
    if outputs.get(DISPATCH_KEY):
        lines.append(f"  MoE dispatch: {outputs[DISPATCH_KEY]}")
    if outputs["domain_losses"]:
        lines.append(
            "  final train loss per domain (mean of the last 50 steps): "
            + ", ".join(f"{d} {v:.3f}" for d, v in outputs["domain_losses"].items())
        )
    for key in ("checkpoints", "metrics", "routing", "data_report", "summary"):
        if outputs[key] is not None:
            lines.append(f"  {key:<12} {outputs[key]}")
    print("\n".join(lines))
