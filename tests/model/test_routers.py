"""The reference routers (``model.moe.router``: frozen, hash, domain) against known answers: the
hash and domain maps as documented, a frozen gate that nothing trains, the same initial model
as top-1 at the same seed; each condition through the real config and ``train()`` (3 steps),
its routing read back through the analysis' loading and ``route_blocks``; loop and grouped
dispatch alike; and the refusals, one line each."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.configs import tiny_overrides
from helpers.moe import DOMAINS, expert_forward, random_experts, tiny_module

from moe_emergence.analysis.evaluate import evaluate_checkpoint
from moe_emergence.analysis.inspect import main as inspect_main
from moe_emergence.analysis.loading import load_checkpoint
from moe_emergence.analysis.probe import make_probe, route_blocks
from moe_emergence.analysis.results import condition_label
from moe_emergence.analysis.scores import contingency, nmi
from moe_emergence.analysis.tables import read_table
from moe_emergence.config import check_moe_node, compose_config
from moe_emergence.errors import USER_ERROR_STATUS, UserError
from moe_emergence.model.gpt2_moe import build_gpt2, install_moe_layers, moe_layers
from moe_emergence.model.module import MoEGPT2Module
from moe_emergence.model.moe import (
    HASH_PRIME,
    DomainRouter,
    HashRouter,
    MoELayer,
    hash_parameters,
)
from moe_emergence.model.settings import MoESettings
from moe_emergence.train import train

CONDITIONS = ("top1", "frozen_router", "hash_router", "domain_router")
ROUTER_OF = {"top1": "learned", "frozen_router": "frozen", "hash_router": "hash"}
ROUTER_OF["domain_router"] = "domain"
LAYERS = (2, 3)  # tiny_moe's MoE layers
N_EXPERTS = 4  # tiny_moe's experts (3 domains: the domain map fits)
SEED = 42  # experiment=debug's seed (model.moe.seed follows it)
STEPS = 3


def expected_hash(ids: np.ndarray, seed: int, layer: int, top_k: int = 1) -> np.ndarray:
    """The documented hash map, written out in Python integers: [N, k]."""
    a, b = hash_parameters(seed, layer)
    first = np.array([(a * int(t) + b) % HASH_PRIME % N_EXPERTS for t in ids.ravel()])
    return (first[:, None] + np.arange(top_k)) % N_EXPERTS


# ---------------------------------------------------------------------- the maps (pure)


def test_the_hash_is_seeded_per_layer_and_stable():
    a, b = hash_parameters(0, 2)
    assert 1 <= a < HASH_PRIME and 0 <= b < HASH_PRIME
    assert hash_parameters(0, 2) == (a, b)  # a digest: the same on every machine and run
    assert len({hash_parameters(s, layer) for s in (0, 1) for layer in (2, 3)}) == 4


@pytest.mark.parametrize("top_k", [1, 2])
def test_the_hash_router_sends_each_id_to_its_hash(top_k):
    router = HashRouter(8, N_EXPERTS, top_k, *hash_parameters(SEED, 2))
    ids = torch.arange(5000)  # beyond the tiny vocabulary: the map is arithmetic
    route = router(torch.randn(len(ids), 8), ids)
    assert route.indices.tolist() == expected_hash(ids.numpy(), SEED, 2, top_k).tolist()
    assert all(len(set(row)) == top_k for row in route.indices.tolist())  # k distinct experts
    assert torch.equal(route.weights, torch.full((len(ids), top_k), 1 / top_k))
    counts = torch.bincount(route.indices[:, 0], minlength=N_EXPERTS)
    assert counts.min() > 0.2 * len(ids)  # about uniform over the experts
    # The router's distribution is the fixed one: 1/k on the chosen experts, entropy log k.
    p = route.probs
    assert torch.allclose(p.gather(1, route.indices), torch.full_like(route.weights, 1 / top_k))
    entropy = -(p * p.clamp_min(1e-30).log()).sum(1)
    assert torch.allclose(entropy, torch.full_like(entropy, math.log(top_k)), atol=1e-6)
    assert list(router.parameters()) == []


@pytest.mark.parametrize(
    ("top_k", "experts"), [(1, [[0], [1], [2]]), (2, [[0, 1], [2, 3], [0, 1]])]
)
def test_the_domain_router_gives_domain_i_experts_i_k_to_i_k_plus_k(top_k, experts):
    route = DomainRouter(8, N_EXPERTS, top_k)(torch.randn(3, 8), torch.tensor([0, 1, 2]))
    assert route.indices.tolist() == experts  # top-2 with 4 experts wraps: refused in a run


@pytest.mark.parametrize("kind", ["learned", "frozen", "hash", "domain"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_loop_and_grouped_dispatch_agree_for_every_router(kind, top_k):
    d, b, t = 8, 3, 5
    torch.manual_seed(0)
    x = torch.randn(b, t, d)
    outputs, grads = [], []
    for dispatch in ("loop", "grouped"):
        noise = 1.0 if kind == "learned" else 0.0
        layer = MoELayer(random_experts(N_EXPERTS, d, 2 * d), top_k, noise, router=kind)
        layer.router.reset_parameters(torch.Generator().manual_seed(0))
        layer.set_dispatch(dispatch)
        layer.token_ids = torch.randint(0, 100, (b, t), generator=torch.Generator().manual_seed(1))
        layer.block_domains = torch.tensor([0, 2, 1])
        layer.eval()
        inputs = x.clone().requires_grad_(True)
        out = layer(inputs)
        out.square().sum().backward()
        outputs.append(out.detach())
        grads.append((inputs.grad, layer.experts.c_fc_weight.grad))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)
    for loop, grouped in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(loop, grouped, rtol=1e-5, atol=1e-6)


def test_nothing_trains_through_a_frozen_router():
    """The aux losses and top-1's straight-through weight reach neither the frozen gate nor the
    hidden states it reads (the input's gradient is the experts' alone); through a learned
    router both get a gradient."""
    x = torch.randn(2, 6, 8)
    for kind in ("learned", "frozen"):
        layer = MoELayer(random_experts(N_EXPERTS, 8, 16), 1, 0.0, router=kind).train()
        inputs = x.clone().requires_grad_(True)
        out = layer(inputs).sum()
        aux = layer.last_lb_loss + layer.last_z_loss
        learned = kind == "learned"
        assert aux.requires_grad is learned and layer.router.gate.weight.requires_grad is learned
        if learned:
            assert torch.autograd.grad(aux, inputs, retain_graph=True)[0].abs().sum() > 0
        out.backward()
        gate_grad = layer.router.gate.weight.grad
        assert (
            (gate_grad is not None and gate_grad.abs().sum() > 0) if learned else gate_grad is None
        )
    # With the frozen router's choices held fixed, the input gradient is the experts' alone.
    chosen = layer.last_indices
    inputs = x.clone().requires_grad_(True)
    flat = inputs.reshape(-1, 8)
    by_hand = torch.stack(
        [
            expert_forward(layer.experts, int(e), flat[n : n + 1])[0]
            for n, e in enumerate(chosen[:, 0])
        ]
    ).sum()
    expected = torch.autograd.grad(by_hand, inputs)[0]
    inputs.grad = None
    layer(inputs).sum().backward()
    torch.testing.assert_close(inputs.grad, expected, rtol=1e-5, atol=1e-6)


def test_training_and_validation_steps_route_each_block_by_its_domain():
    """The module hands each batch's domain labels to the model (training and validation)."""
    module = tiny_module(moe={"layers": [1], "n_experts": 3, "noise_std": 0.0, "router": "domain"})
    batch = {
        "input_ids": torch.randint(0, 32, (4, 8)),
        "domains": ["prose", "code", "math", "code"],
    }
    expected = torch.tensor([2, 0, 1, 0]).repeat_interleave(8)
    layer = moe_layers(module.model)[1]
    module.training_step(batch, 0)
    assert torch.equal(layer.last_indices[:, 0], expected)
    module.on_validation_epoch_start()
    module.validation_step(batch, 0)
    assert torch.equal(layer.last_indices[:, 0], expected)
    assert layer.block_domains is None  # handed for one forward only


