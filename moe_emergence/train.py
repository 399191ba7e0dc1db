"""Compose -> instantiate -> fit: the body of ``train.py``, importable for tests and notebooks."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"


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


class RunSummary(L.Callback):
    """Writes ``summary.json`` in the run dir at the end of training (rank 0): the final step,
    the per-domain train losses over all ranks and the last logged metrics. Under ddp_spawn the
    parent process's trainer never sees the steps; it reads this file instead."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        losses = getattr(pl_module, "final_domain_losses", dict)()  # collective: every rank
        if not trainer.is_global_zero:
            return
        summary = {
            "global_step": int(trainer.global_step),
            "domain_losses": losses,
            "final_metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(summary, indent=2))


def train(
    cfg: DictConfig, multirun: bool = False, launcher: str = "BasicLauncher"
) -> dict[str, Any]:
    """Seed, build datamodule, model and trainer from ``cfg``, fit; return where outputs are.

    ``multirun`` / ``launcher``: whether this is a sweep job and the Hydra launcher's target.
    """
    check_launch(cfg, multirun, launcher)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger)
    run_dir = Path(trainer.default_root_dir)
    trainer.callbacks.append(RunSummary(run_dir / SUMMARY_FILE))
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    outputs = {
        "run_dir": run_dir,
        "checkpoints": trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback else None,
        "metrics": Path(trainer.logger.log_dir) / "metrics.csv" if trainer.logger else None,
        "routing": run_dir / "routing" if (run_dir / "routing").is_dir() else None,
        "data_report": run_dir / "data_report.json",
        "summary": run_dir / SUMMARY_FILE,
        **summary,
    }
    if trainer.is_global_zero:
        _print_summary(outputs)
    return outputs


def _print_summary(outputs: dict[str, Any]) -> None:
    lines = [f"Finished at step {outputs['global_step']}. Outputs in {outputs['run_dir']}:"]
    if outputs["domain_losses"]:
        lines.append("  final train loss per domain (mean of the last 50 steps): " + ", ".join(
            f"{d} {v:.3f}" for d, v in outputs["domain_losses"].items()))  # fmt: skip
    for key in ("checkpoints", "metrics", "routing", "data_report", "summary"):
        if outputs[key] is not None:
            lines.append(f"  {key:<12} {outputs[key]}")
    print("\n".join(lines))
