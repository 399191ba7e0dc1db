"""The original spec's notebook API, in one place: each domain of the default set as texts,
and texts packed into blocks.

``load_code_data``, ``load_math_data`` and ``load_prose_data`` read one domain of the default
domain set (:func:`~moe_emergence.data.domains.default_set`) through the one streaming loop
(:func:`~moe_emergence.data.sources.load_domain`), after checking the budget and the length
filter (plain errors). :func:`pack_sequences` tokenizes texts into one domain's blocks. The
datamodule (:class:`~moe_emergence.data.datamodule.MixedDomainDataModule`) is what training
uses; these serve notebooks and quick looks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

from moe_emergence.data.domains import default_set, domain_set
from moe_emergence.data.packing import block_view, check_block_size
from moe_emergence.data.sources import (
    MAX_EXAMPLE_CHARS,
    check_filters,
    check_size_mb,
    load_domain,
)
from moe_emergence.data.tokenize import encode_texts

Loaded = tuple[list[str], dict[str, Any]]


def _load_default(
    domain: str,
    max_size_mb: float,
    max_example_chars: int,
    min_example_chars: int | None,
    hub_mirror: str | None,
    show_progress: bool,
) -> Loaded:
    """:func:`load_domain` of ``domain`` of the default set, after checking the budget and the
    length filter (plain errors); ``min_example_chars`` (not None) replaces its sources'."""
    sources = domain_set(default_set())[domain]
    if min_example_chars is not None:
        sources = tuple(dataclasses.replace(s, min_chars=min_example_chars) for s in sources)
    check_size_mb(max_size_mb)
    check_filters(sources, max_example_chars, domain)
    return load_domain(domain, sources, max_size_mb, max_example_chars, hub_mirror, show_progress)


def _with_min_chars(domain: str, doc: str) -> Callable[..., Loaded]:
    """The loader of ``domain`` whose length filter's minimum can be replaced."""

    def load(
        max_size_mb: float = 10.0,
        max_example_chars: int = MAX_EXAMPLE_CHARS,
        min_example_chars: int | None = None,
        *,
        hub_mirror: str | None = None,
        show_progress: bool = True,
    ) -> Loaded:
        return _load_default(
            domain, max_size_mb, max_example_chars, min_example_chars, hub_mirror, show_progress
        )

    load.__name__ = load.__qualname__ = f"load_{domain}_data"
    load.__doc__ = doc
    return load


load_code_data = _with_min_chars(
    "code",
    """The default set's ``code`` (codeparrot-clean), ``min < len < max`` characters
    (``min_example_chars=None``: the set's own minimum).""",
)
load_prose_data = _with_min_chars(
    "prose",
    """The default set's ``prose`` (WikiText-103 raw lines), ``min < len < max`` characters
    (``min_example_chars=None``: the set's own minimum).""",
)


def load_math_data(
    max_size_mb: float = 10.0,
    max_example_chars: int = MAX_EXAMPLE_CHARS,
    *,
    hub_mirror: str | None = None,
    show_progress: bool = True,
) -> Loaded:
    """The default set's ``math``: GSM8K, then MATH's subjects round-robin if GSM8K ran out
    below the budget."""
    return _load_default("math", max_size_mb, max_example_chars, None, hub_mirror, show_progress)


class PackedBlocks(Sequence[dict[str, Any]]):
    """Blocks of one domain as a sequence of ``{"input_ids": LongTensor[block_size], "domain"}``.

    Backed by a single ``(n, block_size)`` array; each item is made on access.
    """

    def __init__(self, blocks: np.ndarray, domain: str | None) -> None:
        self.array = blocks
        self.domain = domain

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        row = self.array[index]
        return {"input_ids": torch.from_numpy(row.astype(np.int64)), "domain": self.domain}


def pack_sequences(
    texts: Iterable[str], tokenizer, block_size: int = 512, domain_label: str | None = None
) -> tuple[PackedBlocks, int]:
    """Tokenize, add EOS after every text, concatenate and cut into ``block_size`` blocks.

    Returns ``(blocks, total_tokens)``; ``total_tokens`` counts every token including EOS,
    before the tail is dropped.
    """
    check_block_size(block_size)  # before the tokenizing
    stream = encode_texts(texts, tokenizer)
    return PackedBlocks(block_view(stream.tokens, block_size), domain_label), stream.num_tokens


__all__ = ["PackedBlocks", "load_code_data", "load_math_data", "load_prose_data", "pack_sequences"]
