"""Rebuild the model of a ``train.py`` checkpoint for analysis: GPT-2 (MoE layers or dense)
from the weights' shapes and the recorded hyper-parameters, without downloading weights; and
the run's recorded data settings. Used by ``inspect`` and ``analyze``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from transformers import GPT2LMHeadModel

from moe_emergence.checkpoints import (
    RandomStates,
    has_per_expert_layout,
    load_mapped,
    load_strict,
    stack_per_expert_state,
)
from moe_emergence.data.cache import cache_entries
from moe_emergence.data.datamodule import REPORT_FILE, data_fingerprint
from moe_emergence.data.settings import LoaderSettings, as_made
from moe_emergence.errors import UserError
from moe_emergence.model.gpt2_moe import build_model, moe_layers
from moe_emergence.model.module import DISPATCH_KEY
from moe_emergence.model.settings import ModelSettings, MoESettings
from moe_emergence.runs.checkpoint import saved_loader_state
from moe_emergence.runs.record import HYDRA_CONFIG, recorded_config


@dataclass
class LoadedCheckpoint:
    """The GPT-2 of a checkpoint (MoE layers unless dense; eval mode, CPU), its step, the
    module's hyper-parameters and the data settings recorded with it (empty when none).

    data_fingerprint: the training data's content identity its train loader recorded (None in
    checkpoints without one).

    seed: the run's ``seed`` as its :class:`~moe_emergence.checkpoints.RandomStates` saved it
    (None in checkpoints without one): the seed it trained with, whatever its ``.hydra/`` says.

    dispatch: the MoE dispatch path it trained with (``loop`` | ``grouped``; ``loop (per-expert
    layout)`` for checkpoints of per-expert modules, converted to stacked weights on loading;
    None for a dense model). Its MoE layers run that path here.
    """

    model: GPT2LMHeadModel
    path: Path
    step: int
    hparams: dict[str, Any]
    data_settings: dict[str, Any]
    dispatch: str | None = None
    data_fingerprint: str | None = None
    seed: int | None = None


def load_checkpoint(path: Path, option: str = "CKPT", require_moe: bool = True) -> LoadedCheckpoint:
    """Rebuild the model of a verified ``train.py`` checkpoint (see
    :func:`moe_emergence.runs.checkpoint.resolve_checkpoint`) from its weights' shapes and
    hyper-parameters, without downloading pretrained weights. ``option`` names the argument in
    errors; a dense model is refused unless ``require_moe`` is False."""
    checkpoint = load_mapped(path, option)
    hp = dict(checkpoint.get("hyper_parameters") or {})
    moe = dict(hp.get("moe") or {})
    if require_moe and not moe.get("layers"):
        raise UserError(
            f"{option}={path} is a dense model (no MoE layers, model.moe is empty): there is no "
            f"routing to inspect; pass a checkpoint of an MoE run."
        )
    state = {
        k.removeprefix("model."): v
        for k, v in checkpoint["state_dict"].items()
        if k.startswith("model.")
    }
    per_expert = has_per_expert_layout(state)
    if per_expert:  # written before experts were stacked: same weights, stacked
        state = stack_per_expert_state(state)
    if "transformer.wte.weight" not in state or "transformer.wpe.weight" not in state:
        raise UserError(f"{option}={path} holds no GPT-2 weights: pass a checkpoint of train.py.")
    vocab_size, n_embd = state["transformer.wte.weight"].shape
    shapes = {  # the weights' own (hyper-parameters of old runs may lack them)
        "n_positions": state["transformer.wpe.weight"].shape[0],
        "n_embd": n_embd,
        "n_layer": len({k.split(".")[2] for k in state if k.startswith("transformer.h.")}),
    }
    settings = ModelSettings(**{**{k: hp[k] for k in ModelSettings.names() if k in hp}, **shapes})
    moe_fields = {k: v for k, v in moe.items() if k in MoESettings.names()}
    moe_settings = MoESettings(**moe_fields) if moe.get("layers") else None
    model = build_model(settings, moe_settings, vocab_size, weights=False)
    load_strict(
        model,
        state,
        lambda first: f"{option}={path}: its weights do not fit its own settings ({first}).",
    )
    model.eval()
    dispatch = None
    if moe.get("layers"):
        dispatch = "loop (per-expert layout)" if per_expert else checkpoint.get(DISPATCH_KEY)
        dispatch = dispatch or "loop"  # stacked, before the path was recorded: loop only
        for layer in moe_layers(model).values():
            layer.set_dispatch("grouped" if dispatch == "grouped" else "loop")
    return LoadedCheckpoint(
        model=model,
        path=path,
        step=int(checkpoint.get("global_step", 0)),
        hparams=hp,
        data_settings=dict(checkpoint.get("datamodule_hyper_parameters") or {}),
        dispatch=dispatch,
        data_fingerprint=saved_loader_state(checkpoint).get("data_fingerprint"),
        seed=(checkpoint.get("callbacks") or {}).get(RandomStates.__qualname__, {}).get("seed"),
    )


def tokenizer_settings(loaded: LoadedCheckpoint) -> dict[str, Any] | None:
    """``tokenizer``, ``hub_mirror`` and ``cache_dir`` of the run: from the checkpoint's data
    settings, else from ``<run>/.hydra/config.yaml`` (run = the checkpoint's folder's parent);
    None when neither has them."""
    keys = ("tokenizer", "hub_mirror", "cache_dir")
    if loaded.data_settings.get("tokenizer"):
        return {k: loaded.data_settings.get(k) for k in keys}
    run_dir = loaded.path.resolve().parent.parent
    cfg = recorded_config(run_dir)
    if cfg is None:
        return None
    config_file = run_dir / HYDRA_CONFIG
    try:
        found = {k: OmegaConf.select(cfg, f"data.{k}", default=None) for k in keys}
    except Exception as exc:  # an interpolation this process cannot resolve
        raise UserError(
            f"{config_file}: cannot read data.tokenizer ({exc}); pass --tokenizer."
        ) from None
    return found if found["tokenizer"] else None


def recorded_tokenizer(loaded: LoadedCheckpoint) -> tuple[dict[str, Any], str] | None:
    """The identity of the tokenizer the run trained with (``tokenizer_identity``: class, sizes,
    SHA-256 of its definition) and where it is recorded: the run's ``data_report.json`` (beside
    the checkpoint's folder), else
    the token cache entry (under the recorded ``cache_dir``) whose data has the checkpoint's
    data fingerprint; None when neither is found."""
    report = loaded.path.resolve().parent.parent / REPORT_FILE  # <run>/checkpoints/x.ckpt
    if report.is_file():
        try:
            info = json.loads(report.read_text()).get("tokenizer")
        except (OSError, ValueError, AttributeError):
            info = None
        if isinstance(info, dict) and info.get("sha256"):
            return info, str(report)
    if loaded.data_fingerprint is None or not loaded.data_settings:
        return None
    settings, _ = as_made(loaded.data_settings)  # settings added since: the run's values
    split = [settings.get(k, getattr(LoaderSettings(), k)) for k in LoaderSettings.EVAL_KEYS]
    for folder, manifest in cache_entries(settings.get("cache_dir")):
        try:
            if data_fingerprint(manifest, *split) == loaded.data_fingerprint:
                return dict(manifest["tokenizer"]), str(folder)
        except (KeyError, TypeError, AttributeError, ValueError):
            continue
    return None
