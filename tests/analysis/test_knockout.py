"""Knock-out by domain: the context that removes one expert of one MoE layer reroutes exactly
that expert's tokens to their next choice and leaves the layer as it was; on a model where one
expert alone serves code, removing it costs code and not the others, more than a load-matched
control; the readings' document intervals; the summary's rows and their Holm family."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.moe import expert_forward, random_experts, tiny_module

from moe_emergence.analysis.evaluate import block_losses
from moe_emergence.analysis.knockout import (
    held_out_pass,
    knockout_effects,
    knockout_rows,
    preferred_and_control,
    ratio_interval,
    resample_weights,
)
from moe_emergence.analysis.probe import make_probe, route_blocks
from moe_emergence.analysis.results import CheckpointResult, KnockoutEffect, RunResult
from moe_emergence.analysis.summary import KNOCKOUT_FAMILY, knockout_metric, summarize
from moe_emergence.analysis.summary_files import render_markdown
from moe_emergence.model.gpt2_moe import routing_domains
from moe_emergence.model.moe import MoELayer, knocked_out

E, D, H = 4, 16, 32  # widths multiples of 8: the grouped GEMM takes them


def _layer(top_k: int, router: str = "learned", dispatch: str = "loop") -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(random_experts(E, D, H), top_k, noise_std=0.0, dispatch=dispatch)
    if router != "learned":
        layer = MoELayer(
            random_experts(E, D, H), top_k, noise_std=0.0, router=router, hash_key=(7, 3)
        )
    return layer.eval()


@pytest.mark.parametrize("top_k", [1, 2])
@torch.no_grad()
def test_knock_out_reroutes_exactly_the_removed_experts_tokens_and_restores_the_layer(top_k):
    layer = _layer(top_k)
    x = torch.randn(3, 20, D)
    intact = layer(x)
    chosen, logits = layer.last_indices.clone(), layer.last_logits.clone()
    removed = int(chosen[:, 0].mode().values)  # the most used first choice
    with knocked_out(layer, removed):
        out = layer(x)
        rerouted = layer.last_indices
        assert torch.equal(layer.last_logits, logits)  # the clean logits are reported as ever
    held = (chosen == removed).any(dim=1)
    assert held.any() and (~held).any()
    assert torch.equal(rerouted[~held], chosen[~held])  # every other token keeps its experts
    assert not (rerouted == removed).any()
    masked = logits.index_fill(1, torch.tensor([removed]), -math.inf)
    top, expected = masked.topk(top_k, dim=1)
    assert torch.equal(rerouted, expected)  # the next choice, best first
    # the output: the new experts, weights renormalised over them (top-1: 1.0)
    weights = top.softmax(dim=1) if top_k > 1 else torch.ones(len(top), 1)
    flat = x.reshape(-1, D)
    reference = torch.zeros_like(flat)
    for j in range(top_k):
        for e in range(E):
            rows = expected[:, j] == e
            reference[rows] += weights[rows, j : j + 1] * expert_forward(
                layer.experts, e, flat[rows]
            )
    torch.testing.assert_close(out.reshape(-1, D), reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.reshape(-1, D)[~held], intact.reshape(-1, D)[~held])
    assert not torch.allclose(out.reshape(-1, D)[held], intact.reshape(-1, D)[held])
    # afterwards: the layer as before, bitwise
    assert layer.router.knocked_out is None and "knocked_out" not in vars(layer.router)
    assert torch.equal(layer(x), intact)


@torch.no_grad()
def test_loop_and_grouped_dispatch_agree_under_knock_out():
    x = torch.randn(2, 24, D)
    outs = {}
    for dispatch in ("loop", "grouped"):
        layer = _layer(2, dispatch=dispatch)
        with knocked_out(layer, 1):
            outs[dispatch] = (layer(x), layer.last_indices.clone())
    assert torch.equal(outs["loop"][1], outs["grouped"][1])
    torch.testing.assert_close(outs["loop"][0], outs["grouped"][0], rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_a_fixed_router_gives_the_removed_experts_tokens_to_the_next_free_expert():
    layer = _layer(2, router="hash")
    ids = torch.arange(40).view(2, 20)
    x = torch.randn(2, 20, D)
    layer.token_ids = ids
    layer(x)
    chosen = layer.last_indices.clone()  # h, h + 1 (mod 4)
    with knocked_out(layer, 2):
        layer.token_ids = ids
        layer(x)
        rerouted = layer.last_indices
    first = chosen[:, 0]
    # h = 2: {2, 3} -> {0, 3} (3 is held, 0 is next); h = 1: {1, 2} -> {1, 3}
    assert torch.equal(
        rerouted[first == 2], torch.tensor([[0, 3]]).expand(int((first == 2).sum()), 2)
    )
    assert torch.equal(
        rerouted[first == 1], torch.tensor([[1, 3]]).expand(int((first == 1).sum()), 2)
    )
    keep = (chosen != 2).all(dim=1)
    assert torch.equal(rerouted[keep], chosen[keep])


def test_knock_out_refuses_a_bad_expert_a_second_knock_out_and_a_layer_using_every_expert():
    layer = _layer(1)
    with pytest.raises(ValueError, match=r"not in 0\.\.3"), knocked_out(layer, 4):
        pass
    with (
        knocked_out(layer, 0),
        pytest.raises(RuntimeError, match="already knocked out"),
        knocked_out(layer, 1),
    ):
        pass
    assert layer.router.knocked_out is None
    every = MoELayer(random_experts(2, D, H), 2, noise_std=0.0)
    with pytest.raises(ValueError, match="uses every expert"), knocked_out(every, 0):
        pass


# ----------------------------------------------------------------------------- a constructed model


RULES = ((3, 1), (1, 5), (7, 2))  # domain d's text: next token = (a * t + b) mod 32


def _blocks(seed: int, per_domain: int, length: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Blocks [3 * per_domain, length] of code, math and prose (each its own :data:`RULES`
    from a random first token) and their domains."""
    rng = np.random.default_rng(seed)
    ids, domains = [], []
    for d, (a, b) in enumerate(RULES):
        t = rng.integers(0, 32, size=per_domain)
        columns = [t]
        for _ in range(length - 1):
            t = (a * t + b) % 32
            columns.append(t)
        ids.append(np.stack(columns, axis=1))
        domains.append(np.full(per_domain, d))
    return np.concatenate(ids), np.concatenate(domains)


