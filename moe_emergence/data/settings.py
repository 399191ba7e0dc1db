"""The data settings, written once: each field's default, type, help text and check.

:class:`DataSettings` decides the data (what is read, tokenized and packed); every field is also
a flag of the data CLI (``--size-mb``, built from the field in ``cli.py``). :class:`LoaderSettings`
decides how the datamodule serves it (config keys only). Both are ``data.*`` keys of the Hydra
config, passed flat to the datamodule (:func:`split_fields`).

Values are checked once, where they enter (the CLI, the datamodule): :meth:`DataSettings.validate`.
Leaf modules raise plain messages about values; a :class:`~moe_emergence.data.checks.SettingError`
says which field it is about, and the entry point names the flag and key
(:func:`naming_options`, through :func:`option`, the one place that spells them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from moe_emergence.data.checks import SettingError
from moe_emergence.data.domains import (
    DomainSet,
    parse_domains,
    plain_containers,
    set_file_settings,
)
from moe_emergence.data.sources import MAX_EXAMPLE_CHARS, check_filters, check_size_mb
from moe_emergence.data.tokenize import DEFAULT_TOKENIZER
from moe_emergence.errors import UserError
from moe_emergence.settings import KINDS, Kind, Settings, kind, setting

DomainSpec = str | Mapping[str, Any]  # the ``domain_set`` setting (see ``data/domains.py``)

__all__ = ["DataSettings", "LoaderSettings", "kind", "naming_options", "option"]


class DataGroup(Settings):
    """A ``data.*`` group: a field of :class:`DataSettings` is also a flag of the data CLI."""

    PREFIX: ClassVar[str] = "data"
    KINDS: ClassVar[Mapping[str, Kind]] = {
        **KINDS,
        # A domain set: its name, a YAML file, or the mapping Hydra composed.
        "DomainSpec": (
            lambda v: isinstance(v, str | os.PathLike | Mapping),
            "a domain set's name, a YAML file, or a mapping of each domain to its sources",
            str,
        ),
    }

    @classmethod
    def option(cls, name: str, value: str | None = None) -> str:
        """How the user sets ``name``: ``--size-mb (data.size_mb)``, or ``data.batch_size`` for
        a setting without a CLI flag; with ``value`` (a switch's "true"), ``--balance-tokens
        (data.balance_tokens=true)``. The one place that spells data flags and keys."""
        key = super().option(name, value)
        if name in DataSettings.names():
            return f"{cli_flag(name)} ({key})"
        return key


def cli_flag(name: str) -> str:
    """The data CLI's flag of the :class:`DataSettings` field ``name``: ``--size-mb``."""
    return "--" + name.replace("_", "-")


def config_key(name: str) -> str:
    """The Hydra key of the data setting ``name``: ``data.size_mb``."""
    return DataGroup.config_key(name)


def option(name: str, value: str | None = None) -> str:
    """See :meth:`DataGroup.option`."""
    return DataGroup.option(name, value)


@contextlib.contextmanager
def naming_options() -> Iterator[None]:
    """Re-raise a :class:`SettingError` with its flag and config key named (the entry points:
    the CLI, the datamodule, the tokenizer the config names)."""
    try:
        yield
    except SettingError as exc:
        if exc.field is not None:  # once: an inner entry point may have named it
            exc.args = (f"{option(exc.field)}: {exc.args[0]}", *exc.args[1:])
            exc.field = None
        raise


def _check_block_size(block_size: int) -> None:
    if block_size >= 2**62:  # numpy's int64 block offsets overflow
        raise ValueError(f"{block_size} tokens per block overflow the packing's int64 offsets")


def _check_folder(path: str) -> None:
    if not Path(path).is_dir():
        raise ValueError(
            f"'{path}' is not a folder: pass a folder that holds <org>/<name> copies of the Hub "
            f"repos, or leave it unset (null) to use the Hub."
        )


@dataclass
class DataSettings(DataGroup):
    """What to load and how to pack it (each field's help says what it does)."""

    size_mb: float = setting(
        10.0,
        check=check_size_mb,
        help="budget per domain in MiB of characters (size_mb * 1024 * 1024 chars)",
    )
    block_size: int = setting(512, low=2, check=_check_block_size, help="tokens per block")
    balance_tokens: bool = setting(
        False, help="keep the smallest domain's block count for every domain"
    )
    seed: int = setting(42, low=0, below=2**32, help="seed for balancing and shuffling")
    max_example_chars: int = setting(
        MAX_EXAMPLE_CHARS, help="keep texts shorter than this many characters"
    )
    tokenizer: str = setting(
        DEFAULT_TOKENIZER, untrained=True, help="tokenizer Hub name or folder, or sample_bpe"
    )
    hub_mirror: str | None = setting(
        None,
        check=_check_folder,
        untrained=True,
        help="folder holding Hub repos as <mirror>/<org>/<name> "
        "(null: $MOE_HUB_MIRROR, else the Hub)",
    )
    cache_dir: str | None = setting(
        None,
        untrained=True,
        help="token cache root (default: $MOE_CACHE_DIR, else .cache/moe_emergence)",
    )
    rebuild_cache: bool = setting(False, untrained=True, help="tokenize again even on a cache hit")
    verify_cache: bool = setting(
        False,
        untrained=True,
        help="on a cache hit, check every file's SHA-256 too (default: sizes only); "
        "a mismatch is rebuilt",
    )
    source: str = setting(
        "hub",
        choices=("hub", "sample"),
        help="hub: the datasets (through the hub mirror if set); sample: the offline corpus "
        "(pair it with the sample_bpe tokenizer)",
    )
    domain_set: DomainSpec | None = setting(
        None,
        help="the domain set: a name in conf/data/domains (code_math_prose, sample, ...), a "
        "YAML file, or the mapping domain -> sources (null: the source's default set)",
    )

    def __post_init__(self) -> None:
        if isinstance(self.domain_set, Mapping):  # Hydra's DictConfig -> plain containers
            self.domain_set = plain_containers(self.domain_set)

    def validate(self) -> DataSettings:
        """Each field's own check, then the domain set (see :mod:`moe_emergence.data.domains`)
        and the length filter of each of its sources."""
        super().validate()
        self._check_set_file_settings()
        for domain, sources in self.domain_sources.items():
            with naming_options():
                check_filters(sources, self.max_example_chars, domain)
        return self

    def _check_set_file_settings(self) -> None:
        """A set named by name or file (outside Hydra's ``data/domains=<name>``, which merges
        the whole file into ``data``): the file's other keys (``source: sample``, ``tokenizer:
        sample_bpe``) must match these settings; one line naming the flags to add, if not."""
        if not isinstance(self.domain_set, str | os.PathLike):
            return
        path, others = set_file_settings(self.domain_set)
        fields = {f.name for f in dataclasses.fields(self)}
        differ = {k: v for k, v in others.items() if k not in fields or getattr(self, k) != v}
        if not differ:
            return
        unknown = [k for k in differ if k not in fields]
        name = f"{option('domain_set')} {self.domain_set}"
        if unknown:
            raise UserError(
                f"{name}: its file {path} also sets {', '.join(unknown)}, which only train.py "
                f"applies: there, pick the set with data/domains={Path(self.domain_set).stem}."
            )
        flags = " ".join(f"{cli_flag(k)} {v}" for k, v in differ.items())
        keys = " ".join(f"{config_key(k)}={v}" for k, v in differ.items())
        now = ", ".join(f"{k}={getattr(self, k)}" for k in differ)
        raise UserError(
            f"{name}: its file {path} also sets "
            f"{', '.join(f'{k}={v}' for k, v in differ.items())} (here {now}), which naming "
            f"the set does not change: pass {flags} too (config: {keys}; in train.py "
            f"data/domains={Path(self.domain_set).stem} sets them)."
        )

    @property
    def domain_sources(self) -> DomainSet:
        """``{domain: (Source, ...)}`` in order: the checked domain set (a bad one is a
        UserError naming ``data.domain_set`` and the sub-key)."""
        key = (id(self.domain_set), self.source)
        cached = self.__dict__.get("_domain_sources")
        if cached is None or cached[0] != key:
            try:
                found = parse_domains(self.domain_set, self.source)
            except ValueError as exc:
                raise UserError(f"{option('domain_set')}: {str(exc).rstrip('.')}.") from None
            cached = self.__dict__["_domain_sources"] = (key, found)
        return cached[1]


@dataclass
class LoaderSettings(DataGroup):
    """How the datamodule serves the blocks and which texts it holds out (config keys only)."""

    # Which texts are held out: the fields marked held_out=True, in field order.
    EVAL_KEYS: ClassVar[tuple[str, ...]]

    batch_size: int = setting(8, low=1, help="blocks per device (per DDP rank)")
    num_workers: int = setting(0, low=0, untrained=True, help="DataLoader worker processes")
    pin_memory: bool | None = setting(None, untrained=True, help="null: on when CUDA is available")
    persistent_workers: bool | None = setting(
        None, untrained=True, help="null: on when num_workers > 0"
    )
    eval_fraction: float = setting(
        0.0,
        low=0,
        below=1,
        held_out=True,
        help="share of each domain's texts held out for validation",
    )
    eval_seed: int = setting(
        0, low=0, held_out=True, help="which texts are held out (fixed across seeds)"
    )
    eval_min_texts: int | None = setting(
        20,
        low=0,
        held_out=True,
        help="hold out at least this many texts per domain (at most half of a domain's texts; "
        "the routing nulls and probe intervals resample documents); null: no floor and the data "
        "fingerprint of the code before it, what runs made before it get (ADDED_LATER)",
    )
    report_dir: str | None = setting(
        None,
        untrained=True,
        help="where data_report.json goes (null: the trainer's default_root_dir)",
    )
    show_progress: bool = setting(
        True, untrained=True, help="progress bars while streaming and tokenizing"
    )


LoaderSettings.EVAL_KEYS = LoaderSettings.flagged("held_out")


@dataclass(frozen=True)
class AddedSetting:
    """A data setting added after runs were made with the code before it: ``old`` is the
    value that reproduces such a run (its recorded settings lack the key), ``added`` the commit
    and date that added it, ``before`` what the code did before it."""

    name: str
    old: Any
    added: str
    before: str

    def describe(self) -> str:
        """``data.eval_min_texts=null (added in 632c0ac, 2026-12-03; before it: ...)``."""
        old = "null" if self.old is None else self.old
        return f"{config_key(self.name)}={old} (added in {self.added}; before it: {self.before})"


# Every data setting added after the first runs, oldest first. A run whose recorded settings lack
# one was made before it: it is rebuilt (analyze, inspect) with ``old``, not today's default.
ADDED_LATER: tuple[AddedSetting, ...] = (
    AddedSetting("verify_cache", False, "63ba4b2, 2026-11-26", "a cache hit checked sizes only"),
    AddedSetting(
        "eval_min_texts",
        None,
        "632c0ac, 2026-12-03",
        "no floor: round(eval_fraction * texts) held out, at least 1, and a data fingerprint "
        "without it",
    ),
    AddedSetting("domain_set", None, "596b318, 2026-12-03", "the source's default set"),
)


def as_made(recorded: Mapping[str, Any]) -> tuple[dict[str, Any], list[AddedSetting]]:
    """A run's recorded flat data settings with each setting added after the run (absent from
    the record: :data:`ADDED_LATER`) set to the value that reproduces it, and those settings.
    An empty record stays empty (nothing to rebuild from)."""
    if not recorded:
        return {}, []
    added = [a for a in ADDED_LATER if a.name not in recorded]
    return {**recorded, **{a.name: a.old for a in added}}, added


def split_fields(fields: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Flat ``data.*`` keys -> (DataSettings fields, LoaderSettings fields); an unknown key is a
    one-line UserError listing the valid ones."""
    data = {f.name for f in dataclasses.fields(DataSettings)}
    loader = {f.name for f in dataclasses.fields(LoaderSettings)}
    unknown = [key for key in fields if key not in data | loader]
    if unknown:
        valid = ", ".join(
            f.name for c in (DataSettings, LoaderSettings) for f in dataclasses.fields(c)
        )
        raise UserError(
            f"Unknown data setting(s) {', '.join(map(config_key, unknown))}: the data keys are "
            f"{valid}."
        )
    return (
        {k: v for k, v in fields.items() if k in data},
        {k: v for k, v in fields.items() if k in loader},
    )
