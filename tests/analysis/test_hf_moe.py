"""Routing captured from a Hugging Face MoE's own forward (tiny random-initialised models of
each supported family, built from the library's configs and saved with ``save_pretrained``): the
experts captured equal each family's routing rule recomputed from the router's input, and for
DeepSeek-V3 differ from top-k of the logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.hf_moe import FAMILIES, routing_rule, save_tiny_model

from moe_emergence.analysis.hf_routing import (
    RoutingCapture,
    load_config,
    load_model,
)
from moe_emergence.errors import UserError


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-models")
    return {t: save_tiny_model(root / t, t, tiny_tokenizer_dir) for t in FAMILIES}


# ---------------------------------------------------------------------- (a) capture


@pytest.mark.parametrize("model_type", FAMILIES)
def test_captured_experts_follow_the_familys_rule(models, model_type):
    folder = models[model_type]
    loaded = load_model(model_type, str(folder), load_config("m", str(folder), False), "cpu", None)
    inputs: dict[int, torch.Tensor] = {}
    hooks = [
        m.router.register_forward_pre_hook(
            lambda mod, args, i=m.index: inputs.__setitem__(i, args[0].reshape(-1, 32))
        )
        for m in loaded.layers
    ]
    ids = torch.randint(0, 400, (3, 40), generator=torch.Generator().manual_seed(1))
    with RoutingCapture(loaded.layers, loaded.family) as capture, torch.no_grad():
        loaded.model(input_ids=ids)
        seen = capture.take()
    for hook in hooks:
        hook.remove()
    assert [m.index for m in loaded.layers] == [0, 1] and sorted(seen) == [0, 1]
    for m in loaded.layers:
        captured = seen[m.index]
        assert captured.ids.shape == (120, 2)
        assert torch.equal(captured.ids, routing_rule(m.router, model_type, inputs[m.index]))
        assert (captured.weights[:, 0] >= captured.weights[:, 1]).all()  # slot 0: first choice
        logits = torch.nn.functional.linear(inputs[m.index].float(), m.router.weight.float())
        top = logits.topk(2, dim=-1)[1].sort(-1)[0]
        differs = (captured.ids.sort(-1)[0] != top).any(-1).float().mean().item()
        if model_type == "deepseek_v3":  # group-limited choice on sigmoid + bias
            assert differs > 0.5
        elif model_type != "gpt_oss":  # (GPT-OSS's router adds a bias to these logits)
            assert differs == 0.0
        assert not m.experts._forward_pre_hooks and not m.router._forward_hooks


def test_gpt_oss_experts_called_by_keyword_are_captured(models):
    folder = models["gpt_oss"]
    loaded = load_model("g", str(folder), load_config("g", str(folder), False), "cpu", None)
    layer = loaded.layers[0]
    layer.experts.config._experts_implementation = "eager"  # its own forward and argument names
    hidden = torch.randn(5, 32)
    index = torch.tensor([[1, 2], [3, 4], [5, 6], [7, 0], [2, 1]])
    weights = torch.tensor([[0.4, 0.6], [0.9, 0.1], [0.5, 0.5], [0.2, 0.8], [0.7, 0.3]])
    with RoutingCapture(loaded.layers[:1], loaded.family) as capture, torch.no_grad():
        layer.experts(hidden, router_indices=index, routing_weights=weights)
        seen = capture.take()[layer.index]
    assert seen.ids.tolist() == [[2, 1], [3, 4], [5, 6], [0, 7], [2, 1]]  # by weight, stable


def test_experts_that_never_ran_are_refused(models):
    folder = models["olmoe"]
    loaded = load_model("o", str(folder), load_config("o", str(folder), False), "cpu", None)
    with (
        RoutingCapture(loaded.layers, loaded.family) as capture,
        pytest.raises(UserError, match="did not run"),
    ):
        capture.take()
