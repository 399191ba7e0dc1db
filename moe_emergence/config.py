"""The Hydra config tree: where it lives, its resolvers, and composing it outside an app."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

CONFIG_ENV = "MOE_CONFIG_DIR"
CONFIG_NAME = "config"


def config_dir() -> Path:
    """``$MOE_CONFIG_DIR``, else the repo's ``conf/`` (beside the package)."""
    found = os.environ.get(CONFIG_ENV)
    path = Path(found) if found else Path(__file__).resolve().parents[1] / "conf"
    if not (path / f"{CONFIG_NAME}.yaml").is_file():
        raise FileNotFoundError(
            f"No {CONFIG_NAME}.yaml in '{path}'. Run from a clone of the repo (pip install -e .) "
            f"or set {CONFIG_ENV} to its conf/ folder."
        )
    return path


@functools.lru_cache(maxsize=8)
def tokenizer_vocab_size(
    name: str, hub_mirror: str | None = None, cache_dir: str | None = None
) -> int:
    """Resolver ``${vocab_size:${data.tokenizer},${data.hub_mirror},${data.cache_dir}}``:
    the number of ids of the tokenizer the data is made with.

    Offline, when the tokenizer cannot be loaded (a Hub name, no mirror, not in the Hugging
    Face cache), the size recorded under that name by the token cache's manifests, when they
    agree; else the loading error.
    """
    from moe_emergence.data.cache import cached_tokenizer_infos
    from moe_emergence.data.hub import HubUnavailableError, default_mirror
    from moe_emergence.data.tokenize import load_tokenizer

    mirror = hub_mirror if hub_mirror is not None else default_mirror()
    try:
        return len(load_tokenizer(name, mirror, cache_dir))
    except HubUnavailableError:
        sizes = {info["vocab_size"] for info in cached_tokenizer_infos(cache_dir, name)}
        if len(sizes) != 1:
            raise
        size = sizes.pop()
        log.info("Offline: tokenizer '%s' has %d ids, as the token cache records.", name, size)
        return size


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


def register_resolvers() -> None:
    """``${vocab_size:...}``, ``${path_safe:...}`` and ``${unique_dir:...}`` (run folders)."""
    from moe_emergence import run_dir

    run_dir.register()
    if not OmegaConf.has_resolver("vocab_size"):
        OmegaConf.register_new_resolver("vocab_size", tokenizer_vocab_size)
    if not OmegaConf.has_resolver("path_safe"):
        OmegaConf.register_new_resolver("path_safe", path_safe)


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
