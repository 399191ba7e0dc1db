"""Global-batch load balancing (``model.lb_scope=global``): known answers on one device over a
window of micro-batches, on three gloo ranks that each hold one domain, through the
LightningModule (window = accumulation steps, validation leaves it alone, exact resume).

The known answer: each domain's tokens go to their own expert (E = 3) with probability 1, and
the domains are balanced over the ranks or the window. The per-micro-batch loss scores
E * 1 * 1 = 3; with f over the whole window or all ranks, f = 1/3 each and the loss is 1.
"""

from __future__ import annotations

import copy
import json
import socket
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers.moe import random_experts, tiny_module_kwargs
from torch import nn
from torch.utils.data import DataLoader

from moe_emergence.config import compose_config
from moe_emergence.data import collate_packed
from moe_emergence.errors import UserError
from moe_emergence.model.gpt2_moe import moe_layers
from moe_emergence.model.module import LB_WINDOWS_KEY, MoEGPT2Module
from moe_emergence.model.moe import (
    GlobalAssignmentCounts,
    MoELayer,
    global_load_balancing_loss,
    load_balancing_loss,
)

E = 3  # experts = domains
DOMAINS = ("code", "math", "prose")


def one_domain(expert: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """n tokens all routed to ``expert`` with probability exactly 1: (probs [n, E], indices)."""
    indices = torch.full((n, 1), expert)
    return nn.functional.one_hot(indices[:, 0], E).float(), indices


def specialised_layer(**lb) -> MoELayer:
    """An MoE layer (d = E) whose router sends a token 50 * e_d to expert d with probability
    1.0 in float32 (the others get e^-50). Width 3 is no multiple of 8, so the grouped GEMM
    cannot take it: the loop path, which runs at any width."""
    experts = random_experts(E, E, 2 * E)
    layer = MoELayer(experts, top_k=1, noise_std=0.0, dispatch="loop", **lb)
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.eye(E))
    return layer


def domain_tokens(domain: int, batch: int = 2, time: int = 4) -> torch.Tensor:
    """[batch, time, E] hidden states of one domain: every token 50 * e_domain."""
    return (50.0 * nn.functional.one_hot(torch.tensor(domain), E).float()).expand(batch, time, E)


# --- one device, a window of micro-batches ------------------------------------------------


def test_known_answer_over_a_window_of_three_micro_batches():
    window = GlobalAssignmentCounts(E, window=3)
    batch_scope, global_scope = [], []
    for step in range(6):  # two rounds of code, math, prose micro-batches
        probs, indices = one_domain(step % E)
        batch_scope.append(load_balancing_loss(probs, indices, E).item())
        counts = torch.bincount(indices[:, 0], minlength=E)
        global_scope.append(global_load_balancing_loss(probs, window.update(counts)).item())
    assert batch_scope == pytest.approx([3.0] * 6)
    # While the window fills, f covers the micro-batches so far: 3, then 3 * 1/2, then 1.
    assert global_scope == pytest.approx([3.0, 1.5, 1.0, 1.0, 1.0, 1.0])
    assert window.updates == 6
    assert window.counts.tolist() == [[8, 0, 0], [0, 8, 0], [0, 0, 8]]


def test_known_answer_through_the_layer_and_only_training_forwards_count():
    layer = specialised_layer(lb_scope="global", lb_window=3).train()
    batch_layer = specialised_layer().train()
    losses, batch_losses = [], []
    for step in range(6):
        hidden = domain_tokens(step % E)
        layer(hidden).sum().backward()
        batch_layer(hidden)
        assert (layer.last_indices == step % E).all()
        losses.append(layer.last_lb_loss.item())
        batch_losses.append(batch_layer.last_lb_loss.item())
        # Eval and no-grad forwards (validation, routing probes) neither push nor reduce;
        # they report the batch-scope loss of their own tokens.
        layer.eval()
        layer(domain_tokens(0))
        layer.train()
        with torch.no_grad():
            layer(domain_tokens(1))
        assert layer.last_lb_loss.item() == pytest.approx(3.0)
    assert batch_losses == pytest.approx([3.0] * 6)
    assert losses == pytest.approx([3.0, 1.5, 1.0, 1.0, 1.0, 1.0])
    assert layer.lb_counts.updates == 6
    assert layer.router.gate.weight.grad is not None


