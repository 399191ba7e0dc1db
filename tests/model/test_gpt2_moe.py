"""GPT-2 with MoE layers: building (scratch, saved folder, mirror without weights), the warm
start that reproduces the dense model, index validation, and aux outputs."""

from __future__ import annotations

import functools
import shutil

import pytest
import torch
from helpers.mirror import SHARED_HUB
from transformers import GPT2Config, GPT2LMHeadModel

from moe_emergence.errors import UserError
from moe_emergence.hub import HubUnavailableError
from moe_emergence.model import (
    MoELayer,
    build_gpt2,
    collect_aux_outputs,
    count_parameters,
    install_moe_layers,
    moe_layers,
    set_router_step,
)
from moe_emergence.model.module import MoEGPT2Module

DOMAINS = ("code", "math", "prose")  # the default domain set (conf/data/domains)

TINY = {"vocab_size": 100, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 2}


@pytest.fixture
def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return build_gpt2(None, **TINY).eval()


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def saved_tiny_gpt2(tmp_path_factory):
    """A mirror root holding a saved tiny GPT-2 at ``org/tiny-gpt2``; returns (root, model)."""
    root = tmp_path_factory.mktemp("model-mirror")
    torch.manual_seed(0)
    model = build_gpt2(None, **TINY).eval()
    model.save_pretrained(root / "org" / "tiny-gpt2")
    return root, model


def logits_of(model: GPT2LMHeadModel, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


# --- build_gpt2 -----------------------------------------------------------------------------


def test_build_from_config_has_the_asked_shape():
    model = build_gpt2(None, vocab_size=120, n_positions=32, n_embd=16, n_layer=3, n_head=4)
    assert model.transformer.wte.weight.shape == (120, 16)
    assert model.transformer.wpe.weight.shape == (32, 16)
    assert len(model.transformer.h) == 3
    assert model.config.n_head == 4
    assert model.config.resid_pdrop == model.config.attn_pdrop == 0.0


def test_build_loads_saved_weights_from_mirror(saved_tiny_gpt2, input_ids):
    root, saved = saved_tiny_gpt2
    model = build_gpt2("org/tiny-gpt2", hub_mirror=str(root), n_positions=64, dropout=0.1).eval()
    assert model.config.resid_pdrop == 0.1
    assert model.dtype == torch.float32
    torch.testing.assert_close(logits_of(model, input_ids), logits_of(saved, input_ids))


def test_build_pretrained_grows_vocab_and_refuses_longer_context(saved_tiny_gpt2):
    root, _ = saved_tiny_gpt2
    folder = str(root / "org" / "tiny-gpt2")  # a local folder works without a mirror
    model = build_gpt2(folder, vocab_size=150, n_positions=32)
    assert model.transformer.wte.weight.shape[0] == 150
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert build_gpt2(folder, vocab_size=50, n_positions=64).transformer.wte.weight.shape[0] == 100
    # The fix is named: the model's positions, not the block size.
    with pytest.raises(UserError, match=r"model\.n_positions=128 .*model\.n_positions=64 or null"):
        build_gpt2(folder, n_positions=128)
    assert build_gpt2(folder).config.n_positions == 64  # None: the weights' own


def test_pretrained_module_takes_positions_from_the_weights(saved_tiny_gpt2):
    root, _ = saved_tiny_gpt2
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-3)
    module = MoEGPT2Module(
        optimizer, block_size=32, pretrained=str(root / "org" / "tiny-gpt2"), domains=DOMAINS
    )
    assert module.model.config.n_positions == 64
    with pytest.raises(UserError, match=r"data\.block_size=128 exceeds .*n_positions=64"):
        MoEGPT2Module(
            optimizer, block_size=128, pretrained=str(root / "org" / "tiny-gpt2"), domains=DOMAINS
        )


def test_build_from_mirror_without_weights_says_how_to_train_from_scratch(
    tmp_path, tiny_tokenizer_dir
):

    folder = tmp_path / "gpt2"
    shutil.copytree(tiny_tokenizer_dir, folder)
    GPT2Config(**TINY).save_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="no weights") as info:
        build_gpt2("gpt2", hub_mirror=str(tmp_path))
    assert "model.pretrained=null" in str(info.value)


def test_build_from_shared_mirror_without_weights_raises():
    folder = SHARED_HUB / "gpt2"
    if not (folder / "config.json").is_file():
        pytest.skip(f"no gpt2 folder in the shared mirror {SHARED_HUB}")
    if (folder / "model.safetensors").exists() or (folder / "pytorch_model.bin").exists():
        pytest.skip("the shared mirror holds GPT-2 weights")
    with pytest.raises(FileNotFoundError, match=r"model\.pretrained=null"):
        build_gpt2("gpt2", hub_mirror=str(SHARED_HUB))


def test_build_offline_without_mirror_says_how_to_train_from_scratch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no local folder named gpt2
    with pytest.raises(HubUnavailableError, match=r"model\.pretrained=null"):
        build_gpt2("gpt2")


# --- install_moe_layers ---------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("train", [False, True])
def test_warm_start_reproduces_dense_logits(tiny_gpt2, input_ids, top_k, train):
    dense = logits_of(tiny_gpt2, input_ids)
    layers = install_moe_layers(tiny_gpt2, [0, 1], n_experts=4, top_k=top_k, noise_std=1.0)
    assert [layer.top_k for layer in layers] == [top_k, top_k]
    # Router noise (train mode) only picks among identical experts; dropout is 0.
    tiny_gpt2.train(train)
    moe = logits_of(tiny_gpt2, input_ids)
    assert torch.allclose(moe, dense, atol=1e-6)


