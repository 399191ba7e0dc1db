"""Tokenizer loading and batched encoding into one flat token stream per domain.

A stream is ``tokens`` (1-D, uint16 while the vocab has < 65,536 entries, else uint32) holding
every text's ids followed by EOS, plus ``doc_offsets`` (int64, ``num_texts + 1`` entries): text i
with its EOS is ``tokens[doc_offsets[i]:doc_offsets[i + 1]]``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from moe_emergence.data.checks import SettingError
from moe_emergence.errors import UserError
from moe_emergence.hub import resolve_repo

log = logging.getLogger(__name__)

DEFAULT_TOKENIZER = "gpt2"
ENCODE_BATCH_TEXTS = 512


class TokenizerLoadError(SettingError, OSError):
    """A tokenizer folder or name that does not load, or lacks what packing needs."""

    field = "tokenizer"


@dataclass(frozen=True)
class TokenStream:
    """One domain's tokens (EOS after each text) and the start offset of every text."""

    tokens: np.ndarray
    doc_offsets: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_texts(self) -> int:
        return int(self.doc_offsets.shape[0]) - 1


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab < 65,536), else uint32."""
    return np.dtype(np.uint16) if vocab_size < 2**16 else np.dtype(np.uint32)


def load_tokenizer(name_or_path: str = DEFAULT_TOKENIZER, hub_mirror: str | None = None):
    """A fast (Rust-backed) tokenizer by Hub name, mirror or local folder; it must define EOS.

    A Hub name offline without a mirror loads from the Hugging Face hub cache when it holds it.
    A missing local path, a file, a folder without tokenizer files or with broken JSON raises a
    one-line UserError (TokenizerLoadError where the ``tokenizer`` setting is the fix).
    """
    location = resolve_repo(name_or_path, hub_mirror, kind="tokenizer")
    if Path(location).is_dir():
        check_tokenizer_folder(name_or_path, Path(location))
    return load_tokenizer_at(name_or_path, location)


def load_tokenizer_at(name: str, location: str):
    """The tokenizer called ``name`` from ``location`` (a folder or a Hub id), checked (fast,
    with EOS). A folder's tokenizer is loaded once per process while its files stay unchanged
    (the config resolver, prepare_data and setup all ask for it)."""
    key = (name, location, _files_signature(location))
    if key[2] is None or key not in _LOADED:
        tokenizer = _load_checked(name, location)
        if key[2] is None:
            return tokenizer
        _LOADED[key] = tokenizer
    return _LOADED[key]


_LOADED: dict[tuple, Any] = {}


def _files_signature(location: str) -> tuple | None:
    """(name, size, mtime) of a local tokenizer folder's files; None for a Hub id."""
    folder = Path(location)
    if not folder.is_dir():
        return None
    return tuple(
        (f.name, f.stat().st_size, f.stat().st_mtime_ns)
        for f in sorted(folder.iterdir())
        if f.is_file()
    )


def one_line(exc: BaseException) -> str:
    """``exc``'s message with its whitespace runs (newlines included) collapsed to one space."""
    return " ".join(str(exc).split())


# Files any fast tokenizer can be loaded or converted from (besides tokenizer.json).
_TOKENIZER_FILE_SETS = (
    ("tokenizer.json",),
    ("vocab.json", "merges.txt"),
    ("vocab.txt",),
    ("tokenizer.model",),
    ("spiece.model",),
    ("sentencepiece.bpe.model",),
)
_JSON_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "config.json",
)


def _named(name_or_path: str, folder: Path) -> str:
    """``'name'`` or ``'name' (folder)`` where the name resolved elsewhere (a mirror)."""
    same = Path(name_or_path).expanduser() == folder
    return f"'{name_or_path}'" if same else f"'{name_or_path}' ('{folder}')"


def check_tokenizer_folder(name_or_path: str, folder: Path) -> None:
    """Raise UserError when ``folder`` holds no tokenizer files (tokenizer.json, or
    vocab.json + merges.txt, ...), before transformers fails with a long message."""
    names = {f.name for f in folder.iterdir() if f.is_file()}
    if any(all(n in names for n in files) for files in _TOKENIZER_FILE_SETS):
        return
    what = (
        "is an empty folder"
        if not any(folder.iterdir())
        else ("holds no tokenizer.json (nor vocab.json + merges.txt)")
    )
    raise TokenizerLoadError(
        f"Tokenizer {_named(name_or_path, folder)} {what}: pass the folder that holds "
        f"tokenizer.json (or vocab.json + merges.txt), or a Hub name such as 'gpt2'."
    )


def bad_json_file(folder: Path) -> TokenizerLoadError | None:
    """The error naming the first of ``folder``'s tokenizer JSON files that does not parse."""
    for name in _JSON_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            reason = f"{exc.msg} at line {exc.lineno} column {exc.colno}"
        except UnicodeDecodeError as exc:
            reason = f"not UTF-8 text at byte {exc.start}"
        else:
            continue
        return TokenizerLoadError(
            f"Tokenizer file '{path}' is not valid JSON ({reason}): restore it (download or "
            f"save the tokenizer again), or pass another tokenizer."
        )
    return None


