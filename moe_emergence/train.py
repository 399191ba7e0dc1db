"""Compose -> instantiate -> fit: the body of ``train.py``, importable for tests and notebooks."""

from __future__ import annotations

import json
import logging
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
    load_mapped,
    resolve_checkpoint,
)
from moe_emergence.data.datamodule import RESUME_KEYS, check_loader_state
from moe_emergence.data.sources import DOMAINS
from moe_emergence.errors import UserError
from moe_emergence.model.gpt2_moe import has_per_expert_layout
from moe_emergence.model.module import check_compile

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
    the per-domain train losses over all ranks, the MoE dispatch path (None for a dense model)
    and the last logged metrics. Under ddp_spawn the
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
            "moe_dispatch": getattr(pl_module, "dispatch", None),
            "final_metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(summary, indent=2))


def _this_run_dir(cfg: DictConfig) -> str | None:
    """``paths.run_dir`` (this run's folder), or None where it cannot be resolved."""
    try:
        return OmegaConf.select(cfg, "paths.run_dir", default=None)
    except Exception:  # ${hydra:...} outside a Hydra app
        return None


def resolve_start(cfg: DictConfig) -> tuple[Path | None, Path | None]:
    """``(ckpt_path, init_from)`` as verified checkpoint files (at most one of them set), or a
    one-line UserError; cheap (the checkpoint is memory-mapped and hashed), before any data or
    model is built. See :func:`moe_emergence.checkpoints.resolve_checkpoint`."""
    ckpt, init = cfg.get("ckpt_path"), cfg.get("init_from")
    if ckpt is not None and init is not None:
        raise UserError(
            f"ckpt_path={ckpt} and init_from={init} are both set: ckpt_path resumes a run (its "
            f"step, optimizer, data position), init_from starts a new run from a checkpoint's "
            f"weights; pass only one."
        )
    if ckpt is not None:
        return resolve_checkpoint(str(ckpt), "ckpt_path", _this_run_dir(cfg)), None
    if init is not None:
        return None, resolve_checkpoint(str(init), "init_from", _this_run_dir(cfg))
    return None, None


# Model settings that change the weights' shapes: a resume with another value cannot load them.
MODEL_SHAPE_KEYS = (
    "vocab_size",
    "n_positions",
    "n_embd",
    "n_layer",
    "n_head",
    "moe.layers",
    "moe.n_experts",
    "moe.top_k",
)


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _saved_loader_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The train loader's state in a Lightning checkpoint (``{}`` when it has none)."""
    fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
    return dict((fit_loop.get("state_dict", {}).get("combined_loader") or [{}])[0])


def check_resume_settings(cfg: DictConfig, path: Path) -> None:
    """Refuse, before any data or model is built, a resume of a checkpoint whose experts are
    in the per-expert layout (use ``init_from``), or whose config differs from the
    checkpoint's in ``seed``, the data settings the config alone decides (batch size, data
    seed, balance, block size) or the model's shapes; one line naming every change. The
    world size and the data's content are checked once the trainer exists
    (:func:`check_resume_data`), and the train loader checks everything again at the restore."""
    checkpoint = load_mapped(path, "ckpt_path")
    if has_per_expert_layout(checkpoint.get("state_dict") or {}):
        raise UserError(
            f"ckpt_path={path} holds experts in the per-expert layout of an earlier version, "
            f"which cannot resume (its optimizer state is per expert): start a new run from its "
            f"weights with init_from={path} (and ckpt_path=null)."
        )
    loader = _saved_loader_state(checkpoint)
    now: dict[str, tuple[Any, Any]] = {}  # label -> (checkpoint, now)
    rng = checkpoint.get("callbacks", {}).get(RandomStates.__qualname__, {})
    if "seed" in rng:
        now["seed"] = (rng["seed"], cfg.seed)
    if loader.get("version") is not None:
        for key in ("batch_size", "seed", "balance_tokens", "block_size"):
            if key in loader:
                now[RESUME_KEYS[key]] = (loader[key], _plain(cfg.data.get(key)))
    saved_model = checkpoint.get("hyper_parameters", {})
    for key in MODEL_SHAPE_KEYS:
        saved = OmegaConf.select(OmegaConf.create(dict(saved_model)), key, default=None)
        if saved is not None:
            now[f"model.{key}"] = (_plain(saved), _plain(OmegaConf.select(cfg.model, key)))
    changed = [
        f"{label}: checkpoint {old!r}, now {new!r}"
        for label, (old, new) in now.items()
        if old != new
    ]
    if changed:
        raise UserError(
            f"Cannot resume with changed settings: {'; '.join(changed)}. Resume with the "
            f"checkpoint's values, or start a new run from the checkpoint's weights with "
            f"init_from={path} (and ckpt_path=null)."
        )


