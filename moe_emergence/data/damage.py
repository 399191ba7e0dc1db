"""Damaged local data files: a mirror's or folder's file that is truncated, not its format, or
holds no rows, found before streaming where that is cheap (:func:`check_local_files`) or behind
a failure to stream (:func:`damage_behind`); a config or split the local copy lacks
(:func:`wrong_config_or_split`). Each is one error naming the file or the set's entry and the
fix (re-download, or fix the set)."""

from __future__ import annotations

import gzip
import logging
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from moe_emergence.data.checks import SettingError
from moe_emergence.errors import UserError
from moe_emergence.hub import is_hub_id, resolve_repo

log = logging.getLogger(__name__)


class Dataset(Protocol):
    """What the checks read of a source (:class:`moe_emergence.data.sources.Source`)."""

    dataset: str
    configs: tuple[str | None, ...]
    split: str
    revision: str | None

    @property
    def fields(self) -> list[str]: ...


DATA_SUFFIXES = (".parquet", ".gz", ".json", ".jsonl")
SMALL_FILE_BYTES = 1 << 20  # compressed/plain files this small are read whole by the pre-check


class DataFileError(UserError):
    """A local data file (mirror or folder) that is truncated, not its format, or empty."""


def _parquet_problem(path: Path, thorough: bool) -> str | None:
    import pyarrow.parquet as pq

    with path.open("rb") as f:
        head = f.read(4)
        size = f.seek(0, 2)
        f.seek(max(size - 4, 0))
        tail = f.read(4)
    if head != b"PAR1":
        return "is not a parquet file" if size else "is empty (0 bytes)"
    if size < 12 or tail != b"PAR1":
        return "is truncated (its parquet footer is missing)"
    try:
        parquet = pq.ParquetFile(path)
        if parquet.metadata.num_rows == 0:
            return "holds no rows"
        if thorough:
            for _ in parquet.iter_batches(batch_size=65_536):
                pass
    except Exception as exc:  # pyarrow reports damage as ArrowInvalid, OSError, ...
        return f"is damaged ({' '.join(str(exc).split())})"
    return None


def _text_problem(path: Path, thorough: bool) -> str | None:
    """Gzip or plain JSON lines: truncated / not gzip / no rows (read whole when small or
    ``thorough``)."""
    if not thorough and path.stat().st_size > SMALL_FILE_BYTES:
        return None
    has_text = False
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            while chunk := f.read(1 << 20):
                has_text = has_text or bool(chunk.strip())
    except EOFError:
        return "is truncated (the gzip stream ends early)"
    except (gzip.BadGzipFile, zlib.error) as exc:
        return f"is not valid gzip data ({exc})"
    return None if has_text else "holds no rows"


def data_file_problem(path: Path, thorough: bool = True) -> str | None:
    """What is wrong with the data file ``path`` (truncated, not parquet/gzip, no rows), or
    None. Not ``thorough``: cheap checks only (parquet footers, small files read whole)."""
    if path.suffix == ".parquet":
        return _parquet_problem(path, thorough)
    if path.suffix in DATA_SUFFIXES:
        return _text_problem(path, thorough)
    return None


def _data_files(location: str, config: str | None, split: str) -> list[Path]:
    """The files ``datasets`` reads for (config, split) of the local folder ``location``;
    every data file under it when that cannot be told."""
    try:
        from datasets import load_dataset_builder

        files = load_dataset_builder(location, config).config.data_files or {}
        chosen = [Path(str(f)) for key, fs in files.items() if str(key) == split for f in fs]
        if chosen:
            return chosen
    except Exception as exc:  # an unreadable README or layout: check everything instead
        log.debug("Could not list the data files of %s [%s]: %s", location, config, exc)
    return sorted(
        p
        for p in Path(location).rglob("*")
        if p.is_file()
        and p.suffix in DATA_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(location).parts)
    )


def _config_part(config: str | None) -> str:
    return "" if config is None else f" (config '{config}')"