def _probe(docs: int = 8, blocks: int = 2):
    """``docs`` held-out documents of ``blocks`` blocks per domain."""
    ids, domains = _blocks(1, docs * blocks)
    texts = np.repeat(np.tile(np.repeat(np.arange(docs), blocks), 3)[:, None], ids.shape[1], 1)
    return make_probe(ids, domains, ("code", "math", "prose"), "held_out", texts)


@pytest.fixture(scope="module")
def code_expert_model():
    """A domain router (code -> expert 0, math -> 1, prose -> 2; expert 3 unused) trained 30
    steps (3 s) on texts whose next token follows a rule of their domain: only the domain's
    expert knows which rule, so expert 0 alone serves code."""
    torch.manual_seed(0)
    moe = {"layers": [1], "n_experts": 4, "router": "domain", "noise_std": 0}
    model = tiny_module(moe=moe, n_embd=32).model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    for step in range(30):
        ids, domains = (torch.from_numpy(a) for a in _blocks(100 + step, 16))
        with routing_domains(model, domains):
            loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_removing_codes_expert_costs_code_not_the_others_and_more_than_a_control(
    code_expert_model,
):
    probe = _probe()
    effects = knockout_effects(
        code_expert_model, probe, 8, torch.device("cpu"), n_draws=199, seed=1
    )
    assert len(effects) == 1 * 3 * 3  # layer x removed x measured
    by = {(e.removed, e.measured): e for e in effects}
    code = by["code", "code"]
    assert (code.preferred, code.preferred_share) == (0, 1.0)
    assert code.control == 1  # equal loads: the lower index of those code does not use
    assert code.preferred_change > 1  # code's tokens now on math's expert
    assert code.control_change == 0  # math's expert gone: code's tokens never went there
    assert code.difference == pytest.approx(code.preferred_change - code.control_change)
    for (low, high), value in (
        (code.preferred_interval, code.preferred_change),
        (code.difference_interval, code.difference),
    ):
        assert 0 < low < value < high
    for other in ("math", "prose"):  # their blocks never touch expert 0: bitwise the same
        assert by["code", other].preferred_change == 0
    assert by["code", "math"].control_change > 1  # the control was math's own expert
    assert by["prose", "prose"].preferred_change > 1
    # the intact loss is analyze's held-out loss
    routed = route_blocks(
        code_expert_model,
        torch.from_numpy(probe.input_ids),
        8,
        with_loss=True,
        block_domains=torch.from_numpy(probe.block_domains),
    )
    held = block_losses(probe, routed.loss_sum.numpy())
    for e in effects:
        assert e.intact == pytest.approx(held[e.measured].loss, rel=1e-9)
        assert e.tokens == held[e.measured].tokens
    rows = knockout_rows(10, effects)
    assert len(rows) == 3 * len(effects)
    assert {r["role"] for r in rows} == {"preferred", "control", "difference"}