def check_resume_data(datamodule: Any, trainer: L.Trainer, path: Path) -> None:
    """Refuse a resume whose world size or training data (token content, held-out split)
    differ from the checkpoint's, in this process (ahead of ddp_spawn's workers, whose errors
    would come back as tracebacks). Opens the token cache, as ``fit`` would next."""
    state = _saved_loader_state(load_mapped(path, "ckpt_path"))
    if hasattr(datamodule, "resume_identity"):
        check_loader_state(state, datamodule.resume_identity(trainer.world_size), path)


def _plugins(cfg: DictConfig) -> list[Any]:
    """The trainer config's own plugins, plus checkpoint IO that writes SHA-256 sidecars."""
    own = cfg.trainer.get("plugins")
    found = instantiate(own) if own is not None else []
    found = list(found) if isinstance(found, list | tuple) or OmegaConf.is_list(found) else [found]
    return [*found, HashedCheckpointIO()]


def train(
    cfg: DictConfig, multirun: bool = False, launcher: str = "BasicLauncher"
) -> dict[str, Any]:
    """Seed, build datamodule, model and trainer from ``cfg``, fit; return where outputs are.

    ``multirun`` / ``launcher``: whether this is a sweep job and the Hydra launcher's target.
    ``ckpt_path`` resumes a run (refused when data settings, seed or world size changed);
    ``init_from`` starts a new run from a checkpoint's weights.
    """
    check_launch(cfg, multirun, launcher)
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"seed must be an integer ≥ 0, got {seed!r} (e.g. seed=42).")
    moe = cfg.model.get("moe") or {}
    check_compile(cfg.model.get("compile", False), moe.get("dispatch"), cfg.trainer.precision)
    ckpt_path, init_from = resolve_start(cfg)
    if ckpt_path is not None:
        check_resume_settings(cfg, ckpt_path)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model, domains=list(DOMAINS))  # the data's labels, defined there
    if init_from is not None:
        step = load_initial_weights(model, init_from)
        log.info("Weights from %s (its step %d); this run starts at step 0.", init_from, step)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    if cfg.trainer.get("enable_progress_bar") is False:  # else Lightning refuses the bar callback
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=logger, plugins=_plugins(cfg)
    )
    run_dir = Path(trainer.default_root_dir)
    trainer.callbacks.append(RunSummary(run_dir / SUMMARY_FILE))
    trainer.callbacks.append(RandomStates(seed=cfg.seed))
    trainer.callbacks.append(StepZeroCheckpoint())  # after RoutingAnalysis: its step-0 rows
    if ckpt_path is not None:
        check_resume_data(datamodule, trainer, ckpt_path)
        log.info("Resuming from %s", ckpt_path)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)

    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    outputs = {
        "run_dir": run_dir,
        "checkpoints": trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback else None,
        "metrics": Path(trainer.logger.log_dir) / "metrics.csv" if trainer.logger else None,
        "routing": run_dir / "routing" if (run_dir / "routing").is_dir() else None,
        "data_report": run_dir / "data_report.json",
        "summary": run_dir / SUMMARY_FILE,
        "resumed_from": ckpt_path,
        "init_from": init_from,
        **summary,
    }
    if trainer.is_global_zero:
        _print_summary(outputs)
    return outputs


def _print_summary(outputs: dict[str, Any]) -> None:
    lines = [f"Finished at step {outputs['global_step']}. Outputs in {outputs['run_dir']}:"]
    if outputs.get("moe_dispatch"):
        lines.append(f"  MoE dispatch: {outputs['moe_dispatch']}")
    if outputs["domain_losses"]:
        lines.append(
            "  final train loss per domain (mean of the last 50 steps): "
            + ", ".join(f"{d} {v:.3f}" for d, v in outputs["domain_losses"].items())
        )
    for key in ("checkpoints", "metrics", "routing", "data_report", "summary"):
        if outputs[key] is not None:
            lines.append(f"  {key:<12} {outputs[key]}")
    print("\n".join(lines))
