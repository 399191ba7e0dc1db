"""The LightningModule's pieces: LR schedule, routing statistics, collapse check, config checks."""

from __future__ import annotations

import csv
import functools

import pytest
import torch

from moe_emergence.model.module import MoEGPT2Module, warmup_cosine
from moe_emergence.model.routing import (
    collapsed_layers,
    count_assignments,
    router_entropy,
    write_routing_csv,
)


def test_warmup_then_cosine_to_the_floor():
    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, 100, 0.1) == pytest.approx(0.1)


def test_count_assignments_by_domain_and_expert():
    domains = torch.tensor([0, 0, 1, 2])
    indices = torch.tensor([[1, 0], [1, 2], [2, 2], [0, 1]])  # top-2
    counts = count_assignments(domains, indices, n_domains=3, n_experts=3)
    assert counts.tolist() == [[1, 2, 1], [0, 0, 2], [1, 1, 0]]


def test_router_entropy_bounds():
    assert router_entropy(torch.full((5, 4), 0.25)).item() == pytest.approx(
        torch.log(torch.tensor(4.0)).item()
    )
    assert router_entropy(torch.eye(4)).item() == pytest.approx(0.0, abs=1e-6)


def test_collapse_is_flagged_above_ninety_percent():
    healthy = torch.tensor([[50, 50], [40, 60]])
    collapsed = torch.tensor([[99, 1], [95, 5]])
    flagged = collapsed_layers({2: healthy, 3: collapsed})
    assert list(flagged) == [3] and flagged[3][0] == 0 and flagged[3][1] == pytest.approx(0.97)


def test_routing_csv_has_one_row_per_layer_and_domain(tmp_path):
    counts = {2: torch.tensor([[3, 1], [0, 4], [2, 2]]), 3: torch.tensor([[4, 0], [1, 3], [0, 0]])}
    path = write_routing_csv(counts, ["code", "math", "prose"], tmp_path / "routing.csv")
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["layer"], r["domain"]) for r in rows] == [
        ("2", "code"), ("2", "math"), ("2", "prose"), ("3", "code"), ("3", "math"), ("3", "prose")
    ]  # fmt: skip
    assert rows[0]["expert_0"] == "0.7500" and rows[0]["assignments"] == "4"
    assert rows[5]["expert_0"] == "0.0000"  # no tokens: zero shares, not NaN


def test_block_size_beyond_positions_is_refused_before_training():
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-3)
    kwargs = dict(optimizer=optimizer, pretrained=None, vocab_size=64, n_positions=32, n_embd=16,
                  n_layer=2, n_head=2)  # fmt: skip
    with pytest.raises(ValueError, match=r"data\.block_size=64 exceeds.*n_positions=32"):
        MoEGPT2Module(block_size=64, **kwargs)
    module = MoEGPT2Module(block_size=32, moe={"layers": [1], "n_experts": 2}, **kwargs)
    assert module.routing_counts()[1].shape == (3, 2)


def test_unknown_batch_domain_is_a_clear_error():
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-3)
    module = MoEGPT2Module(optimizer=optimizer, block_size=8, pretrained=None, vocab_size=32,
                           n_positions=8, n_embd=16, n_layer=1, n_head=2)  # fmt: skip
    batch = {"input_ids": torch.zeros(2, 8, dtype=torch.long), "domains": ["code", "poetry"]}
    with pytest.raises(ValueError, match="poetry"):
        module.training_step(batch, 0)


def test_resumed_routing_counts_are_kept_once_across_ranks():
    from types import SimpleNamespace

    optimizer = functools.partial(torch.optim.AdamW, lr=1e-3)
    kwargs = dict(optimizer=optimizer, block_size=8, pretrained=None, vocab_size=32,
                  n_positions=8, n_embd=16, n_layer=2, n_head=2,
                  moe={"layers": [1], "n_experts": 2})  # fmt: skip
    saved = {"state_dict": {"routing_counts_1": torch.tensor([[5, 1], [2, 2], [0, 3]])}}
    for rank, expected in ((0, [[5, 1], [2, 2], [0, 3]]), (1, [[0, 0], [0, 0], [0, 0]])):
        module = MoEGPT2Module(**kwargs)
        module._trainer = SimpleNamespace(global_rank=rank)
        checkpoint = {"state_dict": dict(saved["state_dict"])}
        module.on_load_checkpoint(checkpoint)
        assert checkpoint["state_dict"]["routing_counts_1"].tolist() == expected