@pytest.mark.parametrize(
    ("router", "top_k"), [("learned", 2), ("frozen", 1), ("hash", 2), ("hash", 1)]
)
def test_every_router_kind_reads_a_finite_knock_out(router, top_k):
    """The hash router takes the token ids from the model's pre-hook, the frozen and learned
    routers their masked logits; top-2 keeps a next choice besides the one removed."""
    torch.manual_seed(0)
    moe = {"layers": [1], "n_experts": 4, "top_k": top_k, "router": router, "init_noise": 0.5}
    if router != "learned":
        moe["noise_std"] = 0
    model = tiny_module(moe=moe).model.eval()
    effects = knockout_effects(model, _probe(docs=3), 6, torch.device("cpu"), n_draws=49)
    assert len(effects) == 9
    for e in effects:
        assert e.preferred != e.control and 0 < e.preferred_share <= 1
        values = (e.intact, e.preferred_change, e.control_change, *e.difference_interval)
        assert all(math.isfinite(v) for v in values)
    assert any(e.preferred_change != 0 for e in effects)  # removing an expert changes a loss


def test_the_document_losses_sum_to_the_blocks_losses(code_expert_model):
    probe = _probe(docs=3)
    doc_loss, first = held_out_pass(code_expert_model, probe, 5, torch.device("cpu"))
    routed = route_blocks(
        code_expert_model,
        torch.from_numpy(probe.input_ids),
        5,
        with_loss=True,
        block_domains=torch.from_numpy(probe.block_domains),
    )
    assert doc_loss.sum() == pytest.approx(float(routed.loss_sum.sum()), rel=1e-12)
    assert np.array_equal(first[1], routed.experts[1][..., 0].numpy())


def test_preferred_and_control_experts():
    # domain 0 mostly on 2; loads: e0 0.25, e1 0.25, e2 0.35, e3 0.15
    first = np.array([[2] * 7 + [0] * 3, [1] * 5 + [0] * 2 + [3] * 3])
    preferred, control, shares = preferred_and_control(
        first[:, :, None][..., 0], np.array([0, 1]), 2, 4
    )
    assert preferred.tolist() == [2, 1]
    # domain 0: load of 2 is 0.35; closest other: e0 / e1 (0.25): e1 (domain 0 uses it less)
    # domain 1: load of 1 is 0.25; closest: e0 (0.25)
    assert control.tolist() == [1, 0]
    assert shares[0].tolist() == [0.3, 0.0, 0.7, 0.0]


