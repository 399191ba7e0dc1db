"""What a resume (``ckpt_path``) may change: the settings check that refuses, before any data
or model is built, a resume whose training settings differ from the checkpoint's.

A resume continues one run, so every setting that changes what trains must be the
checkpoint's; each one that differs is named in one line (``<key>: checkpoint <old>, now
<new>``). Compared:

- ``seed`` (the checkpoint's :class:`~moe_emergence.checkpoints.RandomStates`) and the data
  settings the config alone decides (``data.batch_size``, ``data.seed``,
  ``data.balance_tokens``, ``data.block_size``: the train loader's saved state);
- every ``model.*`` setting the checkpoint's hyper-parameters hold (the model's shapes and
  router, ``dropout``, the schedule's ``warmup_steps`` and ``min_lr_ratio``, the loss weights
  ``lb_coef``, ``z_coef``, ``lb_scope``, ``lb_window``, the router noise ``moe.noise_std`` and
  ``moe.noise_anneal_steps``, ...), but those of :data:`MAY_CHANGE`; a setting the checkpoint
  predates is not compared;
- the trainer's ``gradient_clip_val``, ``gradient_clip_algorithm``, ``accumulate_grad_batches``
  and ``precision``, as the checkpoint's start recorded them (:func:`trainer_settings`;
  checkpoints written before the record: not compared);
- the optimizer, as its saved parameter group holds it: ``lr`` (the configured one, before the
  schedule: ``initial_lr``), ``betas``, ``eps``, ``weight_decay`` and every other
  hyper-parameter of its class (another class shows as keys the configured one lacks or sets
  otherwise), but those of :data:`OPTIMIZER_MAY_CHANGE`.

The world size and the data's content are checked once the trainer exists
(:func:`moe_emergence.runs.start.check_resume_data`); ``trainer.max_steps`` must lie above the
checkpoint's step.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from moe_emergence.checkpoints import RandomStates, has_per_expert_layout
from moe_emergence.data.loader import RESUME_KEYS, SETTING_KEYS
from moe_emergence.errors import UserError
from moe_emergence.runs.checkpoint import Checkpoint, saved_loader_state
from moe_emergence.runs.history import recorded_settings
from moe_emergence.settings import is_int

# What a resume may change, in one place; everything else that trains is compared.
# - model.hub_mirror: where the weights' config is read from (a place).
# - model.compile, model.moe.dispatch: how the same computation runs (compiled blocks; the
#   experts' loop or grouped kernels), chosen for the device.
# - the optimizer's foreach / fused / capturable / differentiable (OPTIMIZER_MAY_CHANGE): its
#   kernels, chosen for the device.
# - not model.* at all, so not compared: trainer.max_steps (above the checkpoint's step; the
#   cosine decay then ends at the new max_steps), the logging, progress-bar, checkpoint and
#   routing-analysis cadence, the logger, paths and the data's places (hub_mirror, tokenizer,
#   cache_dir); trainer.devices and num_nodes only where the world size stays the same.
MAY_CHANGE = ("model.hub_mirror", "model.compile", "model.moe.dispatch")
OPTIMIZER_MAY_CHANGE = ("foreach", "fused", "capturable", "differentiable")
# model.* hyper-parameters compared elsewhere: block_size (data.block_size, the loader's),
# domains (check_resume_data: names and order), vocab_size (the data's tokenizer's, below).
COMPARED_ELSEWHERE = ("model.block_size", "model.domains", "model.vocab_size")


class _Absent:
    """A setting one side does not have (another optimizer class)."""

    def __repr__(self) -> str:
        return "absent"


ABSENT = _Absent()


def plain(value: Any) -> Any:
    """A config value as plain Python (resolved); other values as they are."""
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _flat(tree: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, Any]]:
    """``{"moe": {"top_k": 1}}`` -> ``("<prefix>moe.top_k", 1)``; a null node stays one key."""
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _comparable(value: Any) -> Any:
    """Tuples as lists (a checkpoint holds AdamW's ``betas`` as a tuple, the config a list)."""
    value = plain(value)
    if isinstance(value, tuple | list):
        return [_comparable(v) for v in value]
    return value


def model_changes(cfg: DictConfig, checkpoint: Mapping[str, Any], vocab_size: int | None) -> dict:
    """``model.<key>`` -> ``(checkpoint, now)`` for every ``model.*`` hyper-parameter the
    checkpoint holds (but :data:`MAY_CHANGE`); ``vocab_size`` is the data's tokenizer's."""
    saved = dict(checkpoint.get("hyper_parameters") or {})
    found: dict[str, tuple[Any, Any]] = {}
    if saved.get("vocab_size") is not None:
        found["model.vocab_size"] = (saved["vocab_size"], vocab_size)
    for label, old in _flat(saved, "model."):
        if label in MAY_CHANGE or label in COMPARED_ELSEWHERE:
            continue
        new = OmegaConf.select(cfg, label, default=ABSENT)
        found[label] = (_comparable(old), _comparable(new))
    return found


def optimizer_changes(cfg: DictConfig, checkpoint: Mapping[str, Any]) -> dict:
    """``model.optimizer.<key>`` -> ``(checkpoint, now)``: the checkpoint's first parameter
    group against the configured optimizer's (built on one dummy parameter, so that the
    class's defaults count: ``eps``, ``amsgrad``, ...). ``lr`` is the configured one
    (``initial_lr``, which the schedule scales); a key the checkpoint lacks (a newer torch) is
    not compared."""
    groups = ((checkpoint.get("optimizer_states") or [{}])[0] or {}).get("param_groups") or []
    factory = OmegaConf.select(cfg, "model.optimizer", default=None)
    if not groups or factory is None:
        return {}
    saved = groups[0]
    try:
        now = instantiate(factory)([torch.nn.Parameter(torch.zeros(1))]).param_groups[0]
    except Exception:  # a config the optimizer refuses: its own error comes when training starts
        return {}
    found = {}
    if "initial_lr" in saved:
        found["model.optimizer.lr"] = (saved["initial_lr"], now.get("lr", ABSENT))
    for key, old in saved.items():
        if key in ("params", "lr", "initial_lr") or key in OPTIMIZER_MAY_CHANGE:
            continue
        found[f"model.optimizer.{key}"] = (_comparable(old), _comparable(now.get(key, ABSENT)))
    return found


# Trainer settings that change what trains; Lightning's checkpoint does not hold them, so each
# start records them (history.StartRecord) as trainer_settings gives them.
TRAINER_KEYS = ("gradient_clip_val", "gradient_clip_algorithm", "accumulate_grad_batches")
# Lightning's short precision names, as it reads them.
PRECISIONS = {"32": "32-true", "64": "64-true", "16": "16-mixed", "bf16": "bf16-mixed"}


def trainer_settings(cfg: DictConfig) -> dict[str, Any]:
    """``trainer.<key>`` -> its value as Lightning reads it (no clipping: 0; the clipping
    algorithm: norm unless set; precision by its full name), for :data:`TRAINER_KEYS` and
    ``precision``."""
    trainer = cfg.get("trainer") or {}
    found = {f"trainer.{key}": plain(trainer.get(key)) for key in TRAINER_KEYS}
    found["trainer.gradient_clip_val"] = found["trainer.gradient_clip_val"] or 0
    found["trainer.gradient_clip_algorithm"] = found["trainer.gradient_clip_algorithm"] or "norm"
    found["trainer.accumulate_grad_batches"] = found["trainer.accumulate_grad_batches"] or 1
    precision = str(plain(trainer.get("precision")) or "32-true")
    found["trainer.precision"] = PRECISIONS.get(precision, precision)
    return found


def check_resume_settings(cfg: DictConfig, start: Checkpoint, vocab_size: int | None) -> None:
    """Refuse, before any data or model is built, a resume with nothing left to train, of a
    checkpoint whose experts are in the per-expert layout (use ``init_from``), or whose
    settings differ from the checkpoint's (see the module doc); one line naming every change
    with its checkpoint's and its new value. ``vocab_size``: the data's tokenizer's."""
    path, checkpoint = start.path, start.contents
    step, max_steps = int(checkpoint.get("global_step", 0)), cfg.trainer.get("max_steps")
    if is_int(max_steps) and 0 <= max_steps <= step:
        raise UserError(
            f"ckpt_path={path} is at step {step} and trainer.max_steps={max_steps}: nothing is "
            f"left to train; raise trainer.max_steps (e.g. trainer.max_steps={2 * step}) to "
            f"train on."
        )
    if has_per_expert_layout(checkpoint.get("state_dict") or {}):
        raise UserError(
            f"ckpt_path={path} holds experts in the per-expert layout of an earlier version, "
            f"which cannot resume (its optimizer state is per expert): start a new run from its "
            f"weights with init_from={path} (and ckpt_path=null; it gets a new run folder)."
        )
    loader = saved_loader_state(checkpoint)
    now: dict[str, tuple[Any, Any]] = {}  # label -> (checkpoint, now)
    rng = checkpoint.get("callbacks", {}).get(RandomStates.__qualname__, {})
    if "seed" in rng:
        now["seed"] = (rng["seed"], cfg.seed)
    if loader.get("version") is not None:
        for key in SETTING_KEYS:
            if key in loader:
                now[RESUME_KEYS[key]] = (loader[key], plain(cfg.data.get(key)))
    now |= model_changes(cfg, checkpoint, vocab_size)
    now |= optimizer_changes(cfg, checkpoint)
    current = trainer_settings(cfg)
    now |= {k: (v, current.get(k, ABSENT)) for k, v in recorded_settings(checkpoint).items()}
    changed = [
        f"{label}: checkpoint {old!r}, now {new!r}"
        for label, (old, new) in now.items()
        if old != new
    ]
    if changed:
        raise UserError(
            f"Cannot resume with changed settings: {'; '.join(changed)}. Resume with the "
            f"checkpoint's values, or start a new run from the checkpoint's weights with "
            f"init_from={path} (and ckpt_path=null, without hydra.run.dir: it gets a new run "
            f"folder)."
        )
