"""Composing the Hydra config tree: where it lives, its resolvers (``${path_safe:...}``,
``${unique_dir:...}``: names of run folders) and the groups' base nodes.

Each settings group's base node is built from its settings dataclass (``data/settings.py``,
``model/settings.py``, ``analysis/settings.py``; registered as ``data/settings``,
``model/settings`` and ``callbacks/routing_analysis/settings`` in Hydra's config store), so that
a default is written once, in the package; the YAML files under ``conf/`` hold choices.
Composing reads nothing but ``conf/``: what the data knows (its tokenizer's size, its domains)
is handed to the model by the wiring (:mod:`moe_emergence.train`), not resolved here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from moe_emergence.analysis.settings import ProbeSettings
from moe_emergence.data.domains import read_domain_set
from moe_emergence.data.settings import DataSettings, LoaderSettings
from moe_emergence.errors import UserError
from moe_emergence.model.settings import ModelSettings, MoESettings
from moe_emergence.runs import unique_dir
from moe_emergence.settings import CONFIG_NAME, config_dir, defaults

SETTINGS_NODE = "settings"  # the base node of a group: data/settings, model/settings

DATAMODULE_TARGET = "moe_emergence.data.MixedDomainDataModule"
MODULE_TARGET = "moe_emergence.model.module.MoEGPT2Module"
ROUTING_TARGET = "moe_emergence.analysis.RoutingAnalysis"


MAX_DIR_NAME = 200  # bytes; file systems refuse names over 255, and the job number comes first


def path_safe(text: str) -> str:
    """Resolver ``${path_safe:...}``: ``/`` (from group overrides such as ``data/size=1mb``)
    would nest sweep folders; it becomes ``-``. A name longer than :data:`MAX_DIR_NAME` bytes
    (many overrides) keeps its start and ends in ``~`` and 8 hex digits of its SHA-256, so
    that it stays unique; the full overrides are in the job's ``.hydra/overrides.yaml``."""
    name = str(text).replace("/", "-")
    data = name.encode()
    if len(data) <= MAX_DIR_NAME:
        return name
    digest = hashlib.sha256(data).hexdigest()[:8]
    return data[: MAX_DIR_NAME - 9].decode(errors="ignore") + "~" + digest


def settings_nodes() -> dict[str, dict[str, Any]]:
    """Group -> its base node: the settings' defaults and the class Hydra instantiates."""
    return {
        "data": {
            "_target_": DATAMODULE_TARGET,
            **defaults(DataSettings),
            **defaults(LoaderSettings),
        },
        "model": {
            "_target_": MODULE_TARGET,
            "_convert_": "all",
            **defaults(ModelSettings),
            "moe": defaults(MoESettings),
        },
        "callbacks/routing_analysis": {"_target_": ROUTING_TARGET, **defaults(ProbeSettings)},
    }


SETTINGS_GROUPS = (DataSettings, LoaderSettings, ModelSettings, MoESettings, ProbeSettings)
# Keys outside the settings classes that never change what trains (checkpoints to start from,
# the progress bar); the settings' own such keys are marked untrained=True.
UNTRAINED_KEYS = ("ckpt_path", "init_from", "trainer.enable_progress_bar")


def untrained_keys() -> set[str]:
    """The keys that name places or change only what is shown, never what trains: sweep folder
    names and a run's condition leave them out (``conf/config.yaml``'s
    ``hydra.job.config.override_dirname.exclude_keys`` lists exactly these, checked by
    tests/test_settings.py)."""
    marked = {g.config_key(n) for g in SETTINGS_GROUPS for n in g.flagged("untrained")}
    return {*UNTRAINED_KEYS, *marked}


# The top-level keys of conf/config.yaml (no settings class holds them).
RUN_KEYS = {
    "seed": (42, "seeds Lightning (weights, router noise) and, through data.seed, block order"),
    "ckpt_path": (
        None,
        "resume: a .ckpt file, a run dir (its last.ckpt) or `last` (with hydra.run.dir=<run dir>"
        ", in that folder); the settings that change training must be the run's own",
    ),
    "init_from": (
        None,
        "start a NEW run (step 0, fresh optimizer) from the weights of a .ckpt file or a run "
        "dir's last.ckpt; not together with ckpt_path",
    ),
}
HELP_WIDTH = 100