def test_the_ratio_interval_covers_a_known_mean_change():
    """Documents of random size whose per-token loss change is 0.1 + noise: the studentised
    interval covers the true 0.1 in about 95% of simulated probes."""
    rng = np.random.default_rng(0)
    hits = 0
    trials = 200
    for _ in range(trials):
        n = rng.integers(20, 200, size=30).astype(np.float64)
        y = n * 0.1 + rng.normal(0, 1, size=30) * np.sqrt(n) * 0.5
        low, high = ratio_interval(y, n, resample_weights(30, 299, int(rng.integers(1 << 30))))
        hits += low < 0.1 < high
    assert 0.9 <= hits / trials <= 0.99
    assert all(math.isnan(v) for v in ratio_interval(np.ones(1), np.ones(1), np.ones((5, 1))))


# ----------------------------------------------------------------------------- summary


def _effect(layer, removed, measured, change, control) -> KnockoutEffect:
    return KnockoutEffect(
        layer=layer,
        removed=removed,
        measured=measured,
        preferred=0,
        control=1,
        preferred_share=0.8,
        control_share=0.1,
        intact=2.0,
        preferred_change=change,
        control_change=control,
        difference=change - control,
        preferred_interval=(change - 0.1, change + 0.1),
        control_interval=(control - 0.1, control + 0.1),
        difference_interval=(change - control - 0.1, change - control + 0.1),
        tokens=100,
    )


def _run(group: str, seed: int, own: float) -> RunResult:
    domains = ("code", "math")
    effects = [
        _effect(layer, r, m, own + seed * 0.01 if r == m else 0.01 * seed, 0.02)
        for layer in (2, 3)
        for r in domains
        for m in domains
    ]
    return RunResult(
        name=f"{group}-{seed}",
        run_dir=Path("/nowhere"),
        group=group,
        seed=seed,
        overrides=group.split(","),
        moe=True,
        domains=domains,
        layers=[2, 3],
        n_experts=4,
        probe="held_out",
        probe_blocks={"code": 4, "math": 4},
        checkpoints=[CheckpointResult(100)],
        knockout=effects,
    )


def test_summary_rows_test_the_own_domain_excess_in_one_holm_family():
    top1, domain = "condition=top1", "condition=domain_router"
    runs = [_run(top1, s, 0.5) for s in (1, 2, 3)] + [_run(domain, s, 2.0) for s in (1, 2, 3)]
    summary = summarize(runs)
    own = summary.row(top1, knockout_metric("excess", "code", "code"), 2)
    assert (own.method, own.family, own.n) == ("t", KNOCKOUT_FAMILY, 3)
    assert own.mean == pytest.approx(0.5 + 0.02 - 0.02)
    assert own.ci_low < own.mean < own.ci_high and own.p < 0.01
    cross = summary.row(top1, knockout_metric("excess", "code", "math"), 2)
    assert cross.family == "" and math.isnan(cross.p)
    assert summary.row(top1, knockout_metric("preferred", "math", "code"), 3).mean == pytest.approx(
        0.02
    )
    assert summary.row(top1, knockout_metric("share", "code", ""), 3).mean == pytest.approx(0.8)
    reference = summary.row(domain, knockout_metric("excess", "code", "code"), 2)
    assert reference.family == "" and reference.n == 3  # descriptive: routing by construction
    family = summary.family(KNOCKOUT_FAMILY)
    assert family.m == 2 * 2  # layers x domains of top-1 only
    assert {t[0] for t in family.tests} == {top1}
    text = render_markdown(summary)
    assert "removing code's expert (layer 2) costs code 0.520" in text
    assert "prose" not in text.split("## Knock-out")[1].split("##")[0]
    assert f"`{KNOCKOUT_FAMILY}` (m = 4" in text
