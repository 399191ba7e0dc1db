"""Stream each domain's texts from its datasets, filter by length, stop at a character budget.

A domain is an ordered list of :class:`Source`; the next source is opened only when the ones
before it ran out below the budget. :func:`read_domain` is the one streaming loop; an opener
turns a source into its streams: :func:`hub_opener` for the Hub's datasets (or their local
copies, :func:`load_domain`), ``sample_opener`` for the offline sample
(:mod:`moe_emergence.data.sample.corpus`). Within a source, several configs (e.g. MATH's
subjects) are read round-robin, one kept text from each in turn. Texts are used exactly as the
template makes them (no stripping). Lengths and budgets are in characters (``len(str)``). A
damaged local data file (truncated, not parquet/gzip, no rows) raises DataFileError naming it
and the re-download command.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import logging
import math
import shutil
import string
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from moe_emergence.data.checks import SettingError, is_number
from moe_emergence.data.damage import check_local_files, damage_behind, wrong_config_or_split
from moe_emergence.hub import HubUnavailableError, resolve_repo

log = logging.getLogger(__name__)

MAX_EXAMPLE_CHARS = 10_000
MATH_TEMPLATE = "Problem: {problem}\n\nSolution: {solution}"


@dataclass(frozen=True)
class Source:
    """One dataset read for a domain.

    ``text`` is a ``str.format`` template over the example's fields (``"{content}"`` for a
    plain field). A text is kept when ``min_chars < len(text) < max_example_chars``
    (``min_chars=None``: no lower bound beyond non-empty).
    """

    dataset: str
    text: str
    configs: tuple[str | None, ...] = (None,)
    split: str = "train"
    min_chars: int | None = None
    revision: str | None = None

    @property
    def fields(self) -> list[str]:
        """Example fields the template reads."""
        return [f for _, f, _, _ in string.Formatter().parse(self.text) if f]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class StreamStats:
    """What was read from one (dataset, config) stream; one entry of a domain's metadata."""

    dataset: str
    config: str | None
    split: str
    location: str
    revision: str | None
    builder_name: str | None = None
    version: str | None = None
    num_examples: int = 0
    num_rows_read: int = 0
    total_chars: int = 0
    min_example_chars: int | None = None
    max_example_chars: int | None = None
    exhausted: bool = False
    text_template: str = ""


@dataclass
class _OpenStream:
    stats: StreamStats
    rows: Iterator[Mapping[str, Any]]
    template: str
    min_chars: int
    max_chars: int

    def next_text(self) -> str | None:
        """The next text passing the length filter, or None once the stream ran out."""
        for row in self.rows:
            self.stats.num_rows_read += 1
            text = self.template.format_map(row)
            if self.min_chars < len(text) < self.max_chars:
                return text
        self.stats.exhausted = True
        return None


Kept = Iterator[tuple[StreamStats, str]]  # kept texts, each with the stats entry it counts into


@dataclass
class Opened:
    """A source opened for reading: its stats entries (one per (dataset, config), in reading
    order) and its streams of kept texts, read round-robin, one text from each in turn. A
    stream counts its rows into its stats and marks them exhausted when it runs out; the
    reader (:func:`read_domain`) counts what it takes."""

    stats: list[StreamStats]
    streams: list[Kept]


Opener = Callable[[int, Source], Opened]  # (the source's index in its domain, the source)


def budget_chars(size_mb: float) -> int:
    """A domain's character budget: ``size_mb * 1024 * 1024``."""
    return int(size_mb * 1024 * 1024)


def check_filters(sources: Sequence[Source], max_example_chars: int, domain: str) -> None:
    """Raise SettingError when a length filter ``min < len < max`` can keep nothing."""
    for source in sources:
        low = source.min_chars or 0
        if max_example_chars <= low + 1:
            raise SettingError(
                f"max_example_chars={max_example_chars} keeps no {domain} text: "
                f"'{source.dataset}' has minimum length {low} and keeps "
                f"{low} < len < {max_example_chars}. Set max_example_chars to {low + 2} or more.",
                "max_example_chars",
            )


def check_size_mb(size_mb: float) -> None:
    """Raise SettingError unless ``size_mb`` is a finite number giving a budget of ≥ 1 char."""
    if not is_number(size_mb) or not math.isfinite(size_mb) or budget_chars(size_mb) < 1:
        raise SettingError(
            f"size_mb={size_mb!r} must be a finite number > 0 (MiB of characters per domain, "
            f"at least 1 character), e.g. 1, 5 or 10.",
            "size_mb",
        )


