"""Where the Hydra config tree lives, and composing it outside an app, with the resolvers that
need nothing of the package (``${path_safe:...}``, ``${unique_dir:...}``).

:mod:`moe_emergence.config` adds ``${vocab_size:...}``, which loads the data's tokenizer: that
module sits above the data package, this one below it (``MixedDomainDataModule.from_config``
composes through it and instantiates only the data node, which uses no ``vocab_size``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from moe_emergence import run_dir

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


def register_path_resolvers() -> None:
    """``${path_safe:...}`` and ``${unique_dir:...}`` (run folders); idempotent."""
    run_dir.register()
    if not OmegaConf.has_resolver("path_safe"):
        OmegaConf.register_new_resolver("path_safe", path_safe)


def compose(
    overrides: Sequence[str] = (), directory: str | os.PathLike | None = None
) -> DictConfig:
    """Compose ``config.yaml`` with command-line style ``overrides`` (no Hydra app needed),
    registering :func:`register_path_resolvers` first.

    ``${hydra:...}`` values (run dirs) are not available here; the data and model nodes use none.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_path_resolvers()
    path = Path(directory) if directory is not None else config_dir()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(path.resolve()), version_base="1.3"):
        return hydra_compose(CONFIG_NAME, overrides=list(overrides))
