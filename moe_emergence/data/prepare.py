"""Prepare: stream and tokenize every domain into the token cache once, then reuse it.

Order of work (offline first):

1. the request's identity, without network where possible: each local dataset folder's
   content (relative names, sizes, SHA-256s; unchanged files come from the per-file index),
   the sample texts' hash, the tokenizer's definition; a Hub id only online (its revision);
2. the cache lookup: the entry with exactly these inputs; offline, where a Hub dataset or
   tokenizer cannot be identified, the newest entry whose recorded inputs agree on everything
   else (said so);
3. only on a miss, streaming and tokenizing (which may need the Hub).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_emergence.data.cache import (
    DomainInput,
    TokenCache,
    as_json,
    cache_entries,
    cached_tokenizer_infos,
    check_cache_root,
    ensure_cache,
    fingerprint,
    open_entry,
    resolve_cache_dir,
    tokenizer_definition,
    tokenizer_identity,
)
from moe_emergence.data.damage import check_local_files
from moe_emergence.data.sample import (
    SAMPLE_TOKENIZER,
    domain_identity,
    load_sample_domain,
    load_sample_tokenizer,
)
from moe_emergence.data.settings import DataSettings, naming_options, option
from moe_emergence.data.sources import (
    Source,
    budget_chars,
    check_templates,
    load_domain,
)
from moe_emergence.data.tokenize import DEFAULT_TOKENIZER, TokenStream, load_tokenizer
from moe_emergence.files import FILE_INDEX, FileIndex, folder_identity
from moe_emergence.hub import HubUnavailableError, hub_revision, resolve_repo

log = logging.getLogger(__name__)

REBUILD_HINT = f"pass {option('rebuild_cache')} to rebuild it"
_REBUILT: set[Path] = set()  # cache folders rebuilt by rebuild_cache in this process


@dataclass
class PreparedDomains:
    """Per domain (in the domain set's order): its token stream (memory-mapped from the cache)
    and its loader metadata; plus the tokenizer's identity and where the cache lies."""

    streams: dict[str, TokenStream]
    metadata: dict[str, dict[str, Any]]
    tokenizer_info: dict[str, Any]
    cache_path: Path
    from_cache: bool


@dataclass
class CacheRequest:
    """What a run asks of the token cache.

    ``inputs`` is everything that makes the tokens (see :func:`cache_inputs`); where an offline
    run cannot identify a Hub dataset or tokenizer, that place holds None, ``unknown`` names
    it (``unknown_paths``: its key path in ``inputs``) and ``errors`` says why (the first is
    raised when no cache entry matches).
    """

    inputs: dict[str, Any]
    sources: dict[str, tuple[Source, ...]]
    tokenizer: Any | None
    tokenizer_info: dict[str, Any] | None
    unknown: list[str] = field(default_factory=list)
    unknown_paths: list[tuple[str | int, ...]] = field(default_factory=list)
    errors: list[Exception] = field(default_factory=list)
    # Offline, where the tokenizer cannot be loaded: the definitions cache manifests record for
    # its name (:func:`~moe_emergence.data.cache.cached_tokenizer_infos`); an entry matches by
    # its tokenizer's definition, whatever name or path built it.
    known_tokenizers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.unknown

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.inputs)


def cache_inputs(
    settings: DataSettings,
    sources: dict[str, list[dict[str, Any]]],
    tokenizer_info: dict[str, Any] | None,
) -> dict[str, Any]:
    """Everything that changes the tokens, and nothing applied after tokenization.

    ``sources``: per domain, each source's definition plus ``content`` (its data's identity);
    ``tokenizer_info``: :func:`tokenizer_identity` (its name is left out: only the definition
    decides the tokens). No path enters.
    """
    return {
        "source": settings.source,
        "budget_chars": budget_chars(settings.size_mb),
        "max_example_chars": settings.max_example_chars,
        "sources": sources,
        "tokenizer": tokenizer_definition(tokenizer_info) if tokenizer_info else None,
    }


def source_content(source: Source, settings: DataSettings, index: FileIndex) -> dict[str, Any]:
    """The identity of ``source``'s data: ``{"files": folder_identity}`` for a local folder
    (mirror, plain folder, or the Hugging Face cache's snapshot offline), else
    ``{"hub_revision": commit or None}`` (online). Offline with neither, HubUnavailableError."""
    location = resolve_repo(source.dataset, settings.hub_mirror, "dataset", source.revision)
    if Path(location).is_dir():
        return {"files": folder_identity(location, index)}
    return {"hub_revision": hub_revision(source.dataset, "dataset", source.revision)}


