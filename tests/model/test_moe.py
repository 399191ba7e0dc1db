"""Router, aux losses and the MoE layer: shapes, straight-through gradient, loss values, noise
annealing, and dispatch against a per-token reference."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers.moe import expert_forward, random_experts

from moe_emergence.model.moe import (
    PARAMETERS_OF_MLP,
    MoELayer,
    Router,
    StackedExperts,
    load_balancing_loss,
    router_entropy,
    z_loss,
)

D, E = 8, 4


def make_experts(n: int = E, d: int = D, seed: int = 0) -> StackedExperts:
    """Distinct small MLP experts mapping [n, d] -> [n, d] (hidden width 2d)."""
    return random_experts(n, d, 2 * d, seed=seed)


# --- router ---------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 2])
def test_router_output_shapes(top_k):
    router = Router(D, E, top_k=top_k)
    out = router(torch.randn(10, D))
    assert out.logits.shape == (10, E)
    assert out.probs.shape == (10, E)
    assert out.weights.shape == (10, top_k)
    assert out.indices.shape == (10, top_k)
    assert out.indices.dtype == torch.long
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(10))


def test_router_logits_stay_float32_under_bf16_autocast():
    """Wide inputs with close logits: a bf16 gate would flip some top-1 choices."""
    torch.manual_seed(0)
    router = Router(768, 8, top_k=1, noise_std=0.0).eval()
    x = torch.randn(4096, 768)
    reference = router(x)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        assert router.gate(x).dtype == torch.bfloat16  # what the gate alone would give
        mixed = router(x)
        mixed_bf16_input = router(x.bfloat16())
    assert mixed.logits.dtype == torch.float32
    torch.testing.assert_close(mixed.logits, reference.logits, rtol=0, atol=0)
    assert torch.equal(mixed.indices, reference.indices)
    assert torch.equal(mixed_bf16_input.indices, router(x.bfloat16().float()).indices)


def test_router_entropy_of_clean_logits():
    assert router_entropy(torch.zeros(5, 4)).item() == pytest.approx(math.log(4))
    assert router_entropy(torch.tensor([[50.0, 0.0, 0.0]])).item() == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_experts": 0}, "n_experts"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": E + 1}, "top_k"),
        ({"noise_std": -0.1}, "noise_std"),
        ({"noise_anneal_steps": -1}, "noise_anneal_steps"),
    ],
)
def test_router_rejects_bad_arguments(kwargs, match):
    args = {"d_model": D, "n_experts": E, **kwargs}
    with pytest.raises(ValueError, match=match):
        Router(**args)


def test_top1_weight_is_exactly_one_yet_router_gets_gradient():
    layer = MoELayer(make_experts(), top_k=1, noise_std=1.0)
    layer.train()
    x = torch.randn(2, 5, D)

    route = layer.router(x.reshape(-1, D))
    assert torch.equal(route.weights, torch.ones(10, 1))

    layer(x).sum().backward()
    grad = layer.router.gate.weight.grad
    assert grad is not None
    assert grad.abs().sum() > 0


def test_top1_output_is_the_selected_experts_output():
    layer = MoELayer(make_experts(), top_k=1).eval()
    x = torch.randn(10, D)
    chosen = layer.router(x).indices[:, 0]
    with torch.no_grad():
        expected = torch.cat(
            [expert_forward(layer.experts, int(e), x[n : n + 1]) for n, e in enumerate(chosen)]
        )
    assert len(set(chosen.tolist())) > 1  # several experts really used
    torch.testing.assert_close(layer(x[None])[0], expected, atol=1e-6, rtol=0)


def test_topk_weights_are_renormalised_softmax_of_selected_logits():
    router = Router(D, E, top_k=2).eval()
    out = router(torch.randn(10, D))
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(10))
    expected = out.logits.gather(-1, out.indices).softmax(-1)
    torch.testing.assert_close(out.weights, expected)
    assert (out.weights[:, 0] >= out.weights[:, 1]).all()  # best first


def test_noise_std_anneals_linearly_to_zero():
    router = Router(D, E, noise_std=2.0, noise_anneal_steps=100)
    expected = {0: 2.0, 25: 1.5, 50: 1.0, 100: 0.0, 250: 0.0}
    for step, std in expected.items():
        router.set_step(step)
        assert router.current_noise_std == pytest.approx(std)
    assert Router(D, E, noise_std=2.0, noise_anneal_steps=0).current_noise_std == 0.0
    with pytest.raises(ValueError, match="step"):
        router.set_step(-1)


def test_router_step_is_saved_in_state_dict():
    router = Router(D, E, noise_std=1.0, noise_anneal_steps=10)
    router.set_step(4)
    restored = Router(D, E, noise_std=1.0, noise_anneal_steps=10)
    restored.load_state_dict(router.state_dict())
    assert int(restored.step) == 4
    assert restored.current_noise_std == pytest.approx(0.6)


def test_noise_only_in_training_and_only_until_annealed():
    router = Router(D, E, top_k=2, noise_std=1.0, noise_anneal_steps=10)
    x = torch.randn(32, D)

    router.eval()
    a, b = router(x), router(x)
    assert torch.equal(a.probs, b.probs)
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.weights, b.weights)

    router.train()
    noisy = router(x)
    assert torch.equal(noisy.logits, a.logits)  # logits stay clean
    assert not torch.allclose(noisy.probs, a.probs)

    router.set_step(10)
    annealed = router(x)
    assert torch.equal(annealed.probs, a.probs)


# --- losses ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "indices",
    [
        torch.arange(8).remainder(E)[:, None],  # top-1, two tokens per expert
        torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]]),  # top-2, each expert twice
    ],
)
def test_load_balancing_loss_is_one_for_uniform_routing(indices):
    probs = torch.full((indices.shape[0], E), 1.0 / E)
    loss = load_balancing_loss(probs, indices, E)
    assert loss.item() == pytest.approx(1.0, abs=1e-6)


def test_load_balancing_loss_grows_when_skewed():
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(8, 1)
    indices = torch.zeros(8, 1, dtype=torch.long)  # every token to expert 0
    loss = load_balancing_loss(probs, indices, E)
    assert loss.item() == pytest.approx(E * 1.0 * 0.7)
    half = torch.tensor([0, 1] * 4)[:, None]  # two experts share all tokens
    assert 1.0 < load_balancing_loss(probs, half, E).item() < loss.item()


def test_load_balancing_loss_gradient_reaches_probs_only():
    probs = torch.full((4, E), 1.0 / E, requires_grad=True)
    indices = torch.tensor([[0], [0], [0], [1]])
    load_balancing_loss(probs, indices, E).backward()
    # d/dP_ij of E * sum_i f_i * mean_n P_ni = E * f_j / N
    expected = torch.tensor([0.75, 0.25, 0.0, 0.0]) * E / 4
    torch.testing.assert_close(probs.grad, expected.expand(4, E))


def test_z_loss_on_known_logits():
    assert z_loss(torch.zeros(5, 4)).item() == pytest.approx(math.log(4) ** 2)
    logits = torch.tensor([[0.0, math.log(3.0)], [10.0, 10.0]])
    expected = (math.log(4.0) ** 2 + (10.0 + math.log(2.0)) ** 2) / 2
    assert z_loss(logits).item() == pytest.approx(expected, rel=1e-6)


# --- MoE layer ------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_dispatch_matches_per_token_reference(top_k):
    layer = MoELayer(make_experts(), top_k=top_k).eval()
    hidden = torch.randn(3, 5, D)
    out = layer(hidden)
    assert out.shape == hidden.shape

    x = hidden.reshape(-1, D)
    route = layer.router(x)
    with torch.no_grad():
        expected = torch.stack(
            [
                sum(
                    route.weights[n, j]
                    * expert_forward(layer.experts, int(route.indices[n, j]), x[n : n + 1])[0]
                    for j in range(top_k)
                )
                for n in range(x.shape[0])
            ]
        )
    torch.testing.assert_close(out.detach().reshape(-1, D), expected, atol=1e-6, rtol=1e-5)
    assert len(set(route.indices.flatten().tolist())) > 1  # several experts really used


@pytest.mark.parametrize("dispatch", ["loop", "grouped"])
def test_unused_experts_still_get_zero_gradients(dispatch):
    layer = MoELayer(make_experts(), top_k=1, noise_std=0.0, dispatch=dispatch)
    with torch.no_grad():
        layer.router.gate.weight.fill_(-1.0)
        layer.router.gate.weight[0].fill_(1.0)
    x = torch.rand(2, 4, D) + 0.1  # positive: every token prefers expert 0
    (layer(x) * torch.randn(2, 4, D)).sum().backward()
    assert (layer.last_indices == 0).all()
    assert layer.last_dispatch == dispatch
    for name in PARAMETERS_OF_MLP:
        grad = getattr(layer.experts, name).grad
        assert grad is not None, name
        assert grad[0].abs().sum() > 0, name  # the used expert learns
        assert torch.equal(grad[1:], torch.zeros_like(grad[1:])), name


def test_layer_keeps_last_forward_state():
    layer = MoELayer(make_experts(), top_k=2)
    assert (layer.n_experts, layer.top_k) == (E, 2)
    assert layer.last_indices is None
    layer(torch.randn(2, 3, D))

    assert layer.last_indices.shape == (6, 2)
    assert layer.last_indices.dtype == torch.long
    assert layer.last_counts.dtype == torch.long
    assert torch.equal(layer.last_counts, torch.bincount(layer.last_indices.flatten(), minlength=E))
    assert layer.last_dispatch == "loop"  # auto on CPU in float32
    assert layer.last_logits.shape == (6, E)
    assert not layer.last_logits.requires_grad
    for loss in (layer.last_lb_loss, layer.last_z_loss):
        assert loss.ndim == 0
        assert loss.requires_grad
        assert torch.isfinite(loss)

    clone = copy.deepcopy(layer)  # the losses' graph must not block copies
    assert clone.last_lb_loss is None
    assert layer.last_lb_loss is not None
