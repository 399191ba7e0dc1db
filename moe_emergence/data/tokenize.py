"""Tokenizer loading and batched encoding into one flat token stream per domain.

A stream is ``tokens`` (1-D, uint16 while the vocab has < 65,536 entries, else uint32) holding
every text's ids followed by EOS, plus ``doc_offsets`` (int64, ``num_texts + 1`` entries): text i
with its EOS is ``tokens[doc_offsets[i]:doc_offsets[i + 1]]``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import numpy as np
from tqdm.auto import tqdm

from moe_emergence.data.hub import resolve_repo

log = logging.getLogger(__name__)

DEFAULT_TOKENIZER = "gpt2"
ENCODE_BATCH_TEXTS = 512


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
    """A fast (Rust-backed) tokenizer by Hub name, mirror or local folder; it must define EOS."""
    from transformers import AutoTokenizer

    location = resolve_repo(name_or_path, hub_mirror, kind="model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
    except OSError as exc:
        raise OSError(
            f"Cannot load tokenizer '{name_or_path}' from '{location}': {exc}. Pass --tokenizer "
            f"with a Hub name or a folder holding tokenizer.json (config: data.tokenizer)."
        ) from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"Tokenizer '{name_or_path}' has no fast (tokenizers) backend; save it with "
            f"tokenizer.json or pick a fast tokenizer (--tokenizer)."
        )
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"Tokenizer '{name_or_path}' defines no EOS token; packing needs one after each text."
        )
    return tokenizer


def _untruncated_backend(tokenizer):
    """A copy of the Rust tokenizer with truncation and padding off.

    GPT-2's tokenizer.json is saved with a 50-token truncation that the raw ``tokenizers``
    object applies silently; transformers overrides it per call, we must do it ourselves.
    """
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    return backend


def _batches(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(texts)
    while batch := list(islice(it, size)):
        yield batch


def encode_texts(
    texts: Iterable[str],
    tokenizer,
    *,
    batch_size: int = ENCODE_BATCH_TEXTS,
    show_progress: bool = False,
    desc: str = "tokenize",
) -> TokenStream:
    """Encode ``texts`` in batches (Rust, all cores), appending EOS after each text.

    No special tokens other than EOS are added. Ids live as Python ints one batch at a time.
    """
    backend = _untruncated_backend(tokenizer)
    eos = tokenizer.eos_token_id
    dtype = token_dtype(len(tokenizer))
    chunks: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    total = len(texts) if hasattr(texts, "__len__") else None
    with tqdm(total=total, unit="text", desc=desc, disable=not show_progress, leave=False) as bar:
        for batch in _batches(texts, batch_size):
            encodings = backend.encode_batch_fast(batch, add_special_tokens=False)
            sizes = np.fromiter((len(e.ids) + 1 for e in encodings), np.int64, len(encodings))
            flat = np.empty(int(sizes.sum()), dtype=dtype)
            ends = np.cumsum(sizes)
            for encoding, end in zip(encodings, ends, strict=True):
                ids = encoding.ids
                flat[end - 1 - len(ids) : end - 1] = ids
            flat[ends - 1] = eos
            chunks.append(flat)
            lengths.append(sizes)
            bar.update(len(batch))
    tokens = np.concatenate(chunks) if chunks else np.empty(0, dtype=dtype)
    offsets = np.zeros(sum(len(s) for s in lengths) + 1, dtype=np.int64)
    if lengths:
        np.cumsum(np.concatenate(lengths), out=offsets[1:])
    return TokenStream(tokens=tokens, doc_offsets=offsets)
