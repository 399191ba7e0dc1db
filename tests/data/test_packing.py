"""Packing exactness, the report lines, balancing subsets and the shuffled order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_emergence.data.legacy import pack_sequences
from moe_emergence.data.packing import (
    balance_line,
    balanced_subsets,
    block_view,
    format_report,
    imbalance_warning,
    shuffled_order,
)
from moe_emergence.data.tokenize import encode_texts


def test_block_view_drops_tail_and_copies_nothing():
    tokens = np.arange(10, dtype=np.uint16)
    blocks = block_view(tokens, 4)
    assert blocks.shape == (2, 4)
    assert np.shares_memory(blocks, tokens)
    assert blocks.ravel().tolist() == list(range(8))


@pytest.mark.parametrize("bad", [0, 1, -3, 2.5, True])
def test_block_size_below_two_is_rejected(bad):
    with pytest.raises(ValueError, match="block_size"):
        block_view(np.arange(10), bad)


def test_pack_sequences_keeps_every_token_but_the_tail(tiny_tokenizer):
    texts = [f"sample text number {i} " * (i + 1) for i in range(12)]
    blocks, total = pack_sequences(texts, tiny_tokenizer, block_size=16, domain_label="prose")
    stream = encode_texts(texts, tiny_tokenizer).tokens
    eos = tiny_tokenizer.eos_token_id
    per_text = [len(tiny_tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts]
    assert total == sum(per_text) == len(stream)
    assert len(blocks) == total // 16
    joined = torch.cat([b["input_ids"] for b in blocks])
    assert joined.tolist() == stream[: len(blocks) * 16].tolist()
    assert all(b["input_ids"].shape == (16,) and b["input_ids"].dtype == torch.long for b in blocks)
    assert {b["domain"] for b in blocks} == {"prose"}
    # EOS closes every text: its positions are the running text lengths.
    assert np.flatnonzero(stream == eos).tolist() == (np.cumsum(per_text) - 1).tolist()


def test_packed_blocks_are_views_of_one_array(tiny_tokenizer):
    blocks, _ = pack_sequences(["some words here"] * 20, tiny_tokenizer, block_size=8)
    assert blocks.array.ndim == 2 and blocks.array.shape[1] == 8
    assert blocks.array.base is not None  # a reshape view, not one object per block
    assert len(blocks[1:3]) == 2


def test_imbalance_warning_exact_lines():
    text = imbalance_warning({"code": 223_025, "math": 150_000, "prose": 112_650}, True)
    assert text == (
        "Warning: Token imbalance detected (>1.5x ratio)!\n"
        "  Smallest: prose with 112,650 tokens\n"
        "  Largest has 223,025 tokens"
    )


def test_imbalance_hint_only_when_not_balancing():
    counts = {"code": 300, "math": 100}
    hint = "--balance-tokens (data.balance_tokens=true)"
    assert hint in imbalance_warning(counts, balancing=False)
    assert "--balance-tokens" not in imbalance_warning(counts, balancing=True)


def test_no_warning_at_or_below_ratio():
    assert imbalance_warning({"a": 150, "b": 100}, False) is None
    assert imbalance_warning({"a": 151, "b": 100}, False) is not None


def test_balance_line_exact():
    assert balance_line(440, 3, 256) == (
        "Balanced to 440 blocks per domain (1320 total, ~337,920 tokens)"
    )


def test_report_table_lists_each_domain():
    table = format_report(
        {"code": {"num_texts": 3, "total_chars": 1234, "tokens": 5678, "blocks": 22}}
    )
    header, _, row = table.splitlines()
    assert header.split() == ["domain", "texts", "chars", "tokens", "blocks"]
    assert row.split() == ["code", "3", "1,234", "5,678", "22"]


def test_balanced_subsets_are_distinct_sized_to_the_smallest_and_random():
    counts = {"code": 1000, "math": 300, "prose": 50}
    subsets = balanced_subsets(counts, np.random.default_rng(0))
    for domain, kept in subsets.items():
        assert len(kept) == 50
        assert len(np.unique(kept)) == 50  # never oversampled
        assert kept.min() >= 0 and kept.max() < counts[domain]
    assert subsets["prose"].tolist() == list(range(50))
    assert subsets["code"].max() > 500  # not the first N blocks
    other = balanced_subsets(counts, np.random.default_rng(1))
    assert other["code"].tolist() != subsets["code"].tolist()


def test_shuffled_order_is_a_permutation_of_all_pairs():
    kept = [np.arange(5), np.array([1, 3, 7])]
    domains, blocks = shuffled_order(kept, np.random.default_rng(0))
    pairs = sorted(zip(domains.tolist(), blocks.tolist(), strict=True))
    assert pairs == [(0, i) for i in range(5)] + [(1, 1), (1, 3), (1, 7)]
