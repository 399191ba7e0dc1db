"""Router saturation during training: at the end of fit the routing callback measures every
analysis step's routing against the final one with ``analyze``'s function on the same scored
tokens (``routing/saturation.csv`` equals it to the last bit), and the kept routing travels in
the checkpoint, so a resumed run's saturation equals the uninterrupted run's; a checkpoint saved
before saturation was measured during training gives the steps since the resume, and says so.

The callback's own hooks on a tiny top-2 model whose routers are moved between analyses (a
stand-in for training), on a size-matched probe that leaves tokens unscored."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from helpers.callback import stub_trainer
from helpers.moe import tiny_module

from moe_emergence.analysis import callback as callback_module
from moe_emergence.analysis.callback import RoutingAnalysis
from moe_emergence.analysis.evaluate import specialisation
from moe_emergence.analysis.probe import make_probe, route_blocks, size_matched
from moe_emergence.analysis.specialisation import router_saturation
from moe_emergence.analysis.tables import SATURATION, read_table
from moe_emergence.model.gpt2_moe import moe_layers

SETTINGS = {"batch_size": 4, "null_permutations": 9, "null_seed": 5, "every_n_steps": 2}
N_EXPERTS, LAYERS = 4, (0, 1)
STEPS = (2, 3, 4)  # optimizer steps after step 0; analyses at 0, 2, 4 and the end (5)
END = 5


def _probe(domains):
    """Per domain 3 blocks of 8 tokens holding documents of 6, 10 and 8 tokens: size matching
    scores each document's first 6 tokens, so each block keeps some tokens unscored."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 32, size=(3 * len(domains), 8))
    texts = np.array([[0] * 6 + [1] * 2, [1] * 8, [2] * 8] * len(domains))
    block_domains = np.repeat(np.arange(len(domains)), 3)
    probe = size_matched(make_probe(ids, block_domains, domains, "held_out", texts))
    assert probe.scored.sum() == 18 * len(domains) and probe.scored.shape == ids.shape
    return probe


def _callback(name, trainer, module, tmp_path) -> RoutingAnalysis:
    callback = RoutingAnalysis(**SETTINGS, out_dir=str(tmp_path / name))
    callback.setup(trainer, module, "fit")
    return callback


def _move_routers(module, step: int) -> None:
    """Move every router's weights by a fixed random amount (seeded by ``step``)."""
    generator = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for layer in moe_layers(module.model).values():
            for param in layer.router.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)


def _train_step(module, probe, step: int, trainer, callbacks) -> None:
    """One 'optimizer step': routers moved, a training forward (the callback counts its
    routing), the hooks of the end of the batch at global step ``step``."""
    _move_routers(module, step)
    ids = torch.from_numpy(probe.input_ids[::3])  # a block of each domain
    trainer.global_step = step
    batch = {"input_ids": ids, "domains": list(module.domains)}
    for callback in callbacks:  # the forward for each: a callback's analysis routes the probe
        module.train()
        module(ids)
        callback.on_train_batch_end(trainer, module, None, batch, 0)


def _routing(module, probe) -> dict[int, np.ndarray]:
    routed = route_blocks(module.model, torch.from_numpy(probe.input_ids), 4)
    return {layer: e.numpy() for layer, e in routed.experts.items()}


@pytest.fixture
def setup(tmp_path, monkeypatch):
    torch.manual_seed(0)
    module = tiny_module(moe={"layers": list(LAYERS), "n_experts": N_EXPERTS, "top_k": 2})
    probe = _probe(module.domains)
    monkeypatch.setattr(callback_module, "build_probe", lambda *args, **kwargs: probe)
    return module, probe, stub_trainer(tmp_path)


