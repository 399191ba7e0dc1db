"""The offline ``sample`` source: a corpus built on this machine, with no download.

Same contract as :func:`moe_emergence.data.sources.load_domain`: ``(texts, metadata)``, the
same budget rule (a text is taken while the running total is below ``size_mb * 1024 * 1024``
characters; the one that crosses is kept) and the same metadata keys, plus
``"source": "sample"``. Per domain:

- code: the standard library's ``*.py`` files as they are (UTF-8), walked depth-first in sorted
  name order (i.e. sorted by path components), skipping ``site-packages``, ``dist-packages``,
  ``__pycache__`` and unreadable or non-UTF-8 files; ``100 < len < max_example_chars``.
- math: problems from :mod:`moe_emergence.data.sample.mathgen`, GSM8K-style and MATH-style
  alternating, deterministic by ``seed``; never exhausted.
- prose: paragraphs of Python's documentation topics (``pydoc_data.topics``, topics in sorted
  order), then of the long descriptions of installed distributions (sorted by normalized
  name; this project's own is left out: it changes without a version bump). Code is removed
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

from tqdm.auto import tqdm

from moe_emergence.data.checks import SettingError, is_int
from moe_emergence.data.domains import domain_set
from moe_emergence.data.sample.mathgen import format_math, generate_math
from moe_emergence.data.sources import (
    MAX_EXAMPLE_CHARS,
    Source,
    StreamStats,
    budget_chars,
    check_filters,
    check_size_mb,
)
from moe_emergence.errors import UserError

log = logging.getLogger(__name__)

SAMPLE_VERSION = 1  # bump when the corpus recipe (selection, cleaning, generator) changes
BUILDER_NAME = "sample"
SAMPLE_SET = "sample"  # its domain set: conf/data/domains/sample.yaml
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


# ---- prose: cleaning reST / Markdown / plain text into paragraphs -----------------------

_FENCE = re.compile(r"^\s*(```|~~~)")
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_UNDERLINE = re.compile(r"^\s*([=\-~^*#\"+`'.:_])\1{2,}\s*$")
_DROP_LINE = re.compile(
    r"""^\s*(?:
        \#{1,6}(?:\s|$)             # Markdown heading
      | \| | \+[-=]                 # table row or border, reST substitution line
      | =+(?:\s+=+)+\s*$            # reST simple-table border
      | \[[^\]]+\]:\s*\S            # Markdown link reference
      | <                           # HTML
      | !?\[!\[                     # badge
      | !\[                         # image
      | (?:https?|ftp)://\S+\s*$    # bare URL
    )""",
    re.VERBOSE,
)
_BULLET = re.compile(r"^(?:[-*+\u2022]|\d{1,3}[.)]|\(\d{1,3}\))\s+")
_MD_IMAGE = re.compile(r"!\[[^\]]*\]\([^)]*\)")
_MD_LINK = re.compile(r"\[([^\]]+)\](?:\([^)]*\)|\[[^\]]*\])")  # [text](url), [text][ref]
_RST_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`__?")
_PROSE_CHARS = re.compile(r"[A-Za-z\s,.;:'\"()?!\-\u2019]")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _drop_fences(lines: list[str]) -> list[str]:
    """``lines`` with Markdown fenced blocks (``` or ~~~, through the closing fence) blanked."""
    out: list[str] = []
    fence: str | None = None
    for line in lines:
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        else:
            out.append("" if fence else line)
            continue
        out.append("")
    return out


def _drop_lines(lines: list[str]) -> list[str]:
    """Headings (Markdown, and reST/setext titles with their under/overlines), tables, HTML,
    badges, link references and bare URLs blanked."""
    out = list(lines)
    for i, line in enumerate(lines):
        if _UNDERLINE.match(line):
            out[i] = ""
            if i > 0 and lines[i - 1].strip() and not _UNDERLINE.match(lines[i - 1]):
                out[i - 1] = ""  # the title above an underline
        elif _DROP_LINE.match(line):
            out[i] = ""
    return out


def _blocks(lines: list[str]) -> Iterator[list[str]]:
    """Runs of non-blank lines."""
    block: list[str] = []
    for line in [*lines, ""]:
        if line.strip():
            block.append(line)
        elif block:
            yield block
            block = []


def _split_items(block: list[str]) -> Iterator[list[str]]:
    """A block split where a list item starts (``- ``, ``* ``, ``1. `` ...), markers removed."""
    item: list[str] = []
    for line in block:
        bullet = _BULLET.match(line.lstrip())
        if bullet and item:
            yield item
            item = []
        item.append(line.lstrip()[bullet.end() :] if bullet else line.strip())
    if item:
        yield item


def _reads_as_prose(text: str) -> bool:
    """Mostly (90%) letters, spaces and punctuation, ending like a sentence (``.!?:``, maybe
    inside closing quotes or brackets); no grammar rules (``::=``)."""
    if not text.rstrip(")]\"'\u201d\u2019*_").endswith((".", "!", "?", ":")) or "::=" in text:
        return False
    return len(_PROSE_CHARS.findall(text)) >= 0.9 * len(text)


def _is_code_block(block: list[str]) -> bool:
    return any(">>>" in line or "```" in line for line in block) or any(
        line.lstrip().startswith(("$ ", "% ", "... ")) for line in block
    )


def prose_paragraphs(document: str) -> Iterator[str]:
    """The prose paragraphs of a reST, Markdown or plain-text ``document``, one line each.

    A block indented deeper than the paragraph before it is dropped when that paragraph ends
    with ``:`` (a literal block in reST, code in rendered docs and READMEs) or is a reST
    directive or comment (``.. name::``); other indented blocks are kept when they read as
    prose (indented paragraphs of rendered docs). Only paragraphs that read as prose remain.
    """
    lines = _drop_lines(_drop_fences(_HTML_COMMENT.sub("", document).expandtabs(8).splitlines()))
    literal_above: int | None = None  # blocks indented deeper than this are literal
    for block in _blocks(lines):
        indent = _indent(block[0])
        if literal_above is not None and indent > literal_above:
            continue
        literal_above = None
        first = block[0].strip()
        if first.startswith(".."):
            literal_above = indent
            continue
        if block[-1].rstrip().endswith(":"):
            literal_above = indent
        if _is_code_block(block):
            continue
        for item in _split_items(block):
            text = " ".join(" ".join(item).split())
            text = _RST_LINK.sub(r"\1", _MD_LINK.sub(r"\1", _MD_IMAGE.sub("", text)))
            text = text.removesuffix("::") + (":" if text.endswith("::") else "")
            if _reads_as_prose(text):
                yield text


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
    stats: StreamStats, documents: Iterable[str], max_chars: int
) -> Candidates:
    for document in documents:
        stats.num_rows_read += 1
        for text in pack_paragraphs(prose_paragraphs(document), max_chars):
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
    return _Opened(
        [stats], _document_candidates(stats, (topics[k] for k in sorted(topics)), max_chars)
    )


def _open_descriptions(source: Source, seed: int, max_chars: int) -> _Opened:
    dists = installed_distributions()
    location = f"importlib.metadata ({len(dists)} installed distributions, sorted by name)"
    stats = _stats(source, None, location, _distributions_digest(dists), max_chars)
    return _Opened([stats], _document_candidates(stats, (d.description for d in dists), max_chars))


_OPENERS: dict[str, Callable[[Source, int, int], _Opened]] = {
    "sample/python-stdlib": _open_code,
    "sample/generated-math": _open_math,
    "sample/python-docs": _open_pydoc,
    "sample/package-descriptions": _open_descriptions,
}


# ---- the loader -------------------------------------------------------------------------


@dataclass
class _Taken:
    """Texts taken so far against a budget of ``budget`` characters."""

    budget: int
    texts: list[str] = dataclasses.field(default_factory=list)
    total: int = 0

    @property
    def met(self) -> bool:
        return self.total >= self.budget


def _read(stream: _Opened, source: Source, max_chars: int, taken: _Taken, bar: tqdm) -> None:
    """Take ``stream``'s texts passing ``min_chars < len < max_chars`` until the budget is met.

    The generated source never ends, so a filter rejecting ``MAX_REJECTED_IN_A_ROW`` texts in a
    row raises instead of spinning forever.
    """
    low = source.min_chars or 0
    rejected = 0
    for stats, text in stream.candidates:
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
        taken.texts.append(text)
        taken.total += len(text)
        stats.num_examples += 1
        stats.total_chars += len(text)
        bar.update(len(text))
        if taken.met:
            return


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
    if not is_int(seed):
        raise UserError(f"seed={seed!r} must be an integer.")
    check_size_mb(size_mb)
    check_filters(sources, max_example_chars, domain)
    taken = _Taken(budget_chars(size_mb))
    opened: list[StreamStats] = []
    bar = tqdm(
        total=taken.budget,
        unit="char",
        unit_scale=True,
        desc=f"sample {domain}",
        disable=not show_progress,
        leave=False,
    )
    with bar:
        for source in sources:
            if taken.met:
                break
            stream = _OPENERS[source.dataset](source, seed, max_example_chars)
            opened.extend(stream.stats)
            _read(stream, source, max_example_chars, taken, bar)
    if not taken.met and not quiet:
        log.warning(
            "sample %s: sources ran out at %s of %s budgeted characters (%s).",
            domain,
            f"{taken.total:,}",
            f"{taken.budget:,}",
            ", ".join(f"{s.dataset}[{s.config}] exhausted" for s in opened if s.exhausted),
        )
    metadata = {
        "domain": domain,
        "size_mb": size_mb,
        "budget_chars": taken.budget,
        "num_texts": len(taken.texts),
        "total_chars": taken.total,
        "budget_met": taken.met,
        "sources": [dataclasses.asdict(s) for s in opened],
        "source": "sample",
    }
    return taken.texts, metadata


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

    It changes exactly when the chosen texts do: a new Python build or a newly installed
    distribution whose description prose would read, not one it never reaches. Costs one
    load of the domain (~0.01-0.2 s per MiB); memoized per process.
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
    "SAMPLE_SET",
    "SAMPLE_VERSION",
    "InstalledDistribution",
    "domain_identity",
    "installed_distributions",
    "load_sample_domain",
    "pack_paragraphs",
    "prose_paragraphs",
    "sample_identity",
    "stdlib_dir",
    "texts_digest",
]
