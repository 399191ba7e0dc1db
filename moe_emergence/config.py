"""The Hydra config tree with all its resolvers: :mod:`moe_emergence.compose` (where the tree
lives, ``${path_safe:...}``, ``${unique_dir:...}``) plus ``${vocab_size:...}``, the number of ids
of the data's tokenizer. Loading that tokenizer takes the data package, so this module sits
above it; the data package composes through :mod:`moe_emergence.compose`."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

from moe_emergence.compose import (
    CONFIG_ENV,
    CONFIG_NAME,
    MAX_DIR_NAME,
    compose,
    config_dir,
    path_safe,
    register_path_resolvers,
)
from moe_emergence.data.cache import cached_tokenizer_infos
from moe_emergence.data.prepare import load_data_tokenizer
from moe_emergence.hub import HubUnavailableError, default_mirror

log = logging.getLogger(__name__)


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
    mirror = hub_mirror if hub_mirror is not None else default_mirror()
    try:
        return len(load_data_tokenizer(name, mirror, cache_dir))
    except HubUnavailableError:
        sizes = {info["vocab_size"] for info in cached_tokenizer_infos(cache_dir, name)}
        if len(sizes) != 1:
            raise
        size = sizes.pop()
        log.info("Offline: tokenizer '%s' has %d ids, as the token cache records.", name, size)
        return size


def register_resolvers() -> None:
    """``${vocab_size:...}``, ``${path_safe:...}`` and ``${unique_dir:...}`` (run folders)."""
    register_path_resolvers()
    if not OmegaConf.has_resolver("vocab_size"):
        OmegaConf.register_new_resolver("vocab_size", tokenizer_vocab_size)


def compose_config(
    overrides: Sequence[str] = (), directory: str | os.PathLike | None = None
) -> DictConfig:
    """Compose ``config.yaml`` with command-line style ``overrides`` (no Hydra app needed) and
    every resolver registered.

    ``${hydra:...}`` values (run dirs) are not available here; the data and model nodes use none.
    """
    register_resolvers()
    return compose(overrides, directory)


__all__ = [
    "CONFIG_ENV",
    "CONFIG_NAME",
    "MAX_DIR_NAME",
    "compose_config",
    "config_dir",
    "path_safe",
    "register_resolvers",
    "tokenizer_vocab_size",
]
