"""What a run's ``.hydra/`` files record, each read once, into one :class:`RunRecord`: its
composed config, its condition (its overrides without its seed, places and display settings) and its
seed.

A run folder (``outputs/runs/<date>/<time>``, or a sweep job's folder) holds ``.hydra/``
(``config.yaml``, ``overrides.yaml``, ``hydra.yaml``), written by Hydra at each start.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from moe_emergence.errors import UserError
from moe_emergence.settings import CONFIG_NAME, config_dir

HYDRA_CONFIG = Path(".hydra") / "config.yaml"
HYDRA_OVERRIDES = Path(".hydra") / "overrides.yaml"
HYDRA_SETTINGS = Path(".hydra") / "hydra.yaml"
RECORD_FILES = (HYDRA_CONFIG.name, HYDRA_OVERRIDES.name, HYDRA_SETTINGS.name)
EXCLUDE_KEYS = "hydra.job.config.override_dirname.exclude_keys"
# A run's condition is its overrides without its seed, without the keys its sweep folder names
# leave out (``hydra.job.config.override_dirname.exclude_keys`` in conf/config.yaml: places and
# display settings, never what is trained) and without these prefixes.
NOT_CONDITION_PREFIXES = ("paths.", "hydra.", "callbacks.progress_bar", "logger")


@dataclass
class RunRecord:
    """A run's ``.hydra/`` record, each file read once, on first use (so a damaged file is
    refused where its value is first needed): ``config``, the composed config (unresolved; None
    without ``.hydra/config.yaml``); ``overrides``, the condition's sorted ``key=value``
    overrides, and ``seed``, the ``seed=`` override (None when not overridden; both:
    :func:`run_overrides`). ``run_dir`` None (a lone checkpoint file): an empty record."""

    run_dir: Path | None = None

    @cached_property
    def config(self) -> DictConfig | None:
        return recorded_config(self.run_dir)

    @cached_property
    def _condition(self) -> tuple[list[str], int | None]:
        return run_overrides(self.run_dir)

    @property
    def overrides(self) -> list[str]:
        return self._condition[0]

    @property
    def seed(self) -> int | None:
        return self._condition[1]

    def select(self, key: str, default: Any = None) -> Any:
        """The recorded config's value at dotted ``key`` (unresolved), else ``default``."""
        if self.config is None:
            return default
        return OmegaConf.select(self.config, key, default=default)


def read_record(file: Path) -> Any:
    """A YAML file of a run's record as plain data, or a one-line UserError naming it when it
    is damaged."""
    try:
        return yaml.safe_load(file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(
            f"{file} is damaged ({reason}): restore it from a copy of the run, or move the "
            f"run's .hydra folder away to analyse its checkpoints without it."
        ) from None


def recorded_config(run_dir: Path | None) -> DictConfig | None:
    """The run's composed config (``.hydra/config.yaml``, unresolved), or None."""
    file = run_dir / HYDRA_CONFIG if run_dir is not None else None
    if file is None or not file.is_file():
        return None
    found = read_record(file)
    if not isinstance(found, dict):
        raise UserError(f"{file} is damaged (not a mapping): restore it from a copy of the run.")
    return OmegaConf.create(found)


def _not_condition_keys(run_dir: Path) -> set[str]:
    """The keys a sweep folder's name leaves out, as the run recorded them (and as
    conf/config.yaml says now, for runs recorded with fewer), plus ``seed``."""
    keys = {"seed"}
    files = [run_dir / HYDRA_SETTINGS]
    with contextlib.suppress(FileNotFoundError):  # installed without conf/: the record alone
        files.append(config_dir() / f"{CONFIG_NAME}.yaml")
    for file in files:
        if file.is_file():
            record = read_record(file)
            record = OmegaConf.create(record) if isinstance(record, dict) else None
            found = OmegaConf.select(record, EXCLUDE_KEYS, default=None) if record else None
            keys |= set(found or ())
    return keys


def split_override(item: str) -> tuple[str, str]:
    """``"+data.size_mb=5"`` -> ``("data.size_mb", "5")``: the key without Hydra's ``+``/``~``
    prefixes, and the value."""
    key, _, value = str(item).partition("=")
    return key.lstrip("+~"), value


def run_overrides(run_dir: Path | None) -> tuple[list[str], int | None]:
    """The run's condition overrides (sorted ``key=value``: see :data:`NOT_CONDITION_PREFIXES`)
    and its ``seed=`` override (None when not overridden); a one-line UserError naming the file
    when that seed is not an integer."""
    file = run_dir / HYDRA_OVERRIDES if run_dir is not None else None
    if file is None or not file.is_file():
        return [], None
    not_condition = _not_condition_keys(run_dir)
    kept, seed = [], None
    for item in read_record(file) or []:
        bare, value = split_override(item)
        if bare == "seed":
            try:
                seed = int(value)
            except ValueError:
                raise UserError(
                    f"{file} says seed={value!r}, not an integer: restore the run's record (the "
                    f"seed it trained with), or move its .hydra folder away to analyse its "
                    f"checkpoints without it."
                ) from None
        elif bare not in not_condition and not bare.startswith(NOT_CONDITION_PREFIXES):
            kept.append(str(item))
    return sorted(kept), seed
