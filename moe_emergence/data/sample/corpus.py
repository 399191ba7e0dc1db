"""The offline ``sample`` source: a corpus with no download.

The ``sample`` domain set reads code and prose from the frozen snapshot shipped in the package
(:mod:`moe_emergence.data.sample.frozen`: the same texts everywhere) and generates math. The live
readers below, which read this machine's stdlib and installed packages, are what the snapshot
was built from (``python -m moe_emergence.data.sample.freeze``; :func:`live_sources`).

Same contract as :func:`moe_emergence.data.sources.load_domain`: ``(texts, metadata)``, the
same budget rule (a text is taken while the running total is below ``size_mb * 1024 * 1024``
characters; the one that crosses is kept) and the same metadata keys, plus
``"source": "sample"``. Per domain:

- code: the standard library's ``*.py`` files as they are (UTF-8), walked depth-first in sorted
  name order (i.e. sorted by path components), skipping ``site-packages``, ``dist-packages``,
  ``__pycache__`` and unreadable or non-UTF-8 files; ``100 < len < max_example_chars``.
- math: problems from :mod:`moe_emergence.data.sample.mathgen`, GSM8K-style and MATH-style
  alternating, deterministic by ``seed``; never exhausted.
- prose: paragraphs (cleaned by :mod:`moe_emergence.data.sample.prose`) of Python's
  documentation topics (``pydoc_data.topics``, topics in sorted order), then of the long
  descriptions of installed distributions (sorted by normalized name; this project's own is
  left out: it changes without a version bump). Code is removed
  (fenced and indented blocks, reST ``::`` literal blocks and directives, doctest blocks),
  as are headings, tables, HTML, badges, link-reference lines and paragraphs that do not read
  as prose. Each paragraph is re-flowed onto one line (words joined by single spaces, like
  WikiText-103's lines); a document's consecutive paragraphs are joined by ``\\n`` into texts
  shorter than ``max_example_chars`` (so short paragraphs are not lost), kept when
  ``200 < len < max_example_chars``.

A *row* (``num_rows_read``) is a file (code), a generated problem (math) or a document: a
pydoc topic or a distribution's description (prose; one document gives several paragraphs).
:func:`sample_identity` hashes the texts a budget chooses, for the token cache.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_emergence.data.checks import SettingError, is_int
from moe_emergence.data.domains import SAMPLE_SET, domain_set
from moe_emergence.data.sample.frozen import MAX_CHARS, frozen_file, frozen_rows, manifest
from moe_emergence.data.sample.mathgen import format_math, generate_math
from moe_emergence.data.sample.prose import prose_paragraphs
from moe_emergence.data.sources import (
    MAX_EXAMPLE_CHARS,
    Opened,
    Opener,
    Source,
    StreamStats,
    check_filters,
    check_size_mb,
    read_domain,
)
from moe_emergence.errors import UserError

log = logging.getLogger(__name__)

SAMPLE_VERSION = 1  # bump when the corpus recipe (selection, cleaning, generator) changes
BUILDER_NAME = "sample"
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
OWN_DISTRIBUTION = "moe-emergence"
MAX_REJECTED_IN_A_ROW = 20_000  # a filter rejecting this many texts in a row keeps none

Candidates = Iterator[tuple[StreamStats, str]]


@dataclass
class _Opened:
    """A source opened for reading: its stats entries and its candidate texts, in order.

    ``candidates`` counts rows into the stats as it reads them and marks them exhausted when
    it runs out; the length filter is applied by the reader.
    """

    stats: list[StreamStats]
    candidates: Candidates


def _stats(
    source: Source, config: str | None, location: str, revision: str | None, max_chars: int
) -> StreamStats:
    return StreamStats(
        dataset=source.dataset,
        config=config,
        split=source.split,
        location=location,
        revision=revision,
        builder_name=BUILDER_NAME,
        version=str(SAMPLE_VERSION),
        min_example_chars=source.min_chars,
        max_example_chars=max_chars,
        text_template=source.text,
    )


# ---- code: the standard library ---------------------------------------------------------


def stdlib_dir() -> Path:
    """The standard library's folder (``sysconfig.get_paths()["stdlib"]``)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _python_files(folder: Path) -> Iterator[os.DirEntry]:
    """``*.py`` files under ``folder``, depth-first, each level in sorted name order; lazily."""
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            if entry.name not in SKIP_DIRS:
                yield from _python_files(Path(entry.path))
        elif entry.name.endswith(".py"):
            yield entry


