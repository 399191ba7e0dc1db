"""The MoE layer's dispatch: the output and every gradient (input, experts, router) against a
per-token reference and against the per-expert addmm / index_add_ loop written out here (a
rewrite of the dispatch must keep both; the ``loop`` path bitwise for top-1), for top-1
(straight-through) and top-k, with routing that leaves experts empty, on both dispatch paths."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.moe import expert_forward, random_experts

from moe_emergence.model.moe import MoELayer

D, E = 8, 5
DISPATCHES = ("loop", "grouped")


def make_layer(top_k: int, seed: int = 0, dispatch: str = "loop") -> MoELayer:
    experts = random_experts(E, D, 2 * D, seed=seed)
    layer = MoELayer(experts, top_k=top_k, noise_std=0.0, dispatch=dispatch)
    layer.router.reset_parameters(torch.Generator().manual_seed(seed))
    return layer


def loop_dispatch(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """The reference dispatch: per expert, index_select its tokens, run them through its
    stacked slices with ``torch.addmm`` (as GPT-2's Conv1D) and index_add_ the weighted output
    into zeros."""
    route = layer.router(x)
    experts = layer.experts
    expert_of = route.indices.reshape(-1)
    order = torch.argsort(expert_of, stable=True)
    token_of = torch.arange(x.shape[0]).repeat_interleave(layer.top_k)[order]
    weight_of = route.weights.reshape(-1)[order]
    counts = torch.bincount(expert_of, minlength=layer.n_experts).tolist()
    out = torch.zeros_like(x)
    for e, (tokens, weights) in enumerate(
        zip(token_of.split(counts), weight_of.split(counts), strict=True)
    ):
        rows = x.index_select(0, tokens)
        hidden = experts.act(torch.addmm(experts.c_fc_bias[e], rows, experts.c_fc_weight[e]))
        y = experts.dropout(torch.addmm(experts.c_proj_bias[e], hidden, experts.c_proj_weight[e]))
        out.index_add_(0, tokens, y * weights.unsqueeze(-1))
    return out


def per_token(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Each token on its own: the weighted sum of its selected experts' outputs."""
    route = layer.router(x)
    rows = [
        sum(
            route.weights[n, j]
            * expert_forward(layer.experts, int(route.indices[n, j]), x[n : n + 1])[0]
            for j in range(layer.top_k)
        )
        for n in range(x.shape[0])
    ]
    return torch.stack(rows)


def grads(layer: MoELayer, x: torch.Tensor, forward, upstream: torch.Tensor) -> dict:
    """Output and the gradients of (out * upstream).sum() w.r.t. x and every parameter."""
    layer = copy.deepcopy(layer)
    x = x.clone().requires_grad_(True)
    out = forward(layer, x)
    (out * upstream).sum().backward()
    result = {"out": out.detach(), "x": x.grad}
    result.update({name: p.grad for name, p in layer.named_parameters()})
    return result


def skewed_input(n: int = 24, seed: int = 1) -> torch.Tensor:
    """Tokens whose routing leaves some experts empty and gives others several tokens."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=generator)


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_outputs_and_gradients_match_loop_and_per_token_reference(top_k, dispatch):
    layer = make_layer(top_k, dispatch=dispatch)
    with torch.no_grad():  # skew the router: expert E-1 never wins top-1
        layer.router.gate.weight[E - 1].fill_(-5.0)
    x = skewed_input()
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))

    new = grads(layer, x, lambda m, t: m(t[None])[0], upstream)
    loop = grads(layer, x, loop_dispatch, upstream)
    ref = grads(layer, x, per_token, upstream)

    counts = torch.bincount(layer.router(x).indices[:, 0], minlength=E)
    assert (counts == 0).any() and (counts > 1).sum() >= 2  # empty and shared experts
    assert new.keys() == ref.keys()
    # The loop rounds like the reference loop; the grouped GEMM sums in its own order.
    tol = {"atol": 1e-6, "rtol": 1e-6} if dispatch == "loop" else {"atol": 1e-6, "rtol": 1e-5}
    for name in new:
        assert new[name] is not None, name
        torch.testing.assert_close(new[name], loop[name], **tol, msg=name)
        torch.testing.assert_close(new[name], ref[name], atol=1e-5, rtol=1e-5, msg=name)
    if top_k == 1 and dispatch == "loop":
        # Each token one row, weight exactly 1.0: the sort, gather and unsort change no
        # rounding, and the matmuls are the reference's addmm calls on the same rows.
        for name in new:
            assert torch.equal(new[name], loop[name]), name


def test_top1_straight_through_gradient_reaches_router():
    layer = make_layer(top_k=1)
    x = skewed_input()
    upstream = torch.randn(x.shape)
    new = grads(layer, x, lambda m, t: m(t[None])[0], upstream)
    ref = grads(layer, x, per_token, upstream)
    assert new["router.gate.weight"].abs().sum() > 0
    torch.testing.assert_close(new["router.gate.weight"], ref["router.gate.weight"])


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_bf16_autocast_output_keeps_input_dtype(dispatch):
    layer = make_layer(top_k=2, dispatch=dispatch).eval()
    x = torch.randn(2, 6, D)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == x.dtype
    assert layer.last_dispatch == dispatch
    torch.testing.assert_close(out, layer(x), atol=0.1, rtol=0.05)
