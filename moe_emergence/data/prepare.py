"""Prepare: stream and tokenize every domain into the token cache once, then reuse it."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_emergence.data.cache import (
    REBUILD_HINT,
    DomainInput,
    ensure_cache,
    fingerprint,
    tokenizer_identity,
)
from moe_emergence.data.hub import resolve_repo
from moe_emergence.data.settings import DataSettings
from moe_emergence.data.sources import DEFAULT_SOURCES, budget_chars, load_domain
from moe_emergence.data.tokenize import TokenStream, load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class PreparedDomains:
    """Per domain (in DEFAULT_SOURCES order): its token stream (memory-mapped from the cache)
    and its loader metadata; plus the tokenizer's identity and where the cache lies."""

    streams: dict[str, TokenStream]
    metadata: dict[str, dict[str, Any]]
    tokenizer_info: dict[str, Any]
    cache_path: Path
    from_cache: bool


def source_entries(settings: DataSettings) -> dict[str, list[dict[str, Any]]]:
    """Every domain's sources with their resolved location: the absolute mirror folder or
    ``hub:<id>``, so that a mirror and the Hub never share a cache entry. Resolving checks
    that each one is reachable (mirror folder present, or Hub online)."""
    if settings.source == "sample":
        from moe_emergence.data.sample import sample_identity

        return {domain: [{"sample": sample_identity()}] for domain in DEFAULT_SOURCES}
    entries: dict[str, list[dict[str, Any]]] = {}
    for domain, domain_sources in DEFAULT_SOURCES.items():
        entries[domain] = []
        for source in domain_sources:
            location = resolve_repo(source.dataset, settings.hub_mirror, kind="dataset")
            origin = str(Path(location).resolve()) if location != source.dataset else None
            entries[domain].append({**source.to_dict(), "location": origin or f"hub:{location}"})
    return entries


def cache_inputs(
    settings: DataSettings, sources: dict[str, Any], tokenizer_info: dict[str, Any]
) -> dict[str, Any]:
    """Everything that changes the tokens, and nothing applied after tokenization."""
    return {
        "source": settings.source,
        "budget_chars": budget_chars(settings.size_mb),
        "max_example_chars": settings.max_example_chars,
        "sources": sources,
        "tokenizer": tokenizer_info,
    }


def prepare_domains(
    settings: DataSettings, show_progress: bool = True, announce_hit: bool = True
) -> PreparedDomains:
    """Validate ``settings``; open the token cache, streaming and tokenizing only on a miss.

    Every dataset's location is resolved first, so a missing mirror folder or an unreachable
    Hub fails in seconds, before anything is streamed. ``announce_hit=False`` keeps a cache hit
    quiet (setup after prepare_data has already said so).
    """
    settings.validate()
    sources = source_entries(settings)
    tokenizer = load_tokenizer(settings.tokenizer, settings.hub_mirror, settings.cache_dir)
    info = tokenizer_identity(tokenizer, settings.tokenizer)
    inputs = cache_inputs(settings, sources, info)

    def load_all() -> Iterator[DomainInput]:
        for domain, sources in DEFAULT_SOURCES.items():
            if settings.source == "sample":
                from moe_emergence.data.sample import load_sample_domain

                texts, meta = load_sample_domain(
                    domain, settings.size_mb, settings.max_example_chars,
                    show_progress=show_progress,
                )  # fmt: skip
                yield DomainInput(domain, texts, meta)
                continue
            texts, meta = load_domain(
                domain,
                sources,
                settings.size_mb,
                settings.max_example_chars,
                settings.hub_mirror,
                show_progress=show_progress,
            )
            yield DomainInput(domain, texts, meta)

    cache = ensure_cache(
        settings.cache_dir,
        inputs,
        load_all,
        tokenizer,
        rebuild=settings.rebuild_cache,
        show_progress=show_progress,
    )
    if cache.built_now:
        log.info("Token cache written to %s", cache.path)
    elif announce_hit:
        log.info(
            "Found token cache %s (built %s): skipping streaming and tokenizing; %s.",
            cache.path, cache.manifest["created_at"], REBUILD_HINT,
        )  # fmt: skip
    return PreparedDomains(
        streams=cache.streams(),
        metadata=cache.metadata,
        tokenizer_info=info,
        cache_path=cache.path,
        from_cache=not cache.built_now,
    )


__all__ = ["PreparedDomains", "cache_inputs", "fingerprint", "prepare_domains", "source_entries"]