def _read_code(entry: os.DirEntry, min_chars: int, max_chars: int) -> str | None:
    """The file's text, or None when unreadable, not UTF-8, or sure to fail the length filter.

    UTF-8 takes 1 to 4 bytes a character, so the byte size bounds the length without reading.
    """
    try:
        size = entry.stat().st_size
        if size <= min_chars or size >= 4 * max_chars:
            return None
        return Path(entry.path).read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _open_code(source: Source, seed: int, max_chars: int) -> _Opened:
    root = stdlib_dir()
    stats = _stats(source, None, str(root), f"python-{platform.python_version()}", max_chars)

    def candidates() -> Candidates:
        for entry in _python_files(root):
            stats.num_rows_read += 1
            text = _read_code(entry, source.min_chars or 0, max_chars)
            if text is not None:
                yield stats, text
        stats.exhausted = True

    return _Opened([stats], candidates())


# ---- math: generated --------------------------------------------------------------------


def _open_math(source: Source, seed: int, max_chars: int) -> _Opened:
    location = f"generated by moe_emergence.data.sample.mathgen (seed {seed})"
    by_style = {c: _stats(source, c, location, f"seed-{seed}", max_chars) for c in source.configs}

    def candidates() -> Candidates:
        for problem in generate_math(seed):
            stats = by_style[problem.style]
            stats.num_rows_read += 1
            yield stats, format_math(problem)

    return _Opened(list(by_style.values()), candidates())


# ---- prose: sources ---------------------------------------------------------------------


def _pydoc_topics() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions package pydoc_data separately
        log.warning("pydoc_data is not installed: the sample prose has no Python docs topics.")
        return {}
    return topics


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class InstalledDistribution:
    """What prose reads of one installed distribution."""

    name: str
    version: str
    description: str


def _read_distribution(dist: importlib.metadata.Distribution) -> InstalledDistribution | None:
    """Name, version and long description (the metadata's body, else its ``Description``
    header); None for a distribution without readable metadata or name."""
    try:
        meta = dist.metadata
        name = meta.get("Name") if meta is not None else None
        if not name:
            return None
        body = meta.get_payload()
        if not isinstance(body, str) or not body.strip():
            body = meta.get("Description") or ""
        return InstalledDistribution(name, meta.get("Version") or "", body)
    except (OSError, TypeError, ValueError):  # a broken leftover of an interrupted install
        return None


def installed_distributions() -> list[InstalledDistribution]:
    """Installed distributions, sorted by normalized name: for each name the first found on
    ``sys.path``; this project's own left out."""
    seen: dict[str, InstalledDistribution] = {}
    for dist in importlib.metadata.distributions():
        info = _read_distribution(dist)
        key = _normalize(info.name) if info else None
        if info and key not in seen and key != OWN_DISTRIBUTION:
            seen[key] = info
    return [seen[k] for k in sorted(seen)]


def _distributions_digest(dists: Iterable[InstalledDistribution]) -> str:
    """A short hash of the (name, version, description hash) triples, in order."""
    rows = [[d.name, d.version, hashlib.sha256(d.description.encode()).hexdigest()] for d in dists]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def pack_paragraphs(paragraphs: Iterable[str], max_chars: int) -> Iterator[str]:
    """Consecutive paragraphs joined by ``\\n`` into texts shorter than ``max_chars``
    (greedily; a paragraph of ``max_chars`` or more comes alone, for the filter to drop)."""
    group: list[str] = []
    length = -1  # length of "\n".join(group)
    for paragraph in paragraphs:
        if group and length + 1 + len(paragraph) >= max_chars:
            yield "\n".join(group)
            group, length = [], -1
        group.append(paragraph)
        length += 1 + len(paragraph)
    if group:
        yield "\n".join(group)


def _document_candidates(
    stats: StreamStats, documents: Iterable[Iterable[str]], max_chars: int
) -> Candidates:
    """Each document's paragraphs (in order) packed into texts: one row per document."""
    for paragraphs in documents:
        stats.num_rows_read += 1
        for text in pack_paragraphs(paragraphs, max_chars):
            yield stats, text
    stats.exhausted = True


def _open_pydoc(source: Source, seed: int, max_chars: int) -> _Opened:
    version = platform.python_version()
    stats = _stats(
        source,
        source.configs[0],
        f"pydoc_data.topics (Python {version})",
        f"python-{version}",
        max_chars,
    )
    topics = _pydoc_topics()
    documents = (prose_paragraphs(topics[k]) for k in sorted(topics))
    return _Opened([stats], _document_candidates(stats, documents, max_chars))