def settings_help() -> str:
    """Resolver ``${settings_help:}`` (``train.py --help``): every key the settings classes
    define, with its default and help, one block per key. ``$`` is doubled: Hydra renders its
    help page as a ``string.Template``."""
    rows = [(key, default, text) for key, (default, text) in RUN_KEYS.items()]
    for cls in SETTINGS_GROUPS:
        for f in dataclasses.fields(cls):
            default = f.default_factory() if callable(f.default_factory) else f.default
            rows.append((cls.config_key(f.name), default, f.metadata["help"]))
    lines = []
    for key, default, text in rows:
        shown = (
            "null"
            if default is None
            else str(default).lower()
            if default in (True, False)
            else default
        )
        lines.append(f"{key}={shown}")
        lines += textwrap.wrap(text, HELP_WIDTH, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(lines).replace("$", "$$")


def progress_refresh(log_every_n_steps: int, max_steps: int | None) -> int:
    """Resolver ``${progress_refresh:...}``: optimizer steps between progress-bar refreshes,
    ``log_every_n_steps`` but at most a tenth of a run of ``max_steps`` (at least 1), so that a
    short run's bar moves (a refresh reads the loss: a host sync on GPUs)."""
    every = max(1, int(log_every_n_steps))
    if max_steps is None or int(max_steps) <= 0:  # a run bounded by epochs
        return every
    return max(1, min(every, int(max_steps) // 10))


def register_resolvers() -> None:
    """``${path_safe:...}``, ``${unique_dir:...}``, ``${progress_refresh:...}``,
    ``${settings_help:}`` and the groups' base nodes; idempotent. ``train.py`` calls it before
    Hydra composes."""
    from hydra.core.config_store import ConfigStore

    unique_dir.register()
    if not OmegaConf.has_resolver("path_safe"):
        OmegaConf.register_new_resolver("path_safe", path_safe)
    if not OmegaConf.has_resolver("settings_help"):
        OmegaConf.register_new_resolver("settings_help", settings_help)
    if not OmegaConf.has_resolver("progress_refresh"):
        OmegaConf.register_new_resolver("progress_refresh", progress_refresh)
    store = ConfigStore.instance()
    for group, node in settings_nodes().items():
        store.store(group=group, name=SETTINGS_NODE, node=node)


CONDITION_GROUP = "condition"
DOMAINS_GROUP = "data/domains"  # the domain sets: conf/data/domains/<name>.yaml


DENSE_CONDITION = "dense"  # conf/condition/dense.yaml: model.moe=null


def _check_no_moe_overrides(args: Sequence[str], conditions: str) -> None:
    """Refuse a ``model.moe.<key>`` override beside ``condition=dense`` (alone or in a sweep):
    the dense twin has no MoE node for it, and Hydra would refuse the whole sweep with a
    traceback (``Key ... is not in struct``) suggesting a ``+`` that builds MoE layers."""
    for arg in args:
        key, sep, _ = arg.lstrip("+~").partition("=")
        if sep and key.startswith("model.moe."):
            moe_ones = [c for c in conditions.split(",") if c.strip() != DENSE_CONDITION]
            sweep = ",".join(moe_ones) if moe_ones else "top1,top2"
            raise UserError(
                f"condition={conditions} with {arg.lstrip('+~')}: condition=dense has no MoE "
                f"layers (model.moe=null), so an MoE setting cannot apply to it. Sweep the MoE "
                f"conditions with it (python train.py -m condition={sweep} "
                f"{arg.lstrip('+~')}) and run condition=dense on its own."
            )


def check_group_overrides(args: Sequence[str], directory: str | os.PathLike | None = None) -> None:
    """Refuse (one line), before Hydra composes, a ``condition`` override that is null or a list
    (a run has one condition) or that is ``dense`` beside a ``model.moe.<key>`` override, and a
    ``data/domains`` choice whose file is missing or not a domain set's YAML (a domain written
    twice): Hydra would fail with a traceback."""
    root = Path(directory or config_dir())
    options = sorted(p.stem for p in (root / CONDITION_GROUP).glob("*.yaml"))
    for arg in args:
        key, sep, value = arg.lstrip("+~").partition("=")
        if key == DOMAINS_GROUP and sep:
            sets = sorted(p.stem for p in (root / DOMAINS_GROUP).glob("*.yaml"))
            for name in (n.strip() for n in value.split(",")):  # a sweep: -m data/domains=a,b
                path = root / DOMAINS_GROUP / f"{name}.yaml"
                if not path.is_file():
                    raise UserError(
                        f"{DOMAINS_GROUP}={name}: there is no {path}; the domain sets are "
                        f"{', '.join(sets)} (or write {name}.yaml there)."
                    )
                try:
                    read_domain_set(path)
                except ValueError as exc:
                    raise UserError(f"{DOMAINS_GROUP}={name}: {exc}.") from None
        if key != CONDITION_GROUP or not sep:
            continue
        if DENSE_CONDITION in (v.strip() for v in value.split(",")):
            _check_no_moe_overrides(args, value)
        if value.strip() in ("", "null", "None") or value.strip().startswith("["):
            raise UserError(
                f"condition={value}: a run has one condition, one of {', '.join(options)}; "
                f"to run several, sweep them: python train.py -m condition={','.join(options[:2])}."
            )


def check_moe_node(cfg: DictConfig) -> None:
    """Refuse an MoE node that a condition or override wrote onto a dense model: where the
    model is dense (``model.moe: null``, e.g. ``experiment=dense_baseline``), a condition that
    sets ``model.moe.<key>`` (``condition=top2``, ``condition=frozen_router``) leaves a node
    holding only those keys, which would silently build the default MoE layers."""
    moe = cfg.model.get("moe") if cfg.get("model") is not None else None
    if moe is None:
        return
    missing = [name for name in MoESettings.names() if name not in moe]
    if missing:
        given = ", ".join(f"{MoESettings.config_key(k)}={moe[k]}" for k in moe)
        raise UserError(
            f"{given} was set on a dense model (model.moe=null: experiment=dense_baseline or "
            f"condition=dense), which has no MoE layers for it: an MoE condition needs an MoE "
            f"experiment (e.g. experiment=moe_main); with condition=dense, drop the model.moe "
            f"override (sweep it over the MoE conditions only)."
        )


def compose_config(
    overrides: Sequence[str] = (), directory: str | os.PathLike | None = None
) -> DictConfig:
    """Compose ``config.yaml`` with command-line style ``overrides`` (no Hydra app needed).

    ``${hydra:...}`` values (run dirs) are not available here; the data and model nodes use none.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    path = Path(directory) if directory is not None else config_dir()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(path.resolve()), version_base="1.3"):
        return compose(CONFIG_NAME, overrides=list(overrides))
