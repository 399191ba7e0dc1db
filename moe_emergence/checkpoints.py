"""The checkpoint file format: SHA-256 sidecars, memory-mapped reading, saved random states.

- :class:`HashedCheckpointIO` writes every checkpoint atomically with ``<ckpt>.sha256`` beside
  it (``sha256sum`` format: ``<64 hex>  <file name>``, so ``sha256sum -c`` checks it too).
- :func:`load_mapped` reads a checkpoint with its tensors memory-mapped, or raises a one-line
  :class:`UserError` (which file ``ckpt_path`` / ``init_from`` name:
  :mod:`moe_emergence.runs.checkpoint`).
- :class:`RandomStates` saves torch (CPU and CUDA), numpy and Python random states of every
  rank in the checkpoint and puts them back right before the first resumed step, so that the
  losses after a resume equal the uninterrupted run's step for step.
- :class:`StepZeroCheckpoint` saves a fresh run's weights before its first step (next to the
  ModelCheckpoint's files, under its name pattern at step 0): the baseline every routing score
  is read against, which ``analyze`` routes like any other checkpoint.
- :func:`load_initial_weights`: ``init_from`` -- a new run (step 0, fresh optimizer and data
  order) from a checkpoint's weights.
- :func:`stack_per_expert_state`: the upgrade of checkpoints written before experts were
  stacked (one module per expert; :func:`has_per_expert_layout`) to the stacked weights.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from moe_emergence.distributed import gather_objects
from moe_emergence.errors import UserError
from moe_emergence.files import sha256_file, write_atomic
from moe_emergence.model.moe import PARAMETERS_OF_MLP

log = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".sha256"
RANDOM_STATES_VERSION = 1


# ---------------------------------------------------------------------- sidecars


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(path)}{SIDECAR_SUFFIX}")


def write_sidecar(path: str | os.PathLike, digest: str | None = None) -> Path:
    """Write ``<path>.sha256`` (atomically) with ``digest``, or the file's hash when None."""
    path = Path(path)
    digest = digest or sha256_file(path)
    side = sidecar_path(path)
    write_atomic(side, f"{digest}  {path.name}\n")
    return side


def _find_sidecar(path: Path) -> Path | None:
    """``<path>.sha256``; for a symlink (``save_last="link"``) also its target's sidecar."""
    for candidate in (sidecar_path(path), sidecar_path(path.resolve())):
        if candidate.is_file():
            return candidate
    return None


def verify_sidecar(path: Path, option: str) -> None:
    """Refuse ``path`` (one-line :class:`UserError`) when its sidecar is missing or differs."""
    side = _find_sidecar(path)
    if side is None:
        raise UserError(
            f"{option}={path}: no checksum file {sidecar_path(path).name} beside it (written by "
            f"train.py with every checkpoint), so its integrity cannot be checked; if you trust "
            f"the file, write one with: sha256sum {path.name} > {path.name}{SIDECAR_SUFFIX} (in "
            f"{path.parent})."
        )
    recorded = side.read_text().split()[:1]
    actual = sha256_file(path)
    if recorded != [actual]:
        raise UserError(
            f"{option}={path}: the file does not match its checksum in {side.name} (damaged or "
            f"changed after it was saved): resume from another checkpoint of the run."
        )


class HashedCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into memory, hash the bytes, write the file and ``<ckpt>.sha256`` each
    through a temporary file and a rename. A crash between the two renames leaves a pair that
    disagrees, which a resume refuses (it never trusts a half-written file). Remote (``://``)
    paths are saved by Lightning's own IO, without a sidecar."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in os.fspath(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getbuffer()
        digest = hashlib.sha256(data).hexdigest()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, data)  # its temporary file is removed when a write fails
            write_sidecar(path, digest)
        except OSError as exc:  # a full disk, a read-only folder
            raise UserError(
                f"Writing checkpoint {path} failed ({exc.strerror or type(exc).__name__}): free "
                f"disk space or make its folder writable (or set "
                f"callbacks.model_checkpoint.dirpath), then resume from the run's last complete "
                f"checkpoint with ckpt_path=<run dir>."
            ) from exc

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        if "://" not in os.fspath(path):
            sidecar_path(path).unlink(missing_ok=True)


# ---------------------------------------------------------------------- reading


def load_mapped(path: Path, option: str) -> dict[str, Any]:
    """The checkpoint's dict, its tensors memory-mapped (cheap: nothing big is read)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # torch raises many kinds for a bad file
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(
            f"{option}={path} is not a readable checkpoint (truncated, damaged or another kind "
            f"of file: {reason}); pass a .ckpt file written by train.py."
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(
            f"{option}={path} is not a Lightning checkpoint (no state_dict in it); pass a .ckpt "
            f"file written by train.py."
        )
    return checkpoint


def load_initial_weights(module: torch.nn.Module, checkpoint: dict[str, Any], path: Path) -> int:
    """Copy ``checkpoint``'s ``state_dict`` (read from ``path``, named in errors) into
    ``module`` (strict; experts of the per-expert layout converted to stacked weights); return
    the step it was saved at. A model that differs (other layers, widths, experts) is a
    UserError."""
    # Experts written before they were stacked are stacked (the same weights); else a no-op.
    state = stack_per_expert_state(checkpoint["state_dict"])
    load_strict(
        module,
        state,
        lambda first: (
            f"init_from={path}: its weights do not fit this model ({first}); use the "
            f"model settings the checkpoint was trained with."
        ),
    )
    return int(checkpoint.get("global_step", 0))


def load_strict(
    module: torch.nn.Module, state: Mapping[str, Tensor], mismatch: Callable[[str], str]
) -> None:
    """Load ``state`` into ``module`` strictly; weights that do not fit are a UserError reading
    ``mismatch(first)``, ``first`` torch's complaint on one line (its first 240 characters)."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:240]
        raise UserError(mismatch(first)) from None