def _load_checked(name_or_path: str, location: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
    except Exception as exc:
        bad = bad_json_file(Path(location)) if Path(location).is_dir() else None
        if bad is not None:
            raise bad from exc
        local = Path(location).is_dir()  # the user's files: any failure is theirs to fix
        if isinstance(exc, UserError) or not (local or isinstance(exc, OSError | ValueError)):
            raise
        raise TokenizerLoadError(
            f"Cannot load tokenizer '{name_or_path}' from '{location}': {one_line(exc)}. Pass "
            f"a Hub name or a folder holding tokenizer.json."
        ) from exc
    if not getattr(tokenizer, "is_fast", False):
        raise TokenizerLoadError(
            f"Tokenizer '{name_or_path}' has no fast (tokenizers) backend; save it with "
            f"tokenizer.json or pick a fast tokenizer."
        )
    if tokenizer.eos_token_id is None:
        raise TokenizerLoadError(
            f"Tokenizer '{name_or_path}' defines no EOS token; packing needs one after each text."
        )
    return tokenizer


@contextlib.contextmanager
def untruncated(tokenizer) -> Iterator[Any]:
    """The tokenizer's Rust backend with truncation and padding off; both restored after.

    GPT-2's tokenizer.json is saved with a 50-token truncation that the raw ``tokenizers``
    object applies silently (transformers resets it on each of its own calls). No copy is made.
    """
    backend = tokenizer.backend_tokenizer
    truncation, padding = backend.truncation, backend.padding
    backend.no_truncation()
    backend.no_padding()
    try:
        yield backend
    finally:
        if truncation:
            backend.enable_truncation(**truncation)
        if padding:
            backend.enable_padding(**padding)


def _batches(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(texts)
    while batch := list(islice(it, size)):
        yield batch


def iter_token_batches(
    texts: Iterable[str], tokenizer, batch_size: int = ENCODE_BATCH_TEXTS
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Encode ``texts`` in batches (Rust, all cores); yield ``(tokens, lengths)`` per batch.

    ``tokens`` holds the batch's ids with EOS after each text (stream dtype); ``lengths`` (int64)
    each text's token count including its EOS. No special token but EOS is added. Ids exist as
    Python ints for one batch at a time.
    """
    eos = tokenizer.eos_token_id
    dtype = token_dtype(len(tokenizer))
    with untruncated(tokenizer) as backend, ThreadPoolExecutor(max_workers=1) as encoder:

        def encode(batch: list[str]):
            backend.no_truncation()  # again: a transformers call in between may have set it
            return backend.encode_batch_fast(batch, add_special_tokens=False)

        # The Rust encoder (GIL released) works on batch k+1 while Python converts batch k.
        batches = _batches(texts, batch_size)
        pending = encoder.submit(encode, first) if (first := next(batches, None)) else None
        while pending is not None:
            encodings = pending.result()
            pending = encoder.submit(encode, nxt) if (nxt := next(batches, None)) else None
            ids = [e.ids for e in encodings]
            del encodings
            for text_ids in ids:
                text_ids.append(eos)
            lengths = np.fromiter(map(len, ids), np.int64, len(ids))
            yield np.fromiter(chain.from_iterable(ids), dtype, int(lengths.sum())), lengths


def offsets_from_lengths(lengths: Iterable[np.ndarray]) -> np.ndarray:
    """``[0, l0, l0 + l1, ...]`` (int64) from per-batch text lengths."""
    parts = list(lengths)
    flat = np.concatenate(parts) if parts else np.empty(0, np.int64)
    offsets = np.zeros(len(flat) + 1, dtype=np.int64)
    np.cumsum(flat, out=offsets[1:])
    return offsets


def encode_texts(
    texts: Iterable[str],
    tokenizer,
    *,
    batch_size: int = ENCODE_BATCH_TEXTS,
    show_progress: bool = False,
    desc: str = "tokenize",
) -> TokenStream:
    """Encode ``texts`` into one in-memory :class:`TokenStream` (see :func:`iter_token_batches`)."""
    chunks: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    total = len(texts) if hasattr(texts, "__len__") else None
    with tqdm(total=total, unit="text", desc=desc, disable=not show_progress, leave=False) as bar:
        for tokens, sizes in iter_token_batches(texts, tokenizer, batch_size):
            chunks.append(tokens)
            lengths.append(sizes)
            bar.update(len(sizes))
    dtype = token_dtype(len(tokenizer))
    tokens = np.concatenate(chunks) if chunks else np.empty(0, dtype=dtype)
    return TokenStream(tokens=tokens, doc_offsets=offsets_from_lengths(lengths))