def test_init_noise_makes_experts_differ_reproducibly(tiny_gpt2, input_ids):
    dense = logits_of(tiny_gpt2, input_ids)
    twin = GPT2LMHeadModel(tiny_gpt2.config).eval()
    twin.load_state_dict(tiny_gpt2.state_dict())

    (layer,) = install_moe_layers(tiny_gpt2, [1], n_experts=3, init_noise=0.1, seed=7)
    assert not torch.allclose(logits_of(tiny_gpt2, input_ids), dense, atol=1e-4)
    w = layer.experts.c_fc_weight
    assert not torch.equal(w[0], w[1])
    assert not torch.equal(w[0], twin.transformer.h[1].mlp.c_fc.weight)  # twin: still dense

    install_moe_layers(twin, [1], n_experts=3, init_noise=0.1, seed=7)
    torch.testing.assert_close(twin.state_dict(), tiny_gpt2.state_dict(), rtol=0, atol=0)


@pytest.mark.parametrize("layers", [[2], [-1], [0, 0], [True]])
def test_install_rejects_bad_layer_indices(tiny_gpt2, layers):
    with pytest.raises(ValueError, match=r"n_layer=2") as info:
        install_moe_layers(tiny_gpt2, layers, n_experts=2)
    assert repr(layers[-1]) in str(info.value)
    assert moe_layers(tiny_gpt2) == {}


def test_install_twice_on_one_block_is_refused(tiny_gpt2):
    install_moe_layers(tiny_gpt2, [0], n_experts=2)
    with pytest.raises(ValueError, match="already"):
        install_moe_layers(tiny_gpt2, [0], n_experts=2)


def test_moe_layers_and_router_step(tiny_gpt2):
    installed = install_moe_layers(tiny_gpt2, [1, 0], n_experts=2, noise_anneal_steps=10)
    found = moe_layers(tiny_gpt2)
    assert list(found) == [0, 1]
    assert [found[1], found[0]] == installed
    assert all(isinstance(layer, MoELayer) for layer in found.values())
    set_router_step(tiny_gpt2, 5)
    assert [int(layer.router.step) for layer in installed] == [5, 5]
    assert "transformer.h.0.mlp.router.step" in tiny_gpt2.state_dict()


# --- aux outputs ----------------------------------------------------------------------------


def test_collect_aux_outputs_after_forward(tiny_gpt2, input_ids):
    install_moe_layers(tiny_gpt2, [0, 1], n_experts=4, top_k=2, init_noise=0.05)
    with pytest.raises(RuntimeError, match="forward"):
        collect_aux_outputs(tiny_gpt2)

    tiny_gpt2.train()
    tiny_gpt2(input_ids)
    aux = collect_aux_outputs(tiny_gpt2)
    n_tokens = input_ids.numel()
    for loss in (aux.lb_loss, aux.z_loss):
        assert loss.ndim == 0
        assert torch.isfinite(loss)
        assert loss.requires_grad
    assert set(aux.routing) == {0, 1}
    for indices, logits in aux.routing.values():
        assert indices.shape == (n_tokens, 2)
        assert indices.dtype == torch.long
        assert logits.shape == (n_tokens, 4) and logits.dtype == torch.float32

    (aux.lb_loss + aux.z_loss).backward()
    for layer in moe_layers(tiny_gpt2).values():
        assert layer.router.gate.weight.grad.abs().sum() > 0


def test_collect_aux_outputs_without_moe_layers_is_zero(tiny_gpt2, input_ids):
    tiny_gpt2(input_ids)
    aux = collect_aux_outputs(tiny_gpt2)
    assert aux.lb_loss.item() == 0.0
    assert aux.z_loss.item() == 0.0
    assert aux.routing == {}


def test_count_parameters(tiny_gpt2):
    dense_total = count_parameters(tiny_gpt2)["total"]
    mlp = sum(p.numel() for p in tiny_gpt2.transformer.h[0].mlp.parameters())
    install_moe_layers(tiny_gpt2, [0, 1], n_experts=4, top_k=2)
    counts = count_parameters(tiny_gpt2)
    assert counts["per_expert"] == mlp
    assert counts["experts"] == 2 * 4 * mlp
    assert counts["routers"] == 2 * 32 * 4
    assert counts["total"] == dense_total + 2 * 3 * mlp + counts["routers"]
    assert counts["active"] == counts["total"] - 2 * 2 * mlp


def test_pretrained_model_is_found_through_the_mirror_environment(saved_tiny_gpt2, monkeypatch):
    """``model.hub_mirror`` null (the config's default) reads ``$MOE_HUB_MIRROR``, as the data
    does: one fallback, in the hub module."""
    root, model = saved_tiny_gpt2
    monkeypatch.setenv("MOE_HUB_MIRROR", str(root))
    found = build_gpt2("org/tiny-gpt2", hub_mirror=None).eval()
    ids = torch.randint(0, TINY["vocab_size"], (1, 8), generator=torch.Generator().manual_seed(3))
    assert torch.equal(logits_of(found, ids), logits_of(model, ids))