def test_window_of_one_on_one_device_is_the_batch_loss():
    torch.manual_seed(0)
    window = GlobalAssignmentCounts(4, window=1)
    for _ in range(3):
        probs = torch.randn(10, 4).softmax(-1)
        indices = probs.topk(2, dim=-1).indices
        f = window.update(torch.bincount(indices.reshape(-1), minlength=4))
        torch.testing.assert_close(
            global_load_balancing_loss(probs, f), load_balancing_loss(probs, indices, 4)
        )


def test_gradient_flows_through_the_local_probabilities_only():
    probs = torch.full((4, E), 1.0 / E, requires_grad=True)
    fraction = torch.tensor([0.5, 0.25, 0.25], requires_grad=True)
    global_load_balancing_loss(probs, fraction).backward()
    # d/dP_nj of E * sum_i f_i * mean_n P_ni = E * f_j / N
    torch.testing.assert_close(probs.grad, (E * fraction.detach() / 4).expand(4, E))
    assert fraction.grad is None


def test_window_is_neither_buffer_nor_state_and_survives_copies():
    layer = specialised_layer(lb_scope="global", lb_window=2).train()
    layer(domain_tokens(0))
    assert not [name for name, _ in layer.named_buffers() if "lb" in name]
    assert set(layer.state_dict()) == set(specialised_layer().state_dict())
    clone = copy.deepcopy(layer)
    assert torch.equal(clone.lb_counts.counts, layer.lb_counts.counts)
    assert "lb_scope=global, lb_window=2" in repr(layer)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lb_scope": "local"}, r"model\.lb_scope.*batch.*global"),
        ({"lb_scope": "global", "lb_window": 0}, r"model\.lb_window.*>= 1"),
        ({"lb_scope": "global", "lb_window": 2.5}, r"model\.lb_window"),
        ({"lb_scope": "global", "lb_window": True}, r"model\.lb_window"),
    ],
)
def test_bad_settings_are_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        MoEGPT2Module(**module_kwargs(**kwargs))
    with pytest.raises(UserError, match=match):
        specialised_layer(**{"lb_window": 1, **kwargs})


def test_config_default_is_the_batch_scope():
    cfg = compose_config(["model=tiny_moe"])
    assert cfg.model.lb_scope == "batch" and cfg.model.lb_window is None


# --- three ranks, one domain each ---------------------------------------------------------


def _rank_worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=30),
    )
    try:
        torch.manual_seed(rank)
        glob = specialised_layer(lb_scope="global", lb_window=1).train()
        batch = specialised_layer(lb_scope="batch").train()
        result: dict[str, list] = {"global": [], "batch": []}
        for _ in range(2):
            glob(domain_tokens(rank)).sum().backward()
            batch(domain_tokens(rank))
            result["global"].append(glob.last_lb_loss.item())
            result["batch"].append(batch.last_lb_loss.item())
            if rank == 0:  # forwards that only one rank runs must not reduce (or this hangs)
                glob.eval()
                glob(domain_tokens(rank))
                glob.train()
                with torch.no_grad():
                    glob(domain_tokens(rank))
        result["counts"] = glob.lb_counts.counts.tolist()
        result["updates"] = glob.lb_counts.updates
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_three_ranks_each_holding_one_domain(tmp_path):
    mp.spawn(_rank_worker, args=(3, _free_port(), str(tmp_path)), nprocs=3, join=True)
    for rank in range(3):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["global"] == pytest.approx([1.0, 1.0]), rank
        assert result["batch"] == pytest.approx([3.0, 3.0]), rank
        assert result["counts"] == [[8, 8, 8]]  # 2 x 4 tokens per rank, reduced over ranks
        assert result["updates"] == 2


# --- through the LightningModule ------------------------------------------------------------

BLOCK, BATCH = 16, 2


def module_kwargs(**overrides) -> dict:
    """The tiny module with blocks of BLOCK tokens, E experts, no router noise or dropout."""
    return tiny_module_kwargs(
        block_size=BLOCK,
        vocab_size=64,
        n_positions=BLOCK,
        dropout=0.0,
        moe={"layers": [1], "n_experts": E, "noise_std": 0.0},
        warmup_steps=1,
        **overrides,
    )