def _open_descriptions(source: Source, seed: int, max_chars: int) -> _Opened:
    dists = installed_distributions()
    location = f"importlib.metadata ({len(dists)} installed distributions, sorted by name)"
    stats = _stats(source, None, location, _distributions_digest(dists), max_chars)
    documents = (prose_paragraphs(d.description) for d in dists)
    return _Opened([stats], _document_candidates(stats, documents, max_chars))


# ---- the frozen snapshot (frozen.py): what the ``sample`` domain set reads ---------------


def _frozen_stats(source: Source, name: str, max_chars: int) -> StreamStats:
    built = manifest()["built_with"]
    location = f"{frozen_file(name).name} in the package (frozen {built['date']})"
    config = source.configs[0] if source.configs else None
    return _stats(source, config, location, manifest()["files"][name]["sha256"][:16], max_chars)


def _open_frozen_code(source: Source, seed: int, max_chars: int) -> _Opened:
    stats = _frozen_stats(source, "python-stdlib", max_chars)

    def candidates() -> Candidates:
        for row in frozen_rows("python-stdlib"):
            stats.num_rows_read += 1
            yield stats, row["text"]
        stats.exhausted = True

    return _Opened([stats], candidates())


def _frozen_prose_opener(name: str) -> Callable[[Source, int, int], _Opened]:
    def open_prose(source: Source, seed: int, max_chars: int) -> _Opened:
        stats = _frozen_stats(source, name, max_chars)
        documents = (row["paragraphs"] for row in frozen_rows(name))
        return _Opened([stats], _document_candidates(stats, documents, max_chars))

    return open_prose


LIVE_READERS: dict[str, Callable[[Source, int, int], _Opened]] = {
    "sample/python-stdlib": _open_code,
    "sample/python-docs": _open_pydoc,
    "sample/package-descriptions": _open_descriptions,
}
FROZEN_READERS: dict[str, Callable[[Source, int, int], _Opened]] = {
    "sample/frozen-python-stdlib": _open_frozen_code,
    "sample/frozen-python-docs": _frozen_prose_opener("python-docs"),
    "sample/frozen-package-descriptions": _frozen_prose_opener("package-descriptions"),
}
_OPENERS = {**LIVE_READERS, "sample/generated-math": _open_math, **FROZEN_READERS}


def live_sources(domain: str) -> tuple[Source, ...]:
    """The ``sample`` set's sources of ``domain`` with each frozen dataset swapped for the live
    reader it was frozen from (this machine's stdlib and installed packages): what
    ``python -m moe_emergence.data.sample.freeze`` reads."""
    return tuple(
        dataclasses.replace(s, dataset=s.dataset.replace("sample/frozen-", "sample/"))
        for s in domain_set(SAMPLE_SET)[domain]
    )


def _check_frozen_max(sources: tuple[Source, ...], max_chars: int, domain: str) -> None:
    frozen = [s.dataset for s in sources if s.dataset in FROZEN_READERS]
    if frozen and max_chars > MAX_CHARS:
        raise SettingError(
            f"max_example_chars={max_chars}: the frozen sample corpus ({domain}: "
            f"{', '.join(frozen)}) holds only texts shorter than {MAX_CHARS:,} characters, so it "
            f"cannot give longer ones: use max_example_chars <= {MAX_CHARS}, or a Hub mirror.",
            "max_example_chars",
        )


# ---- the loader: the sources' one streaming loop, with these openers ------------------------


def _kept(candidates: Candidates, source: Source, max_chars: int) -> Candidates:
    """The candidates passing ``min_chars < len < max_chars``.

    The generated source never ends, so a filter rejecting ``MAX_REJECTED_IN_A_ROW`` texts in a
    row raises instead of spinning forever.
    """
    low = source.min_chars or 0
    rejected = 0
    for stats, text in candidates:
        if not low < len(text) < max_chars:
            rejected += 1
            if rejected >= MAX_REJECTED_IN_A_ROW:
                raise SettingError(
                    f"max_example_chars={max_chars} keeps no text from '{source.dataset}' "
                    f"({rejected:,} rejected in a row): raise it, e.g. to 1000.",
                    "max_example_chars",
                )
            continue
        rejected = 0
        yield stats, text


def sample_opener(seed: int, max_chars: int) -> Opener:
    """The opener of the offline sample's datasets (:data:`LIVE_READERS`, the generated math,
    :data:`FROZEN_READERS`) for :func:`~moe_emergence.data.sources.read_domain`: one stream per
    source."""

    def open_source(i: int, source: Source) -> Opened:
        found = _OPENERS[source.dataset](source, seed, max_chars)
        return Opened(found.stats, [_kept(found.candidates, source, max_chars)])

    return open_source