class DatasetUnavailableError(SettingError, HubUnavailableError):
    """A dataset that cannot be streamed from the Hub; a hub mirror with a copy is the fix."""

    field = "hub_mirror"


def check_templates(domains: Mapping[str, Sequence[Source]], hub_mirror: str | None = None) -> None:
    """Open every (source, config) of ``domains`` and check that its text template reads only
    fields the dataset has (where ``datasets`` knows them up front: parquet, JSON with
    features), before anything is streamed: a SettingError naming ``domain[i].text``."""
    for domain, sources in domains.items():
        for i, source in enumerate(sources):
            location = resolve_repo(source.dataset, hub_mirror, "dataset", source.revision)
            for config in source.configs:
                _open_explained(
                    source, config, location, MAX_EXAMPLE_CHARS, f"{domain}[{i}]", hub_mirror
                )


@functools.cache
def _no_arrow_cache() -> str:
    """An empty ``datasets`` cache folder of this process (removed at exit) for local folders.

    Even a streaming ``load_dataset`` takes a dataset's features from the shared Arrow cache
    (``~/.cache/huggingface/datasets``) when an entry for the same dataset name, config and
    files hash is there: one written by a non-streaming load of another copy of the mirror
    answered for a copy whose parquet column was since renamed. With no entry to find, the
    features are read from the files themselves (the first parquet file's schema).
    """
    folder = tempfile.mkdtemp(prefix="moe-emergence-stream-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _open(
    source: Source, config: str | None, location: str, max_chars: int, where: str = "source"
) -> _OpenStream:
    """``source``'s stream of ``config``; ``where`` names it in messages (``math[1]``). A local
    folder's fields come from its files, never from the Arrow cache (:func:`_no_arrow_cache`)."""
    from datasets import load_dataset

    local = {"cache_dir": _no_arrow_cache()} if Path(location).is_dir() else {}
    try:
        ds = load_dataset(
            location,
            config,
            split=source.split,
            streaming=True,
            revision=source.revision,
            **local,
        )
    except ConnectionError as exc:
        reason = " ".join(str(exc).split())
        raise DatasetUnavailableError(
            f"Cannot load dataset '{source.dataset}' (config {config!r}): {reason}. Set a hub "
            f"mirror that holds a local copy."
        ) from exc
    if ds.features is not None:  # known up front for parquet/json; else fail on first row
        columns = list(ds.features)
        missing = [f for f in source.fields if f not in columns]
        if missing:
            raise SettingError(
                f"{where}.text {source.text!r} reads field(s) {', '.join(missing)}, which "
                f"dataset '{source.dataset}' (config {config!r}) does not have; its fields are "
                f"{', '.join(columns)}.",
                "domain_set",
            )
        ds = ds.select_columns(source.fields)
    info = ds.info
    stats = StreamStats(
        dataset=source.dataset,
        config=config,
        split=source.split,
        location=location,
        revision=source.revision,
        builder_name=getattr(info, "builder_name", None),
        version=str(info.version) if getattr(info, "version", None) is not None else None,
        min_example_chars=source.min_chars,
        max_example_chars=max_chars,
        text_template=source.text,
    )
    return _OpenStream(stats, iter(ds), source.text, source.min_chars or 0, max_chars)


def _open_explained(
    source: Source,
    config: str | None,
    location: str,
    max_chars: int,
    where: str,
    hub_mirror: str | None,
) -> _OpenStream:
    """:func:`_open`, a failure explained (:mod:`moe_emergence.data.damage`): the config or split
    the local copy lacks, else the damaged file behind it."""
    try:
        return _open(source, config, location, max_chars, where)
    except Exception as exc:
        if error := wrong_config_or_split(source, config, location, where):
            raise error from exc
        if error := damage_behind(exc, source, config, location, hub_mirror):
            raise error from exc
        raise


def _kept_rows(stream: _OpenStream, source: Source, location: str, hub_mirror: str | None) -> Kept:
    """``stream``'s texts passing its length filter; a failure to read names the damaged file
    behind it (:func:`~moe_emergence.data.damage.damage_behind`)."""
    while True:
        try:
            text = stream.next_text()
        except Exception as exc:
            config = stream.stats.config
            if error := damage_behind(exc, source, config, location, hub_mirror):
                raise error from exc
            raise
        if text is None:
            return
        yield stream.stats, text