def loader(n_batches: int, seed: int = 0) -> DataLoader:
    """n_batches of BATCH blocks, one domain per batch (code, math, prose, code, ...)."""
    ids = torch.randint(
        0, 64, (n_batches * BATCH, BLOCK), generator=torch.Generator().manual_seed(seed)
    )
    items = [{"input_ids": ids[i], "domain": DOMAINS[(i // BATCH) % E]} for i in range(len(ids))]
    return DataLoader(items, batch_size=BATCH, collate_fn=collate_packed)


def trainer(root: Path, max_steps: int, accumulate: int, **kwargs) -> L.Trainer:
    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        default_root_dir=str(root),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


@pytest.mark.parametrize(("lb_window", "expected"), [(None, 2), (5, 5)])
def test_module_trains_with_a_window_of_the_accumulation_steps(tmp_path, lb_window, expected):
    torch.manual_seed(0)
    module = MoEGPT2Module(**module_kwargs(lb_scope="global", lb_window=lb_window))
    fit = trainer(
        tmp_path,
        max_steps=3,
        accumulate=2,
        num_sanity_val_steps=2,
        limit_val_batches=2,
        check_val_every_n_epoch=1,
    )
    fit.fit(module, train_dataloaders=loader(6), val_dataloaders=loader(3, seed=1))
    window = moe_layers(module.model)[1].lb_counts
    assert window.window == expected
    assert window.updates == 6  # the 6 training micro-batches; sanity and val forwards not
    filled = window.counts[window.counts.sum(1) > 0]
    assert len(filled) == min(expected, 6)
    assert (filled.sum(1) == BATCH * BLOCK).all()
    assert torch.isfinite(fit.callback_metrics["train/lb_loss"])


class WindowAt(L.Callback):
    """Snapshot of MoE block 1's window (counts, position, updates) when training starts and
    before the first micro-batch of optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step, self.snapshots = step, {}

    def _snap(self, pl_module) -> tuple:
        w = moe_layers(pl_module.model)[1].lb_counts
        return w.counts.clone(), w.position, w.updates

    def on_train_start(self, trainer, pl_module) -> None:
        self.snapshots["start"] = self._snap(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and "step" not in self.snapshots:
            self.snapshots["step"] = self._snap(pl_module)


def test_resume_continues_the_window(tmp_path):
    """Stop after step 2 and resume: the window the resumed run starts from is the one the
    uninterrupted run had before step 3's micro-batches (saved in the checkpoint, restored
    after ``setup`` made an empty one); a checkpoint without it starts empty."""

    def run(max_steps: int, root: Path, ckpt_path: Path | None = None) -> tuple:
        torch.manual_seed(0)
        module = MoEGPT2Module(**module_kwargs(lb_scope="global"))
        spy = WindowAt(step=2)
        fit = trainer(root, max_steps=max_steps, accumulate=2, callbacks=[spy])
        fit.fit(module, train_dataloaders=loader(8), ckpt_path=ckpt_path)
        return fit, spy.snapshots

    _, whole = run(4, tmp_path / "whole")
    half, _ = run(2, tmp_path / "half")
    half.save_checkpoint(tmp_path / "half.ckpt")
    checkpoint = torch.load(tmp_path / "half.ckpt", weights_only=False)
    saved = checkpoint[LB_WINDOWS_KEY][1]
    assert saved["updates"] == 4 and saved["counts"].sum() == 2 * BATCH * BLOCK

    _, resumed = run(4, tmp_path / "resumed", ckpt_path=tmp_path / "half.ckpt")
    counts, position, updates = resumed["start"]
    assert torch.equal(counts, saved["counts"]) and (position, updates) == (0, 4)
    assert torch.equal(counts, whole["step"][0]) and whole["step"][1:] == (0, 4)

    del checkpoint[LB_WINDOWS_KEY]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    _, old = run(4, tmp_path / "old", ckpt_path=tmp_path / "old.ckpt")
    assert old["start"][0].sum() == 0 and old["start"][2] == 0