def _pinned(source: Source, content: dict[str, Any] | None) -> Source:
    """``source`` reading the Hub revision its identity names (unchanged for local data)."""
    revision = (content or {}).get("hub_revision")
    return dataclasses.replace(source, revision=revision) if revision else source


def load_data_tokenizer(
    name: str = DEFAULT_TOKENIZER,
    hub_mirror: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    rebuild: bool = False,
):
    """The tokenizer the ``tokenizer`` setting names: ``sample_bpe``, trained on the offline
    sample corpus and kept in ``cache_dir`` (``rebuild`` retrains it once per process), else a
    Hub name, mirror or folder (:func:`~moe_emergence.data.tokenize.load_tokenizer`). Its
    errors name the flag and config key (the config's resolver and the analysis load it)."""
    with naming_options():
        if name == SAMPLE_TOKENIZER:
            return load_sample_tokenizer(cache_dir, rebuild=rebuild)
        return load_tokenizer(name, hub_mirror)


def describe_request(settings: DataSettings) -> CacheRequest:
    """The request's identity (see the module docstring); offline Hub ids become unknowns."""
    sources: dict[str, tuple[Source, ...]] = dict(settings.domain_sources)
    entries: dict[str, list[dict[str, Any]]] = {}
    unknown: list[str] = []
    paths: list[tuple[str | int, ...]] = []
    errors: list[Exception] = []
    if settings.source == "sample":
        for domain, domain_sources in sources.items():
            ident = domain_identity(
                domain, settings.size_mb, settings.max_example_chars, sources=domain_sources
            )
            entries[domain] = [{"sample": ident}]
    else:
        index = FileIndex(resolve_cache_dir(settings.cache_dir) / FILE_INDEX)
        for domain, domain_sources in settings.domain_sources.items():
            entries[domain], pinned = [], []
            for i, source in enumerate(domain_sources):
                try:
                    content = source_content(source, settings, index)
                except HubUnavailableError as exc:
                    content = None
                    unknown.append(f"dataset '{source.dataset}'")
                    paths.append(("sources", domain, i, "content"))
                    errors.append(exc)
                entries[domain].append({**source.to_dict(), "content": content})
                pinned.append(_pinned(source, content))
            sources[domain] = tuple(pinned)
        index.save()
    tokenizer = info = None
    known: list[dict[str, Any]] = []
    try:
        tokenizer = load_data_tokenizer(
            settings.tokenizer, settings.hub_mirror, settings.cache_dir, settings.rebuild_cache
        )
        info = tokenizer_identity(tokenizer, settings.tokenizer)
    except HubUnavailableError as exc:
        unknown.append(f"tokenizer '{settings.tokenizer}'")
        errors.append(exc)
        infos = cached_tokenizer_infos(settings.cache_dir, settings.tokenizer)
        known = [as_json(tokenizer_definition(i)) for i in infos]
    inputs = cache_inputs(settings, entries, info)
    return CacheRequest(as_json(inputs), sources, tokenizer, info, unknown, paths, errors, known)


