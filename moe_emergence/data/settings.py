"""The data pipeline's settings, checked before anything is loaded."""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_emergence.data.sources import (
    DEFAULT_SOURCES,
    MAX_EXAMPLE_CHARS,
    check_filters,
    check_size_mb,
)
from moe_emergence.data.tokenize import DEFAULT_TOKENIZER
from moe_emergence.errors import UserError
from moe_emergence.hub import default_mirror

SOURCES = ("hub", "sample")


@dataclass
class DataSettings:
    """What to load and how to pack it.

    size_mb: per-domain budget in MiB of characters (size_mb * 1024 * 1024 chars).
    block_size: tokens per block. max_example_chars: texts must be shorter than this.
    hub_mirror: folder holding Hub repos as <mirror>/<org>/<name> (default $MOE_HUB_MIRROR).
    cache_dir: token cache root (None: $MOE_CACHE_DIR, else .cache/moe_emergence in the cwd).
    rebuild_cache: tokenize again even when the cache holds these settings' tokens.
    verify_cache: on a cache hit, check every file's SHA-256 too (default: the manifest and the
    files' sizes only); a mismatch is damage: warned about and rebuilt.
    source: "hub" (the datasets, through hub_mirror if set) or "sample" (the offline corpus).
    """

    size_mb: float = 10.0
    block_size: int = 512
    balance_tokens: bool = False
    seed: int = 42
    max_example_chars: int = MAX_EXAMPLE_CHARS
    tokenizer: str = DEFAULT_TOKENIZER
    hub_mirror: str | None = dataclasses.field(default_factory=default_mirror)
    cache_dir: str | None = None
    rebuild_cache: bool = False
    verify_cache: bool = False
    source: str = "hub"

    def validate(self) -> DataSettings:
        """Raise UserError naming the flag / config key and the fix for the first bad value."""
        try:
            check_size_mb(self.size_mb)
        except ValueError as exc:
            raise UserError(f"{option('size_mb')}: {exc}") from None
        if not is_int(self.block_size) or self.block_size < 2:
            raise UserError(
                f"{option('block_size')} must be an integer ≥ 2, got {self.block_size!r}."
            )
        if not is_int(self.max_example_chars):
            raise UserError(
                f"{option('max_example_chars')} must be an integer, got {self.max_example_chars!r}."
            )
        for domain, sources in DEFAULT_SOURCES.items():
            try:
                check_filters(sources, self.max_example_chars, domain)
            except ValueError as exc:
                raise UserError(f"{option('max_example_chars')}: {exc}") from None
        for key in ("balance_tokens", "rebuild_cache", "verify_cache"):
            value = getattr(self, key)
            if not isinstance(value, bool):
                raise UserError(f"{option(key)} must be true or false, got {value!r}.")
        if not is_int(self.seed) or self.seed < 0:
            raise UserError(f"{option('seed')} must be an integer ≥ 0, got {self.seed!r}.")
        if self.source not in SOURCES:
            raise UserError(
                f"{option('source')} must be one of {list(SOURCES)} (data/source=...), "
                f"got {self.source!r}."
            )
        for key in ("tokenizer", "hub_mirror", "cache_dir"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str | Path):
                raise UserError(f"{option(key)} must be a string, got {value!r}.")
        if self.hub_mirror is not None and not Path(self.hub_mirror).is_dir():
            raise UserError(
                f"{option('hub_mirror')} '{self.hub_mirror}' is not a folder: pass a folder "
                f"that holds <org>/<name> copies of the Hub repos, or leave it unset (null) to "
                f"use the Hub."
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def is_int(value: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def option(key: str) -> str:
    """The CLI flag and config key that set ``key``: ``--size-mb (data.size_mb)``."""
    return f"--{key.replace('_', '-')} (data.{key})"
