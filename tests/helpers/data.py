"""Small data settings over a fixture mirror, and preparing them."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from moe_emergence.data.prepare import PreparedDomains, prepare_domains
from moe_emergence.data.settings import DataSettings


def tiny_settings(mirror: Path, tokenizer: Path, cache_dir: Path) -> DataSettings:
    """1 MB per domain (all a fixture mirror has), 32-token blocks, a private cache."""
    return DataSettings(
        size_mb=1.0,
        block_size=32,
        tokenizer=str(tokenizer),
        hub_mirror=str(mirror),
        cache_dir=str(cache_dir),
    )


def tiny_datamodule_kwargs(
    mirror: Path, tokenizer: Path, cache_dir: Path, block_size: int, **extra: Any
) -> dict[str, Any]:
    """``MixedDomainDataModule`` keyword arguments: 1 MB per domain (all a fixture mirror has),
    ``block_size``-token blocks, a private cache, no progress bars; ``extra`` on top."""
    return dict(
        size_mb=1.0,
        block_size=block_size,
        tokenizer=str(tokenizer),
        hub_mirror=str(mirror),
        cache_dir=str(cache_dir),
        show_progress=False,
        **extra,
    )


def prep(settings: DataSettings, **changes) -> PreparedDomains:
    """``prepare_domains`` of ``settings`` with ``changes`` applied, quietly."""
    return prepare_domains(dataclasses.replace(settings, **changes), show_progress=False)