def _redownload_hint(source: Dataset, location: str, hub_mirror: str | None) -> str:
    if not is_hub_id(source.dataset):
        return "replace it with a good copy"
    command = f"hf download {source.dataset} --repo-type dataset"
    if hub_mirror is not None and Path(location) == Path(hub_mirror) / source.dataset:
        return f"re-download it with `{command} --local-dir {location}`"
    if "snapshots" in Path(location).parts:  # the Hugging Face hub cache
        return f"re-download it with `{command} --force-download`"
    return f"re-download it with `{command} --local-dir {location}`"


def find_damaged_file(
    source: Dataset,
    config: str | None,
    location: str,
    hub_mirror: str | None = None,
    thorough: bool = True,
) -> DataFileError | None:
    """The error naming the first damaged data file of ``source``'s (config, split) in the
    local folder ``location``, or None (also for a Hub id)."""
    if not Path(location).is_dir():
        return None
    for path in _data_files(location, config, source.split):
        problem = data_file_problem(path, thorough)
        if problem is not None:
            return DataFileError(
                f"Data file '{path}' of dataset '{source.dataset}'{_config_part(config)} "
                f"{problem}: {_redownload_hint(source, location, hub_mirror)}."
            )
    return None


def check_local_files(
    sources: Sequence[Dataset], hub_mirror: str | None = None, locations: Sequence[str] = ()
) -> None:
    """Cheap pre-check of every local source's data files before streaming (parquet footers
    and row counts, small files read whole); raise DataFileError for the first bad one."""
    locations = locations or [
        resolve_repo(s.dataset, hub_mirror, "dataset", s.revision) for s in sources
    ]
    for source, location in zip(sources, locations, strict=True):
        for config in source.configs:
            error = find_damaged_file(source, config, location, hub_mirror, thorough=False)
            if error is not None:
                raise error


def wrong_config_or_split(
    source: Dataset, config: str | None, location: str, where: str
) -> SettingError | None:
    """A SettingError naming the set's ``where.configs`` entry or ``where.split`` that the
    local copy at ``location`` does not have (with the ones it has), or None."""
    if not Path(location).is_dir():
        return None
    from datasets import get_dataset_config_names, load_dataset_builder

    try:
        configs = [str(c) for c in get_dataset_config_names(location)]
        if config is not None and configs and config not in configs:
            return SettingError(
                f"{where}.configs: '{config}' is not a config of dataset '{source.dataset}' "
                f"({location}), whose configs are {', '.join(configs)}: fix the set's entry.",
                "domain_set",
            )
        splits = [str(k) for k in (load_dataset_builder(location, config).config.data_files or {})]
    except Exception as exc:  # the layout cannot be told: the damage check says more
        log.debug("Could not list the configs and splits of %s: %s", location, exc)
        return None
    if splits and source.split not in splits:
        return SettingError(
            f"{where}.split: '{source.split}' is not a split of dataset '{source.dataset}'"
            f"{_config_part(config)} ({location}), whose splits are {', '.join(splits)}: fix "
            f"the set's split.",
            "domain_set",
        )
    return None


def damage_behind(
    exc: Exception, source: Dataset, config: str | None, location: str, hub_mirror: str | None
) -> DataFileError | None:
    """The DataFileError naming the damaged local file that made streaming fail with ``exc``,
    or None (then ``exc`` is re-raised as it is)."""
    if isinstance(exc, UserError):
        return None
    found = find_damaged_file(source, config, location, hub_mirror)
    if found is None and Path(location).is_dir():  # intact files of another shape
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        where = f"{location} ({config})" if config else location
        found = DataFileError(
            f"Reading {source.dataset} from {where} failed ({type(exc).__name__}: {reason}): "
            f"its files are not what this source reads (a split '{source.split}' with the "
            f"field(s) {', '.join(source.fields)}, one record per line or row); "
            f"{_redownload_hint(source, location, hub_mirror)}."
        )
    return found


__all__ = [
    "DataFileError",
    "check_local_files",
    "damage_behind",
    "data_file_problem",
    "find_damaged_file",
    "wrong_config_or_split",
]
