"""Load every domain's texts and tokenize them into token streams (the expensive stage)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from moe_emergence.data.hub import resolve_repo
from moe_emergence.data.settings import DataSettings
from moe_emergence.data.sources import DEFAULT_SOURCES, load_domain
from moe_emergence.data.tokenize import TokenStream, encode_texts, load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class PreparedDomains:
    """Per domain (in DEFAULT_SOURCES order): its token stream and its loader metadata."""

    streams: dict[str, TokenStream]
    metadata: dict[str, dict[str, Any]]
    tokenizer_info: dict[str, Any]


def tokenizer_info(tokenizer, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def prepare_domains(settings: DataSettings, show_progress: bool = True) -> PreparedDomains:
    """Validate ``settings``, then stream and tokenize each domain."""
    settings.validate()
    # Every dataset's location is resolved before anything is streamed, so a missing mirror
    # folder or an unreachable Hub fails in seconds.
    for sources in DEFAULT_SOURCES.values():
        for source in sources:
            resolve_repo(source.dataset, settings.hub_mirror, kind="dataset")
    tokenizer = load_tokenizer(settings.tokenizer, settings.hub_mirror)
    streams: dict[str, TokenStream] = {}
    metadata: dict[str, dict[str, Any]] = {}
    for domain, sources in DEFAULT_SOURCES.items():
        texts, meta = load_domain(
            domain,
            sources,
            settings.size_mb,
            settings.max_example_chars,
            settings.hub_mirror,
            show_progress=show_progress,
        )
        streams[domain] = encode_texts(
            texts, tokenizer, show_progress=show_progress, desc=f"tokenize {domain}"
        )
        metadata[domain] = meta
    return PreparedDomains(streams, metadata, tokenizer_info(tokenizer, settings.tokenizer))
