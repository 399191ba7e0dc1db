"""What ``analyze`` keeps of a run beyond each checkpoint's scores: the identity of its step-0
model (runs that share it share their step 0, which the summary counts once) and each run's
probe interval of its NMI change from step 0, the same documents resampled for both
checkpoints (``paired_change_interval``: the scores module's, or evaluate's stand-in until it
lands)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.moe import tiny_module

from moe_emergence.analysis.evaluate import (
    change_intervals,
    initial_model_key,
    paired_change_interval,
)
from moe_emergence.analysis.probe import make_probe, route_blocks
from moe_emergence.analysis.scores import contingency, nmi


def _probe(n_domains: int = 3, docs: int = 6, blocks: int = 2, block_size: int = 8):
    """``docs`` documents of ``blocks`` blocks per domain, random token ids."""
    rng = np.random.default_rng(0)
    n = n_domains * docs * blocks
    ids = rng.integers(0, 32, size=(n, block_size))
    block_domains = np.repeat(np.arange(n_domains), docs * blocks)
    texts = np.repeat(
        np.tile(np.repeat(np.arange(docs), blocks), n_domains)[:, None], block_size, 1
    )
    return make_probe(ids, block_domains, ("code", "math", "prose"), "held_out", texts)


def _experts(module, probe) -> dict[int, np.ndarray]:
    routed = route_blocks(module.model, torch.from_numpy(probe.input_ids), 8)
    return {layer: e.numpy() for layer, e in routed.experts.items()}


def test_top1_and_top2_of_one_seed_share_their_initial_model_and_others_do_not():
    probe = _probe()
    keys = {}
    for name, top_k, seed in (("top1", 1, 0), ("top2", 2, 0), ("other_seed", 1, 1)):
        torch.manual_seed(seed)
        module = tiny_module(moe={"layers": [1], "n_experts": 4, "top_k": top_k})
        keys[name] = initial_model_key(module.model, _experts(module, probe))
    assert keys["top1"] == keys["top2"]  # same weights, same first choice
    assert keys["other_seed"] != keys["top1"]

    torch.manual_seed(0)
    module = tiny_module(moe={"layers": [1], "n_experts": 4, "top_k": 1})
    experts = _experts(module, probe)
    assert initial_model_key(module.model, experts) == keys["top1"]
    rerouted = {1: (experts[1] + 1) % 4}  # a router that routes otherwise (hash, domain)
    assert initial_model_key(module.model, rerouted) != keys["top1"]
    with torch.no_grad():
        next(module.model.parameters()).view(-1)[0] += 1e-6
    assert initial_model_key(module.model, experts) != keys["top1"]


def _first_nmi(probe, experts, n_experts: int) -> float:
    domains = np.repeat(probe.block_domains, probe.input_ids.shape[1])
    return nmi(contingency(domains, experts.reshape(domains.size, -1)[:, :1], 3, n_experts))


def test_the_paired_change_interval_resamples_the_same_documents_for_both():
    probe = _probe(docs=10)
    rng = np.random.default_rng(1)
    shape = probe.input_ids.shape
    before = rng.integers(0, 4, size=(*shape, 1))  # random routing
    # after: each document leans to its domain's expert (3 of 4 tokens)
    lean = rng.random(shape) < 0.75
    after = np.where(lean, probe.block_domains[:, None], rng.integers(0, 4, size=shape))[..., None]
    args = (probe.input_ids, probe.token_docs, probe.doc_domains)
    low, high = paired_change_interval(*args, before, after, 3, 4, 199, seed=3)
    change = _first_nmi(probe, after, 4) - _first_nmi(probe, before, 4)
    assert low < change < high and low > 0 and high - low < 0.5
    assert (low, high) == paired_change_interval(*args, before, after, 3, 4, 199, seed=3)
    # no change: every resample gives 0 (the pairing: the same documents for both)
    assert paired_change_interval(*args, after, after, 3, 4, 99, 0) == pytest.approx((0, 0))


def test_change_intervals_per_layer_in_both_checkpoints():
    probe = _probe()
    rng = np.random.default_rng(2)
    shape = (*probe.input_ids.shape, 1)
    before = {1: rng.integers(0, 2, size=shape), 2: rng.integers(0, 2, size=shape)}
    after = {1: rng.integers(0, 2, size=shape)}
    settings = {"null_permutations": 49, "null_seed": 5}
    got = change_intervals(probe, before, after, 2, settings)
    assert list(got) == [1]
    low, high = got[1]
    assert low <= high and (low, high) == pytest.approx(
        paired_change_interval(
            probe.input_ids, probe.token_docs, probe.doc_domains, before[1], after[1], 3, 2, 49, 5
        )
    )