# ---------------------------------------------------------------------- refusals


def one_line(caught: pytest.ExceptionInfo) -> str:
    message = str(caught.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("kind", ["frozen", "hash", "domain"])
def test_a_fixed_router_with_noise_is_refused(kind):
    with pytest.raises(UserError) as caught:
        MoESettings(router=kind, noise_std=0.5).validate()
    message = one_line(caught)
    assert "model.moe.noise_std=0.5" in message and f"model.moe.router={kind}" in message
    assert "model.moe.noise_std=0" in message  # the fix


def test_an_unknown_router_is_refused():
    with pytest.raises(UserError) as caught:
        MoESettings(router="random").validate()
    assert "model.moe.router must be one of" in one_line(caught)


def test_a_domain_map_without_an_expert_per_domain_is_refused():
    for n_experts, top_k in ((2, 1), (4, 2)):
        moe = {"layers": [0], "n_experts": n_experts, "top_k": top_k, "noise_std": 0.0}
        with pytest.raises(UserError) as caught:
            MoEGPT2Module(
                optimizer=torch.optim.AdamW,
                block_size=8,
                domains=DOMAINS,
                moe={**moe, "router": "domain"},
                pretrained=None,
                n_embd=8,
                n_layer=1,
                n_head=2,
            )
        message = one_line(caught)
        assert f"model.moe.n_experts={n_experts}" in message and f"3 x {top_k}" in message


@pytest.mark.parametrize("condition", ["frozen_router", "hash_router", "domain_router", "top2"])
def test_an_moe_condition_on_a_dense_model_is_refused(condition, tmp_path):
    cfg = compose_config(
        ["experiment=dense_baseline", f"condition={condition}", f"paths.run_dir={tmp_path}"]
    )
    with pytest.raises(UserError) as caught:
        check_moe_node(cfg)
    message = one_line(caught)
    assert "model.moe." in message and "dense model" in message
    with pytest.raises(UserError, match="dense model"):
        train(cfg)  # before anything is read or built
    check_moe_node(compose_config(["experiment=dense_baseline"]))  # dense alone is fine
    check_moe_node(compose_config([f"condition={condition}"]))  # and the MoE default


def test_routing_a_domain_router_needs_the_blocks_domains():
    model = build_gpt2(None, vocab_size=50, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    install_moe_layers(model, [0], N_EXPERTS, noise_std=0.0, router="domain")
    with pytest.raises(UserError) as caught:
        route_blocks(model, torch.zeros(2, 8, dtype=torch.long), 2)
    assert "model.moe.router=domain" in one_line(caught)
    with pytest.raises(UserError, match=r"model\.moe\.router=domain routes by the domains"):
        model(input_ids=torch.zeros(2, 8, dtype=torch.long))  # a bare forward says so too


def test_conditions_are_labelled_as_people_say_them():
    for condition, label in (
        ("frozen_router", "frozen router"),
        ("hash_router", "hash router"),
        ("domain_router", "domain router"),
    ):
        assert condition_label(f"condition={condition},experiment=study_cpu") == label + (
            ", experiment study_cpu"
        )
        assert condition_label(f"condition={condition}") == label


# ---------------------------------------------------------------------- 3-step runs


@pytest.fixture(scope="module")
def runs(tiny_mirror, tiny_tokenizer_dir, tmp_path_factory) -> Path:
    """A 3-step run of each condition (top-1 and the three reference routers) through the
    real config and ``train()``, a checkpoint after every step."""
    root = tmp_path_factory.mktemp("routers")
    for condition in CONDITIONS:
        cfg = compose_config(
            tiny_overrides(
                tiny_mirror,
                tiny_tokenizer_dir,
                root / condition,
                f"condition={condition}",
                f"data.cache_dir={root / 'cache'}",
                "callbacks.model_checkpoint.every_n_train_steps=1",
            )
        )
        assert train(cfg)["global_step"] == STEPS
    return root


def state(runs: Path, condition: str, step: int | None = None) -> dict[str, torch.Tensor]:
    name = "last" if step is None else f"step{step:06d}"
    checkpoint = torch.load(runs / condition / "checkpoints" / f"{name}.ckpt", weights_only=False)
    return checkpoint["state_dict"]


@pytest.mark.parametrize("condition", CONDITIONS)
def test_each_condition_trains_and_records_its_router(runs, condition):
    checkpoint = torch.load(runs / condition / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == STEPS
    moe = checkpoint["hyper_parameters"]["moe"]
    assert moe["router"] == ROUTER_OF[condition]
    assert moe["noise_std"] == (1.0 if condition == "top1" else 0.0)
    loaded = load_checkpoint(runs / condition / "checkpoints" / "last.ckpt")  # analysis' rebuild
    kinds = {layer.router_kind for layer in moe_layers(loaded.model).values()}
    assert kinds == {ROUTER_OF[condition]}
    trajectory = read_table(runs / condition / "routing" / "trajectory.csv")
    assert {(r["step"], r["layer"]) for r in trajectory} == {
        (s, str(i)) for s in ("0", str(STEPS)) for i in LAYERS
    }


def test_the_frozen_gate_is_bitwise_its_initial_value(runs):
    start, end = state(runs, "frozen_router", 0), state(runs, "frozen_router")
    gates = [k for k in start if k.endswith("router.gate.weight")]
    assert len(gates) == len(LAYERS)
    for key in gates:
        assert torch.equal(start[key], end[key]), key
    experts = [k for k in start if ".mlp.experts." in k]
    assert experts and all(not torch.equal(start[k], end[k]) for k in experts)  # these train
    learned = state(runs, "top1")  # the learned gate of the same start moved
    assert not any(torch.equal(start[k], learned[k]) for k in gates)


def test_same_seed_same_initial_model_as_top1(runs):
    top1 = state(runs, "top1", 0)
    frozen = state(runs, "frozen_router", 0)
    assert frozen.keys() == top1.keys()
    for key in top1:
        assert torch.equal(frozen[key], top1[key]), key
    for condition in ("hash_router", "domain_router"):  # no gate, the same experts and the rest
        fixed = state(runs, condition, 0)
        assert set(top1) - set(fixed) == {
            f"model.transformer.h.{i}.mlp.router.{name}"
            for i in LAYERS
            for name in ("gate.weight", "step")
        }
        for key in fixed:
            assert torch.equal(fixed[key], top1[key]), (condition, key)


def test_a_frozen_router_run_resumes_exactly(runs, tiny_mirror, tiny_tokenizer_dir, tmp_path):
    resumed = tmp_path / "resumed"
    checkpoint = runs / "frozen_router" / "checkpoints" / "step000001.ckpt"
    cfg = compose_config(
        tiny_overrides(
            tiny_mirror,
            tiny_tokenizer_dir,
            resumed,
            "condition=frozen_router",
            f"data.cache_dir={runs / 'cache'}",
            f"ckpt_path={checkpoint}",
        )
    )
    assert train(cfg)["global_step"] == STEPS
    whole = state(runs, "frozen_router")
    after = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for key in whole:
        assert torch.equal(whole[key], after[key]), key


def test_a_resume_with_another_router_is_refused(runs, tiny_mirror, tiny_tokenizer_dir, tmp_path):
    checkpoint = runs / "top1" / "checkpoints" / "step000001.ckpt"
    cfg = compose_config(
        tiny_overrides(
            tiny_mirror,
            tiny_tokenizer_dir,
            tmp_path / "run",
            "condition=frozen_router",
            f"data.cache_dir={runs / 'cache'}",
            f"ckpt_path={checkpoint}",
        )
    )
    with pytest.raises(UserError) as caught:
        train(cfg)
    assert "model.moe.router: checkpoint 'learned', now 'frozen'" in one_line(caught)


def random_probe(vocab_size: int, blocks: int = 12, length: int = 32) -> tuple:
    """Blocks of random ids over the whole vocabulary, 4 per domain (each block a document)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab_size, size=(blocks, length))
    return make_probe(ids, np.repeat(np.arange(3), blocks // 3), DOMAINS, "train_sample")


@pytest.mark.parametrize("step", [0, None])
def test_under_the_hash_router_every_token_id_sits_on_its_hashed_expert(runs, step):
    name = "last" if step is None else f"step{step:06d}"
    loaded = load_checkpoint(runs / "hash_router" / "checkpoints" / f"{name}.ckpt")
    probe = random_probe(loaded.model.config.vocab_size)
    ids = torch.from_numpy(probe.input_ids)
    routed = route_blocks(loaded.model, ids, 5, block_domains=torch.tensor(probe.block_domains))
    for layer in LAYERS:
        chosen = routed.experts[layer][..., 0].numpy().ravel()
        flat = probe.input_ids.ravel()
        experts_per_id = {t: set(chosen[flat == t]) for t in np.unique(flat)}
        assert all(len(found) == 1 for found in experts_per_id.values())  # one expert per id
        assert chosen.tolist() == expected_hash(flat, SEED, layer)[:, 0].tolist()
    # And a plain forward (the training step's path) routes the same way.
    loaded.model(input_ids=ids[:2])
    for layer in LAYERS:
        indices = moe_layers(loaded.model)[layer].last_indices[:, 0]
        assert torch.equal(indices, routed.experts[layer][:2, :, 0].reshape(-1))


def test_under_the_domain_router_the_probe_nmi_is_one(runs):
    loaded = load_checkpoint(runs / "domain_router" / "checkpoints" / "last.ckpt")
    probe = random_probe(loaded.model.config.vocab_size)
    routed = route_blocks(
        loaded.model,
        torch.from_numpy(probe.input_ids),
        5,
        block_domains=torch.from_numpy(probe.block_domains),
    )
    token_domains = np.repeat(probe.block_domains, probe.input_ids.shape[1])
    for layer in LAYERS:
        table = contingency(token_domains, routed.experts[layer].numpy().reshape(-1, 1), 3, 4)
        assert np.array_equal(np.flatnonzero(table.sum(0)), [0, 1, 2])  # domain i -> expert i
        assert nmi(table) == pytest.approx(1.0, abs=1e-12)
    # analyze's path (evaluate_checkpoint) and the training callback's (trajectory.csv) agree.
    settings = {"batch_size": 4, "null_permutations": 19, "null_seed": 0}
    result = evaluate_checkpoint(loaded, probe, None, settings, torch.device("cpu"))
    assert all(nmi(result.counts[layer]) == pytest.approx(1.0) for layer in LAYERS)
    trajectory = read_table(runs / "domain_router" / "routing" / "trajectory.csv")
    assert all(float(r["nmi"]) == pytest.approx(1.0) for r in trajectory)


def test_inspect_routes_a_text_by_the_domain_it_is_given(runs, capsys):
    last = str(runs / "domain_router" / "checkpoints" / "last.ckpt")
    assert inspect_main([last, "--text", "x = 1 + 2", "--domain", "math", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "layer 2: e0 0, e1 " in out and ", e2 0, e3 0" in out  # math is domain 1 -> e1
    assert inspect_main([last, "--text", "x = 1"]) == USER_ERROR_STATUS
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pass --domain, one of code, math, prose" in err
    top1 = str(runs / "top1" / "checkpoints" / "last.ckpt")
    assert inspect_main([top1, "--text", "x = 1", "--domain", "code"]) == USER_ERROR_STATUS
    assert "leave --domain out" in capsys.readouterr().err