# ---------------------------------------------------------------------- old checkpoints


# An expert parameter of the per-expert layout (before stacked experts): its block, expert
# and GPT-2 MLP parameter, e.g. "transformer.h.8.mlp.experts.3.c_fc.weight".
_PER_EXPERT_KEY = re.compile(
    r"^(?P<prefix>.*\.mlp\.experts)\.(?P<expert>\d+)\."
    r"(?P<param>c_fc\.weight|c_fc\.bias|c_proj\.weight|c_proj\.bias)$"
)


def has_per_expert_layout(state: Mapping[str, Tensor]) -> bool:
    """Whether a state dict holds experts in the per-expert layout (one module per expert)."""
    return any(_PER_EXPERT_KEY.match(key) for key in state)


def stack_per_expert_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A state dict with per-expert MLP weights (``...mlp.experts.<e>.c_fc.weight``, ...)
    converted to the stacked layout (``...mlp.experts.c_fc_weight`` [E, d, h], ...); other
    keys unchanged (a state dict without per-expert keys comes back as it is). The values are
    exactly the saved ones, so the model computes the same logits."""
    out: dict[str, Tensor] = {}
    groups: dict[tuple[str, str], dict[int, Tensor]] = {}
    for key, value in state.items():
        match = _PER_EXPERT_KEY.match(key)
        if match is None:
            out[key] = value
            continue
        groups.setdefault((match["prefix"], match["param"]), {})[int(match["expert"])] = value
    names = {source: name for name, source in PARAMETERS_OF_MLP.items()}
    for (prefix, param), by_expert in groups.items():
        if sorted(by_expert) != list(range(len(by_expert))):
            raise ValueError(f"{prefix}: experts {sorted(by_expert)} are not 0..E-1")
        out[f"{prefix}.{names[param]}"] = torch.stack([by_expert[e] for e in sorted(by_expert)])
    return out


# ---------------------------------------------------------------------- random states


def collect_random_states() -> dict[str, Any]:
    """This process's torch CPU (and current CUDA device), numpy and Python random states, as
    tensors and plain values (loadable with ``torch.load(weights_only=True)``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore_random_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


class StepZeroCheckpoint(L.Callback):
    """Save a checkpoint at the start of a fresh run (global step 0, not a resume) as the
    trainer's ModelCheckpoint would name it at step 0 (``step000000.ckpt``); nothing without a
    ModelCheckpoint. Collective under DDP (every rank calls it), like any checkpoint save."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        saver = trainer.checkpoint_callback
        if saver is None or trainer.ckpt_path is not None or trainer.global_step != 0:
            return
        name = saver.format_checkpoint_name({"step": torch.tensor(0), "epoch": torch.tensor(0)})
        trainer.save_checkpoint(name)


class RandomStates(L.Callback):
    """Saves every rank's random states (and the run's ``seed``) in each checkpoint; on a
    resume, each rank gets its own back in ``on_train_start``.

    Why then: the fit loop's ``setup_data`` starts the train loader's iterator (a DataLoader
    draws its base seed from torch's generator) after callback states are loaded and before
    ``on_train_start``; the uninterrupted run drew that number at the start of the epoch,
    before the checkpoint. ``on_train_start`` is the last hook before the first resumed batch.
    ``state_dict`` is collective under DDP (every rank calls it, as Lightning does).
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._pending: list[dict[str, Any]] | None = None
        self._checkpoint = "<checkpoint>"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._checkpoint = str(trainer.ckpt_path or "<checkpoint>")

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": RANDOM_STATES_VERSION,
            "seed": self.seed,
            "ranks": gather_objects(collect_random_states()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != RANDOM_STATES_VERSION:
            raise UserError(
                f"The checkpoint's random states have format {state.get('version')!r}, this "
                f"code reads {RANDOM_STATES_VERSION}: start a new run from its weights with "
                f"init_from={self._checkpoint} (and ckpt_path=null; it gets a new run folder)."
            )
        if self.seed is not None and state.get("seed") != self.seed:
            raise UserError(
                f"Cannot resume with a changed setting: seed: checkpoint {state.get('seed')}, "
                f"now {self.seed}. Resume with seed={state.get('seed')}, or start a new run "
                f"from the checkpoint's weights with init_from={self._checkpoint} (and "
                f"ckpt_path=null; it gets a new run folder)."
            )
        self._pending = list(state["ranks"])

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is None:
            return
        states, self._pending = self._pending, None
        if len(states) != trainer.world_size:  # the data loader refuses this first
            raise UserError(
                f"Cannot resume with a changed setting: world size: checkpoint {len(states)}, "
                f"now {trainer.world_size}. Resume on {len(states)} devices, or start a new run "
                f"from the checkpoint's weights with init_from={self._checkpoint}."
            )
        restore_random_states(states[trainer.global_rank])
        rank_zero_info("Restored the random states of the checkpoint (torch, numpy, python).")


__all__ = [
    "HashedCheckpointIO",
    "RandomStates",
    "has_per_expert_layout",
    "load_initial_weights",
    "load_mapped",
    "sha256_file",
    "sidecar_path",
    "stack_per_expert_state",
    "verify_sidecar",
    "write_sidecar",
]
