"""PackedMixedDomainDataset: labels, counts, balancing, seeded order, errors, collate."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from moe_emergence.data.dataset import PackedMixedDomainDataset, collate_packed

BLOCK = 8


def streams(code=400, math=160, prose=96):
    """Token streams whose values tell the domain (code < 1000 <= math < 2000 <= prose)."""
    return {
        "code": np.arange(code, dtype=np.uint16) % 1000,
        "math": 1000 + np.arange(math, dtype=np.uint16) % 1000,
        "prose": 2000 + np.arange(prose, dtype=np.uint16) % 1000,
    }


def domain_of(ids: torch.Tensor) -> str:
    return ("code", "math", "prose")[int(ids[0]) // 1000]


def test_items_carry_their_blocks_domain_and_shape():
    ds = PackedMixedDomainDataset.from_token_streams(streams(), block_size=BLOCK)
    for i in range(len(ds)):
        item = ds[i]
        assert item["input_ids"].shape == (BLOCK,) and item["input_ids"].dtype == torch.long
        assert item["domain"] == domain_of(item["input_ids"])


def test_counts_and_every_block_once_without_balancing():
    data = streams(code=403, math=160, prose=99)
    ds = PackedMixedDomainDataset.from_token_streams(data, block_size=BLOCK)
    assert ds.token_counts == {"code": 403, "math": 160, "prose": 99}
    assert ds.block_counts == {"code": 50, "math": 20, "prose": 12}
    assert ds.balanced_block_counts is None
    assert len(ds) == 82
    seen = sorted(tuple(ds[i]["input_ids"].tolist()) for i in range(len(ds)))
    expected = sorted(
        tuple(row) for s in data.values() for row in s[: len(s) // BLOCK * BLOCK].reshape(-1, BLOCK)
    )
    assert seen == expected


def test_balancing_keeps_smallest_count_of_distinct_blocks(caplog):
    with caplog.at_level(logging.INFO):
        ds = PackedMixedDomainDataset.from_token_streams(
            streams(), block_size=BLOCK, balance_tokens=True, seed=3
        )
    assert ds.balanced_block_counts == {"code": 12, "math": 12, "prose": 12}
    assert len(ds) == 36
    by_domain: dict[str, set] = {}
    for i in range(len(ds)):
        ids = ds[i]["input_ids"]
        by_domain.setdefault(ds[i]["domain"], set()).add(int(ids[0]))
    assert {d: len(v) for d, v in by_domain.items()} == {"code": 12, "math": 12, "prose": 12}
    assert max(by_domain["code"]) >= 12 * BLOCK  # a random subset, not the first 12 blocks
    assert "Balanced to 12 blocks per domain (36 total, ~288 tokens)" in caplog.messages


def test_imbalance_warning_is_logged(caplog):
    with caplog.at_level(logging.WARNING):
        PackedMixedDomainDataset.from_token_streams(streams(), block_size=BLOCK)
    assert caplog.messages[0].splitlines()[:3] == [
        "Warning: Token imbalance detected (>1.5x ratio)!",
        "  Smallest: prose with 96 tokens",
        "  Largest has 400 tokens",
    ]


def order(ds):
    return [tuple(ds[i]["input_ids"][:2].tolist()) for i in range(len(ds))]


@pytest.mark.parametrize("balance", [False, True])
def test_same_seed_same_order_other_seed_other_order(balance):
    make = lambda seed: PackedMixedDomainDataset.from_token_streams(  # noqa: E731
        streams(), block_size=BLOCK, balance_tokens=balance, seed=seed
    )
    assert order(make(7)) == order(make(7))
    assert order(make(7)) != order(make(8))


def test_order_does_not_depend_on_hash_seed():
    code = textwrap.dedent(
        """
        import hashlib
        import numpy as np
        from moe_emergence.data.dataset import PackedMixedDomainDataset as D
        names = ["code", "math", "prose"]
        s = {d: (np.arange(320) + k * 1000).astype(np.uint16) for k, d in enumerate(names)}
        ds = D.from_token_streams(s, block_size=8, balance_tokens=True, seed=5)
        ids = str([ds[i]["input_ids"].tolist() for i in range(len(ds))])
        print(hashlib.sha1(ids.encode()).hexdigest())
        """
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={"PYTHONHASHSEED": seed, "PATH": ""},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("0", "123")
    }
    assert len(outs) == 1


def test_domain_with_no_full_block_is_an_error():
    with pytest.raises(ValueError, match=r"'prose' has 5 tokens.*block_size=8"):
        PackedMixedDomainDataset.from_token_streams(streams(prose=5), block_size=BLOCK)
    with pytest.raises(ValueError, match=r"'prose' has no text: every text was filtered out"):
        PackedMixedDomainDataset.from_token_streams(streams(prose=0), block_size=BLOCK)


def test_spec_constructor_from_texts(tiny_tokenizer):
    texts = {d: [f"{d} text {i} with some words" for i in range(30)] for d in ("c", "m", "p")}
    ds = PackedMixedDomainDataset(
        texts["c"], texts["m"], texts["p"], tiny_tokenizer, block_size=16, seed=1
    )
    assert set(ds.token_counts) == {"code", "math", "prose"}
    assert len(ds) == sum(ds.block_counts.values())
    assert {ds[i]["domain"] for i in range(len(ds))} == {"code", "math", "prose"}


def test_collate_stacks_ids_and_keeps_labels():
    ds = PackedMixedDomainDataset.from_token_streams(streams(), block_size=BLOCK)
    batch = collate_packed([ds[i] for i in range(5)])
    assert batch["input_ids"].shape == (5, BLOCK) and batch["input_ids"].dtype == torch.long
    assert batch["domains"] == [domain_of(row) for row in batch["input_ids"]]
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_packed)
    assert next(iter(loader))["input_ids"].shape == (4, BLOCK)


def served_block_ids(ds, domain: str) -> list[int]:
    """Sorted indices into ``domain_blocks(domain)`` of the blocks ``ds`` serves."""
    ids = [ds[i]["input_ids"] for i in range(len(ds)) if ds[i]["domain"] == domain]
    return sorted(int(x[0]) % 1000 // BLOCK for x in ids)  # block k starts at token 8k


@pytest.mark.parametrize("balance", [False, True])
def test_kept_block_indices_are_the_served_blocks(balance):
    ds = PackedMixedDomainDataset.from_token_streams(
        streams(), block_size=BLOCK, balance_tokens=balance, seed=5
    )
    for domain in ds.domains:
        kept = ds.kept_block_indices(domain)
        assert kept.dtype == np.int64 and not kept.flags.writeable
        assert kept.tolist() == served_block_ids(ds, domain)  # sorted, each block once
        blocks = ds.domain_blocks(domain)
        served = sorted(
            tuple(ds[i]["input_ids"].tolist()) for i in range(len(ds)) if ds[i]["domain"] == domain
        )
        assert sorted(tuple(row) for row in blocks[kept].tolist()) == served
        if balance:
            assert len(kept) == ds.balanced_block_counts[domain] == 12
        else:
            assert kept.tolist() == list(range(ds.block_counts[domain]))
    if balance:  # the larger domains keep a strict subset
        assert len(ds.kept_block_indices("code")) < ds.block_counts["code"] == 50