def test_saturation_at_the_end_is_analyzes_on_every_analysis_step(setup, tmp_path):
    module, probe, trainer = setup
    callback = _callback("routing", trainer, module, tmp_path)
    callback.on_train_start(trainer, module)
    routing = {0: _routing(module, probe)}  # this test's own routing of each analysed model
    for step in STEPS:
        _train_step(module, probe, step, trainer, [callback])
        routing[step] = _routing(module, probe)
    trainer.global_step = END
    _move_routers(module, END)
    routing[END] = _routing(module, probe)
    callback.on_train_end(trainer, module)

    rows = read_table(tmp_path / "routing" / "saturation.csv")
    assert tuple(rows[0]) == SATURATION
    analysed = [0, 2, 4, END]
    assert [(int(r["step"]), int(r["layer"])) for r in rows] == [
        (s, layer) for s in analysed for layer in LAYERS
    ]
    for row in rows:
        step, layer = int(row["step"]), int(row["layer"])
        assert int(row["final_step"]) == END and row["probe"] == "held_out"
        direct = router_saturation(
            routing[step][layer], routing[END][layer], N_EXPERTS, probe.token_mask
        )
        assert float(row["saturation_top1"]) == direct.top1
        assert float(row["saturation_top1_chance"]) == direct.top1_chance
        assert float(row["saturation_topk"]) == direct.topk
        assert float(row["saturation_topk_chance"]) == direct.topk_chance
        # what analyze puts in specialisation.csv for a checkpoint of this step
        metrics = specialisation(probe, routing[step], routing[END], N_EXPERTS, SETTINGS)
        assert float(row["saturation_topk"]) == metrics[layer].saturation_topk
    step0 = [float(r["saturation_top1"]) for r in rows if r["step"] == "0"]
    assert all(0 < v < 1 for v in step0)  # the routers moved: not the final routing
    assert all(float(r["saturation_top1"]) == 1.0 for r in rows if int(r["step"]) == END)
    assert (tmp_path / "routing" / "saturation.png").read_bytes()[:4] == b"\x89PNG"
    kept = callback.state_dict()["experts"]
    assert sorted(kept) == analysed
    assert kept[0].dtype == torch.int8
    assert kept[0].shape == (len(LAYERS), int(probe.scored.sum()), 2)  # layers x scored x k


def test_the_kept_routing_travels_in_the_checkpoint(setup, tmp_path, caplog):
    """A run resumed at step 2 from its saved state (loaded with weights_only, as a checkpoint
    is) writes the uninterrupted run's saturation.csv; a state saved without the routing gives
    the steps analysed since the resume, and warns."""
    module, probe, trainer = setup
    whole = _callback("whole", trainer, module, tmp_path)
    whole.on_train_start(trainer, module)
    _train_step(module, probe, STEPS[0], trainer, [whole])
    path = tmp_path / "state.pt"
    torch.save(whole.state_dict(), path)
    state = torch.load(path, weights_only=True)

    resumed = _callback("resumed", trainer, module, tmp_path)
    resumed.load_state_dict(state)
    old = _callback("old", trainer, module, tmp_path)
    with pytest.warns(UserWarning, match="holds no routing of the earlier analysis steps"):
        old.load_state_dict({k: v for k, v in state.items() if k != "experts"})
    callbacks = [whole, resumed, old]
    for callback in callbacks[1:]:
        callback.on_train_start(trainer, module)  # resumed at step 2: not analysed again
    for step in STEPS[1:]:
        _train_step(module, probe, step, trainer, callbacks)
    trainer.global_step = END
    _move_routers(module, END)
    with caplog.at_level(logging.WARNING, logger=callback_module.__name__):
        for callback in callbacks:
            callback.on_train_end(trainer, module)

    expected = (tmp_path / "whole" / "saturation.csv").read_bytes()
    assert (tmp_path / "resumed" / "saturation.csv").read_bytes() == expected
    rows = read_table(tmp_path / "whole" / "saturation.csv")
    assert read_table(tmp_path / "old" / "saturation.csv") == [
        r for r in rows if r["step"] in ("4", str(END))
    ]
    (warning,) = [r.getMessage() for r in caplog.records if "saturation covers" in r.getMessage()]
    assert "from 4 on" in warning and "steps 0, 2" in warning