def hub_opener(
    domain: str, locations: Sequence[str], max_chars: int, hub_mirror: str | None
) -> Opener:
    """The opener of a domain's datasets (Hub ids or local folders at ``locations``, one per
    source): one stream per config, read round-robin."""

    def open_source(i: int, source: Source) -> Opened:
        where = f"{domain}[{i}]"
        streams = [
            _open_explained(source, config, locations[i], max_chars, where, hub_mirror)
            for config in source.configs
        ]
        return Opened(
            [s.stats for s in streams],
            [_kept_rows(s, source, locations[i], hub_mirror) for s in streams],
        )

    return open_source


def _round_robin(streams: Sequence[Kept]) -> Kept:
    """One text from each stream in turn, a stream dropped when it runs out; lazily (a stream
    is read only when its next text is asked for)."""
    left = list(streams)
    while left:
        for stream in list(left):
            taken = next(stream, None)
            if taken is None:
                left.remove(stream)
            else:
                yield taken


def read_domain(
    domain: str,
    sources: Sequence[Source],
    size_mb: float,
    open_source: Opener,
    show_progress: bool = True,
    label: str = "",
    quiet: bool = False,
) -> tuple[list[str], dict[str, Any]]:
    """The one streaming loop: read ``sources`` in order (each opened by ``open_source`` only
    when the ones before it ran out below the budget), a source's streams round-robin, until
    ``size_mb`` worth of characters are taken.

    A text is taken while the running total is below the budget (the one that crosses it is
    kept). ``label`` names the reader in the progress bar and the warning when the sources run
    out (``quiet``: no warning). Returns ``(texts, metadata)``; ``metadata["sources"]`` holds
    one :class:`StreamStats` dict per (dataset, config) opened, in reading order.
    """
    budget = budget_chars(size_mb)
    texts: list[str] = []
    total = 0
    opened: list[StreamStats] = []
    bar = tqdm(
        total=budget,
        unit="char",
        unit_scale=True,
        desc=f"{label or 'stream'} {domain}",
        disable=not show_progress,
        leave=False,
    )
    with bar:
        for i, source in enumerate(sources):
            if total >= budget:
                break
            found = open_source(i, source)
            opened.extend(found.stats)
            for stats, text in _round_robin(found.streams):
                texts.append(text)
                stats.num_examples += 1
                stats.total_chars += len(text)
                total += len(text)
                bar.update(len(text))
                if total >= budget:
                    break
    if total < budget and not quiet:
        log.warning(
            "%s: sources ran out at %s of %s budgeted characters (%s).",
            f"{label} {domain}".lstrip(),
            f"{total:,}",
            f"{budget:,}",
            ", ".join(f"{s.dataset}[{s.config}] exhausted" for s in opened if s.exhausted),
        )
    return texts, {
        "domain": domain,
        "size_mb": size_mb,
        "budget_chars": budget,
        "num_texts": len(texts),
        "total_chars": total,
        "budget_met": total >= budget,
        "sources": [dataclasses.asdict(s) for s in opened],
    }


def load_domain(
    domain: str,
    sources: Sequence[Source],
    size_mb: float,
    max_example_chars: int = MAX_EXAMPLE_CHARS,
    hub_mirror: str | None = None,
    show_progress: bool = True,
    check_files: bool = True,
) -> tuple[list[str], dict[str, Any]]:
    """Read the datasets ``sources`` in order until ``size_mb`` worth of characters are taken
    (:func:`read_domain`, with :func:`hub_opener`).

    A damaged local data file raises DataFileError naming it: found up front by
    :func:`check_local_files` (``check_files``) where that is cheap, else when streaming it
    fails. ``size_mb`` and ``max_example_chars`` are checked by the caller
    (``DataSettings.validate``, or the ``load_*_data`` functions).
    """
    # Resolve every location first: a missing mirror folder or no network fails here, in
    # seconds, before anything is streamed.
    locations = [resolve_repo(s.dataset, hub_mirror, "dataset", s.revision) for s in sources]
    if check_files:
        check_local_files(sources, hub_mirror, locations)
    opener = hub_opener(domain, locations, max_example_chars, hub_mirror)
    return read_domain(domain, sources, size_mb, opener, show_progress)


__all__ = [
    "MATH_TEMPLATE",
    "MAX_EXAMPLE_CHARS",
    "DatasetUnavailableError",
    "Opened",
    "Opener",
    "Source",
    "StreamStats",
    "budget_chars",
    "check_filters",
    "check_size_mb",
    "check_templates",
    "hub_opener",
    "load_domain",
    "read_domain",
]
