"""The LightningModule's pieces: LR schedule, train mode, config checks, old checkpoints."""

from __future__ import annotations

import pytest
import torch
from helpers.moe import tiny_module

from moe_emergence.model.module import warmup_cosine


def test_warmup_then_cosine_to_the_floor():
    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, 100, 0.1) == pytest.approx(0.1)


def test_block_size_beyond_positions_is_refused_before_training():
    with pytest.raises(ValueError, match=r"data\.block_size=64 exceeds.*n_positions=32"):
        tiny_module(block_size=64, vocab_size=64, n_positions=32, moe=None)
    module = tiny_module(block_size=32, vocab_size=64, n_positions=32)
    assert all(m.training for m in module.modules())
    # Routing counters are never registered buffers (DDP would broadcast rank 0's).
    assert not [name for name, _ in module.named_buffers() if "routing" in name]


def test_unknown_batch_domain_is_a_clear_error():
    module = tiny_module(n_layer=1, moe=None)
    batch = {"input_ids": torch.zeros(2, 8, dtype=torch.long), "domains": ["code", "poetry"]}
    with pytest.raises(ValueError, match="poetry"):
        module.training_step(batch, 0)


def test_domains_are_required():
    with pytest.raises(ValueError, match="needs domains"):
        tiny_module(n_layer=1, moe=None, domains=None)