def _sample_sources(domain: str, sources: tuple[Source, ...] | None) -> tuple[Source, ...]:
    """``sources``, or ``domain``'s in the ``sample`` set; every dataset one of the sample's."""
    if sources is None:
        sample_set = domain_set(SAMPLE_SET)
        if domain not in sample_set:
            raise UserError(
                f"Unknown sample domain {domain!r}: choose one of {', '.join(sample_set)}."
            )
        sources = sample_set[domain]
    unknown = [s.dataset for s in sources if s.dataset not in _OPENERS]
    if unknown:
        raise SettingError(
            f"{domain}: {', '.join(unknown)} is not a dataset of the offline sample; its "
            f"datasets are {', '.join(_OPENERS)}.",
            "domain_set",
        )
    return sources


def load_sample_domain(
    domain: str,
    size_mb: float,
    max_example_chars: int = MAX_EXAMPLE_CHARS,
    seed: int = 0,
    show_progress: bool = False,
    quiet: bool = False,
    sources: tuple[Source, ...] | None = None,
) -> tuple[list[str], dict[str, Any]]:
    """Read the sample ``sources`` of ``domain`` (default: its sources in the ``sample`` domain
    set) in order until ``size_mb`` MiB of characters.

    A text is kept when ``min_chars < len(text) < max_example_chars`` and taken while the
    running total is below ``budget_chars(size_mb)``; the one that crosses is kept. Sources
    are opened lazily and read only as far as the budget needs. Returns ``(texts, metadata)``
    with ``load_domain``'s metadata keys plus ``"source": "sample"``; ``seed`` picks the
    generated math problems; ``quiet`` leaves out the warning when the sources run out.
    """
    sources = _sample_sources(domain, sources)
    if not is_int(seed):
        raise UserError(f"seed={seed!r} must be an integer.")
    check_size_mb(size_mb)
    check_filters(sources, max_example_chars, domain)
    _check_frozen_max(sources, max_example_chars, domain)
    opener = sample_opener(seed, max_example_chars)
    texts, metadata = read_domain(
        domain, sources, size_mb, opener, show_progress, label="sample", quiet=quiet
    )
    metadata["source"] = "sample"
    return texts, metadata


def texts_digest(texts: Iterable[str]) -> str:
    """SHA-256 (hex) over the texts in order, each as its UTF-8 length (8 bytes) and bytes."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


@functools.lru_cache(maxsize=32)
def domain_identity(
    domain: str,
    size_mb: float,
    max_example_chars: int = MAX_EXAMPLE_CHARS,
    seed: int = 0,
    sources: tuple[Source, ...] | None = None,
) -> dict[str, Any]:
    """What the sample corpus gives ``domain`` for this budget: the recipe version, the seed,
    and the number and SHA-256 of the texts chosen (JSON-ready).

    It changes exactly when the chosen texts do: for the frozen ``sample`` set, only when the
    snapshot is rebuilt (or the math generator or seed change); for live sources, also with a
    new Python build or a newly installed distribution whose description prose would read.
    Costs one load of the domain (~0.01-0.2 s per MiB); memoized per process.
    """
    texts, _ = load_sample_domain(
        domain, size_mb, max_example_chars, seed, quiet=True, sources=sources
    )
    return {
        "sample_version": SAMPLE_VERSION,
        "seed": seed,
        "num_texts": len(texts),
        "texts_sha256": texts_digest(texts),
    }


def sample_identity(size_mb: float, max_example_chars: int = MAX_EXAMPLE_CHARS, seed: int = 0):
    """:func:`domain_identity` of every domain of the ``sample`` set, in order (for the
    ``sample_bpe`` tokenizer's folder name)."""
    return {
        d: domain_identity(d, size_mb, max_example_chars, seed, sources)
        for d, sources in domain_set(SAMPLE_SET).items()
    }


__all__ = [
    "FROZEN_READERS",
    "LIVE_READERS",
    "SAMPLE_SET",
    "SAMPLE_VERSION",
    "InstalledDistribution",
    "domain_identity",
    "installed_distributions",
    "live_sources",
    "load_sample_domain",
    "pack_paragraphs",
    "prose_paragraphs",
    "sample_identity",
    "sample_opener",
    "stdlib_dir",
    "texts_digest",
]