def matches(request: CacheRequest, settings: DataSettings, manifest: Any) -> bool:
    """Whether ``manifest`` records ``request``'s inputs, with its unknown places as wildcards
    (an unknown tokenizer must have a definition recorded for its name: ``known_tokenizers``)."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("inputs"), dict):
        return False
    recorded = copy.deepcopy(manifest["inputs"])
    try:
        for path in request.unknown_paths:
            target = recorded
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = None
        if request.tokenizer_info is None:
            definition = as_json(tokenizer_definition(manifest.get("tokenizer") or {}))
            if definition not in request.known_tokenizers:
                return False
            recorded["tokenizer"] = None
    except (KeyError, IndexError, TypeError, AttributeError):
        return False
    return recorded == request.inputs


def find_offline_entry(
    request: CacheRequest, settings: DataSettings, prefer: Callable[[Any], bool] | None = None
) -> TokenCache | None:
    """The newest sound cache entry (checked as a hit is) matching the partly unknown
    ``request`` (logged with what could not be checked and how many entries matched), or
    None. ``prefer(manifest)``: entries it accepts go first (a run's own data, by its data
    fingerprint, before newer builds of other data)."""
    found = [(p, m) for p, m in cache_entries(settings.cache_dir) if matches(request, settings, m)]
    if prefer is not None:
        found.sort(key=lambda item: not prefer(item[1]))  # stable: newest first within each
    for n, (path, _) in enumerate(found):
        cache = open_entry(path, verify_files=settings.verify_cache)
        if cache is None:
            continue
        newest = "" if len(found) - n == 1 else f", the newest of {len(found) - n} that match"
        if prefer is not None and len(found) > 1 and prefer(cache.manifest):
            newest = f", the one of {len(found)} that match holding the expected data"
        log.info(
            "Offline: %s cannot be checked; using token cache %s (built %s%s) whose other "
            "inputs equal this run's.",
            ", ".join(request.unknown),
            path,
            cache.manifest["created_at"],
            newest,
        )
        return cache
    return None


def prepare_domains(
    settings: DataSettings,
    show_progress: bool = True,
    announce_hit: bool = True,
    prefer: Callable[[Any], bool] | None = None,
) -> PreparedDomains:
    """Open the token cache of ``settings`` (validated: ``DataSettings.validate``, which the CLI
    and the datamodule run), streaming and tokenizing only on a miss.

    The cache is looked up before anything needs the network (module docstring). A missing
    mirror folder fails at once; offline with no matching entry, the first dataset or
    tokenizer that cannot be loaded raises HubUnavailableError (one line). ``announce_hit=False``
    keeps a cache hit quiet (setup after prepare_data has already said so). ``rebuild_cache``
    rebuilds once per process (prepare_data and setup share it). A hit checks the manifest and
    the files' sizes; ``verify_cache`` also checks every file's SHA-256 (on every call).
    ``prefer``: offline, which of several matching entries go first (:func:`find_offline_entry`).
    """
    check_cache_root(settings.cache_dir)
    request = describe_request(settings)
    if not request.complete:
        cache = None if settings.rebuild_cache else find_offline_entry(request, settings, prefer)
        if cache is None:
            raise request.errors[0]
        info = cache.manifest["tokenizer"]
    else:
        cache = _ensure(request, settings, show_progress)
        info = request.tokenizer_info or {}
        if cache.built_now:
            log.info("Token cache written to %s", cache.path)
        elif announce_hit:
            checked = (
                "every file's SHA-256 verified"
                if settings.verify_cache
                else f"file sizes checked; {option('verify_cache')} checks SHA-256s"
            )
            log.info(
                "Found token cache %s (built %s; %s): skipping streaming and tokenizing; %s.",
                cache.path,
                cache.manifest["created_at"],
                checked,
                REBUILD_HINT,
            )
    order = list(settings.domain_sources)  # the set's order, whichever order built the cache
    streams, metadata = cache.streams(), cache.metadata
    return PreparedDomains(
        streams={d: streams[d] for d in order},
        metadata={d: metadata[d] for d in order},
        tokenizer_info=info,
        cache_path=cache.path,
        from_cache=not cache.built_now,
    )


def _ensure(request: CacheRequest, settings: DataSettings, show_progress: bool) -> TokenCache:
    """Open or build the cache entry of the complete ``request``."""
    path = resolve_cache_dir(settings.cache_dir) / request.fingerprint
    rebuild = settings.rebuild_cache and path not in _REBUILT

    def load_all() -> Iterator[DomainInput]:
        if settings.source != "sample":  # a damaged file or a template naming a field the
            all_sources = [s for sources in request.sources.values() for s in sources]
            check_local_files(all_sources, settings.hub_mirror)  # data lacks: before streaming
            check_templates(request.sources, settings.hub_mirror)
        for domain, sources in request.sources.items():
            if settings.source == "sample":
                texts, meta = load_sample_domain(
                    domain,
                    settings.size_mb,
                    settings.max_example_chars,
                    show_progress=show_progress,
                    sources=sources,
                )
            else:
                texts, meta = load_domain(
                    domain,
                    sources,
                    settings.size_mb,
                    settings.max_example_chars,
                    settings.hub_mirror,
                    show_progress=show_progress,
                    check_files=False,
                )
            yield DomainInput(domain, texts, meta)

    cache = ensure_cache(
        settings.cache_dir,
        request.inputs,
        load_all,
        request.tokenizer,
        rebuild=rebuild,
        show_progress=show_progress,
        tokenizer_info=request.tokenizer_info,
        verify_files=settings.verify_cache,
    )
    if rebuild:
        _REBUILT.add(path)
    return cache


__all__ = [
    "CacheRequest",
    "PreparedDomains",
    "cache_inputs",
    "describe_request",
    "fingerprint",
    "load_data_tokenizer",
    "prepare_domains",
]
