"""The packed, shuffled, optionally balanced multi-domain dataset and its collate function."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from moe_emergence.data.checks import SettingError
from moe_emergence.data.packing import (
    balance_line,
    balanced_subsets,
    block_view,
    check_block_size,
    imbalance_warning,
    shuffled_order,
)
from moe_emergence.data.tokenize import TokenStream, encode_texts

log = logging.getLogger(__name__)


class PackedMixedDomainDataset(Dataset):
    """Fixed-length blocks from every domain, shuffled together with ``seed``.

    ``ds[i] -> {"input_ids": LongTensor[block_size], "domain": str}``.
    ``token_counts[d]``: domain d's tokens (EOS included) before chunking;
    ``block_counts[d]``: its full blocks; ``balanced_block_counts[d]``: blocks kept when
    ``balance_tokens`` (the smallest domain's block count), else None.
    The order depends only on the seed and the data (not on process or PYTHONHASHSEED).
    The constructor takes the original spec's three domains (code, math, prose);
    :meth:`from_token_streams` any domain set.
    """

    def __init__(
        self,
        code_texts: Sequence[str],
        math_texts: Sequence[str],
        prose_texts: Sequence[str],
        tokenizer,
        block_size: int = 512,
        balance_tokens: bool = False,
        seed: int = 42,
    ) -> None:
        check_block_size(block_size)  # before the tokenizing
        texts = {"code": code_texts, "math": math_texts, "prose": prose_texts}
        streams = {d: encode_texts(t, tokenizer, desc=f"tokenize {d}") for d, t in texts.items()}
        self._pack(streams, block_size, balance_tokens, seed)

    @classmethod
    def from_token_streams(
        cls,
        streams: Mapping[str, TokenStream | np.ndarray],
        block_size: int = 512,
        balance_tokens: bool = False,
        seed: int = 42,
        warn_imbalance: bool = True,
    ) -> PackedMixedDomainDataset:
        """Build from already tokenized streams (domain -> 1-D token array), in mapping order.

        ``warn_imbalance=False``: no imbalance warning (a held-out set is never balanced)."""
        dataset = cls.__new__(cls)
        dataset._pack(streams, block_size, balance_tokens, seed, warn_imbalance)
        return dataset

    def _pack(
        self,
        streams: Mapping[str, TokenStream | np.ndarray],
        block_size: int,
        balance_tokens: bool,
        seed: int,
        warn_imbalance: bool = True,
    ) -> None:
        if not streams:
            raise ValueError("No domains given: pass at least one token stream.")
        tokens = {
            d: s.tokens if isinstance(s, TokenStream) else np.asarray(s) for d, s in streams.items()
        }
        self.domains: tuple[str, ...] = tuple(tokens)
        self.block_size = block_size
        self.balance_tokens = bool(balance_tokens)
        self.seed = seed
        self.token_counts = {d: int(t.shape[0]) for d, t in tokens.items()}
        self._doc_offsets = [
            s.doc_offsets if isinstance(s, TokenStream) else None for s in streams.values()
        ]
        self._blocks = [block_view(tokens[d], block_size) for d in self.domains]
        self.block_counts = {
            d: int(b.shape[0]) for d, b in zip(self.domains, self._blocks, strict=True)
        }
        for domain, count in self.block_counts.items():
            if count == 0:
                tokens = self.token_counts[domain]
                if tokens == 0:
                    raise SettingError(
                        f"Domain '{domain}' has no text: every text was filtered out or the "
                        f"source is empty; check its source, or raise max_example_chars (the "
                        f"texts must be shorter than it).",
                        "max_example_chars",
                    )
                raise SettingError(
                    f"Domain '{domain}' has {tokens:,} tokens, less than one block of "
                    f"block_size={block_size}: use a block size of at most {tokens:,}, or get "
                    f"more text (a larger size_mb or max_example_chars).",
                    "block_size",
                )

        warning = imbalance_warning(self.token_counts, self.balance_tokens)
        if warning and warn_imbalance:
            log.warning(warning)
        rng = np.random.default_rng(seed)
        if self.balance_tokens:
            subsets = balanced_subsets(self.block_counts, rng)
            kept = [np.asarray(subsets[d], dtype=np.int64) for d in self.domains]
            self.balanced_block_counts: dict[str, int] | None = {
                d: len(k) for d, k in zip(self.domains, kept, strict=True)
            }
            log.info(balance_line(len(kept[0]), len(kept), block_size))
        else:
            kept = [np.arange(len(b), dtype=np.int64) for b in self._blocks]
            self.balanced_block_counts = None
        for k in kept:
            k.flags.writeable = False
        self._kept = kept
        self._order_domain, self._order_block = shuffled_order(kept, rng)

    def __len__(self) -> int:
        return int(self._order_block.shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        d = int(self._order_domain[index])
        row = self._blocks[d][self._order_block[index]]
        return {"input_ids": torch.from_numpy(row.astype(np.int64)), "domain": self.domains[d]}

    def domain_blocks(self, domain: str) -> np.ndarray:
        """All of ``domain``'s full blocks, ``(block_counts[domain], block_size)``, before
        balancing (a view of its token stream)."""
        return self._blocks[self.domains.index(domain)]

    def block_texts(self, domain: str, blocks: np.ndarray) -> np.ndarray | None:
        """int64 ``[len(blocks), block_size]``: for each token of ``domain_blocks(domain)[blocks]``
        the index of the text it comes from in the domain's stream; None when the dataset was
        built from bare token arrays (no text offsets)."""
        offsets = self._doc_offsets[self.domains.index(domain)]
        if offsets is None:
            return None
        starts = np.asarray(blocks, dtype=np.int64)[:, None] * self.block_size
        positions = starts + np.arange(self.block_size, dtype=np.int64)
        return np.searchsorted(np.asarray(offsets), positions, side="right") - 1

    def kept_block_indices(self, domain: str) -> np.ndarray:
        """Sorted, read-only int64 indices into ``domain_blocks(domain)`` of the blocks this
        dataset serves: all of them, or the seeded balanced subset when ``balance_tokens``
        (length ``balanced_block_counts[domain]``)."""
        return self._kept[self.domains.index(domain)]


def collate_packed(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``{"input_ids": LongTensor[B, block_size], "domains": list[str]}``."""
    if not batch:
        raise ValueError("collate_packed got an empty batch.")
    return {
        "input_ids": torch.stack([item["input_ids"] for item in batch]),
        "domains": [item["domain"] for item in batch],
    }
