"""What a resume (``ckpt_path``) may change: the settings check that refuses, before any data
or model is built, a resume whose settings differ from the checkpoint's (the world size and the
data's content are checked once the trainer exists: :func:`moe_emergence.runs.check_resume_data`).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from moe_emergence.checkpoints import RandomStates
from moe_emergence.data.loader import RESUME_KEYS
from moe_emergence.errors import UserError
from moe_emergence.model.gpt2_moe import has_per_expert_layout
from moe_emergence.runs import Checkpoint, plain, saved_loader_state
from moe_emergence.settings import is_int

# Model settings that change the weights' shapes or what they are (a router trained, frozen or
# none): a resume with another value cannot load them, or would continue another condition.
MODEL_SHAPE_KEYS = (
    "vocab_size",
    "n_positions",
    "n_embd",
    "n_layer",
    "n_head",
    "moe.layers",
    "moe.n_experts",
    "moe.top_k",
    "moe.router",
)


def check_resume_settings(cfg: DictConfig, start: Checkpoint, vocab_size: int | None) -> None:
    """Refuse, before any data or model is built, a resume of a checkpoint whose experts are
    in the per-expert layout (use ``init_from``), or whose config differs from the
    checkpoint's in ``seed``, the data settings the config alone decides (batch size, data
    seed, balance, block size) or the model's shapes (``vocab_size``: the data's tokenizer's);
    one line naming every change. The world size and the data's content are checked once the
    trainer exists (:func:`check_resume_data`), and the train loader checks everything again
    at the restore."""
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
        for key in ("batch_size", "seed", "balance_tokens", "block_size"):
            if key in loader:
                now[RESUME_KEYS[key]] = (loader[key], plain(cfg.data.get(key)))
    saved_model = OmegaConf.create(dict(checkpoint.get("hyper_parameters", {})))
    handed = {"vocab_size": vocab_size}  # what the data hands to the model
    for key in MODEL_SHAPE_KEYS:
        saved = OmegaConf.select(saved_model, key, default=None)
        if saved is not None:
            value = handed[key] if key in handed else OmegaConf.select(cfg.model, key)
            now[f"model.{key}"] = (plain(saved), plain(value))
    changed = [
        f"{label}: checkpoint {old!r}, now {new!r}"
        for label, (old, new) in now.items()
        if old != new
    ]
    if changed:
        raise UserError(
            f"Cannot resume with changed settings: {'; '.join(changed)}. Resume with the "
            f"checkpoint's values, or start a new run from the checkpoint's weights with "
            f"init_from={path} (and ckpt_path=null; it gets a new run folder)."
        )
