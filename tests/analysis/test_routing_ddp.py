"""Routing figures under DDP: two ddp_spawn CPU ranks that see different domains.

The eval-mode counts in ``routing/counts.csv`` must equal one process routing the same probe
with the final weights; the training-time window counts must equal a tally kept outside the
module (forward hooks); and both must hold after resuming from a mid-window checkpoint. Router
saturation (``routing/saturation.csv``) reads every probe token, whichever rank routed it: the
resumed run's step 0 (kept in the checkpoint) against its final step equals one process routing
the probe with the initial and the final weights.
"""

from __future__ import annotations

import functools
import json
from collections import defaultdict
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from moe_emergence.analysis import RoutingAnalysis, build_probe, route_blocks
from moe_emergence.analysis.specialisation import router_saturation
from moe_emergence.analysis.tables import read_table
from moe_emergence.data import MixedDomainDataModule, collate_packed
from moe_emergence.model.gpt2_moe import moe_layers
from moe_emergence.model.module import MoEGPT2Module

DOMAINS = ("code", "math", "prose")
BLOCK, BATCH, EXPERTS = 16, 3, 4


class DomainsByRank(MixedDomainDataModule):
    """Rank 0 trains on code blocks only, rank 1 on math and prose (same number of batches)."""

    def train_dataloader(self) -> DataLoader:
        packed, rank = self.train_packed, self.trainer.global_rank
        mine = ["code"] if rank == 0 else ["math", "prose"]
        block = lambda d, i: torch.from_numpy(packed.domain_blocks(d)[i].astype(np.int64))  # noqa: E731
        items = [{"input_ids": block(d, i), "domain": d} for i in range(12) for d in mine][:24]
        return DataLoader(items, batch_size=BATCH, collate_fn=collate_packed)


class TallyRouting(L.Callback):
    """Outside the module: forward hooks on the MoE layers count the training forwards'
    (domain, expert) assignments per optimizer step; each rank writes ``tally<rank>.json``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_fit_start(self, trainer, pl_module) -> None:
        self.tally: dict[int, dict[int, list]] = defaultdict(dict)
        self.domains: list[str] = []
        for layer, moe in moe_layers(pl_module.model).items():
            moe.register_forward_hook(functools.partial(self._count, trainer, layer))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.domains = list(batch["domains"])

    def _count(self, trainer, layer, module, args, output) -> None:
        if not module.training:  # the probe's eval-mode forwards are not training
            return
        step = trainer.global_step + 1  # the optimizer step this micro-batch belongs to
        table = self.tally[step].setdefault(layer, np.zeros((3, EXPERTS), dtype=int).tolist())
        experts = module.last_indices.view(len(self.domains), -1).cpu()
        for domain, row in zip(self.domains, experts, strict=True):
            for e in row.tolist():
                table[DOMAINS.index(domain)][e] += 1

    def on_train_end(self, trainer, pl_module) -> None:
        Path(self.out_dir, f"tally{trainer.global_rank}.json").write_text(json.dumps(self.tally))


def make_module(vocab_size: int) -> MoEGPT2Module:
    torch.manual_seed(0)
    return MoEGPT2Module(
        optimizer=functools.partial(torch.optim.AdamW, lr=3e-3),
        block_size=BLOCK,
        pretrained=None,
        vocab_size=vocab_size,
        n_positions=BLOCK,
        n_embd=32,
        n_layer=2,
        n_head=2,
        dropout=0.0,
        moe={"layers": [0, 1], "n_experts": EXPERTS, "noise_std": 1.0, "noise_anneal_steps": 100},
        warmup_steps=1,
        domains=DOMAINS,
    )


def fit(settings: dict, run_dir: Path, max_steps: int, ckpt_path: Path | None = None):
    datamodule = DomainsByRank(**settings)
    module = make_module(len(datamodule.tokenizer))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=max_steps,
        default_root_dir=str(run_dir),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        val_check_interval=max_steps,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        callbacks=[
            RoutingAnalysis(every_n_steps=2, null_permutations=20, batch_size=5),
            TallyRouting(str(run_dir)),
            ModelCheckpoint(
                dirpath=run_dir / "ckpt",
                every_n_train_steps=3,
                save_top_k=-1,
                filename="step{step}",
                auto_insert_metric_name=False,
            ),
        ],
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return module, trainer


def merged_tally(*run_dirs_and_steps: tuple[Path, range]) -> dict[tuple[int, int], np.ndarray]:
    """(step, layer) -> [D, E] summed over both ranks, for the steps kept from each run."""
    out: dict[tuple[int, int], np.ndarray] = defaultdict(lambda: np.zeros((3, EXPERTS), int))
    for run_dir, steps in run_dirs_and_steps:
        for rank in (0, 1):
            tally = json.loads((run_dir / f"tally{rank}.json").read_text())
            for step, layers in tally.items():
                if int(step) in steps:
                    for layer, table in layers.items():
                        out[int(step), int(layer)] += np.array(table)
    return out


def check_windows(run_dir: Path, tally: dict, windows: list[tuple[int, int]]) -> None:
    rows = read_table(run_dir / "routing" / "train_window_counts.csv")
    assert sorted({(int(r["step_start"]), int(r["step_end"])) for r in rows}) == windows
    for start, end in windows:
        for layer in (0, 1):
            expected = sum(tally[s, layer] for s in range(start + 1, end + 1))
            got = np.zeros((3, EXPERTS), int)
            for r in rows:
                if (int(r["step_start"]), int(r["layer"])) == (start, layer):
                    got[DOMAINS.index(r["domain"]), int(r["expert"])] = int(r["assignments"])
            np.testing.assert_array_equal(got, expected, err_msg=f"window {start}-{end} l{layer}")


def check_val_losses(trainer: L.Trainer, module: MoEGPT2Module, settings: dict) -> None:
    """val/loss_<domain> logged under DDP == every held-out token of the domain, weighted alike
    (here, with the final weights: validation ran at the last step)."""
    datamodule = MixedDomainDataModule(**settings)
    datamodule.setup("fit")
    module.eval()
    with torch.no_grad():
        for domain in DOMAINS:
            ids = torch.from_numpy(datamodule.val_dataset.domain_blocks(domain).astype(np.int64))
            logits = module(ids)
            expected = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
            )
            logged = trainer.callback_metrics[f"val/loss_{domain}"]
            assert float(logged) == pytest.approx(float(expected), rel=1e-5), domain


def check_final_counts(run_dir: Path, module: MoEGPT2Module, settings: dict, step: int) -> None:
    """counts.csv at ``step`` == this process routing the same probe with the final weights."""
    datamodule = MixedDomainDataModule(**settings)
    datamodule.setup("fit")
    probe = build_probe(datamodule, DOMAINS)
    assert probe.kind == "held_out"
    assert json.loads((run_dir / "routing" / "probe.json").read_text())["digest"] == probe.digest
    routed = route_blocks(module.model, torch.from_numpy(probe.input_ids), batch_size=7)
    rows = [r for r in read_table(run_dir / "routing" / "counts.csv") if int(r["step"]) == step]
    for layer in (0, 1):
        experts = routed.experts[layer].reshape(-1).numpy()
        domains = np.repeat(probe.block_domains, BLOCK)
        for r in (r for r in rows if int(r["layer"]) == layer):
            d, e = DOMAINS.index(r["domain"]), int(r["expert"])
            assert int(r["tokens"]) == int(((domains == d) & (experts == e)).sum()), r


def check_saturation(run_dir: Path, final: MoEGPT2Module, settings: dict, steps: list[int]):
    """saturation.csv: every analysis step against the last (``steps[-1]``); step 0's and the
    last's equal this process routing the probe with the initial (:func:`make_module`) and the
    final weights."""
    datamodule = MixedDomainDataModule(**settings)
    datamodule.setup("fit")
    probe = build_probe(datamodule, DOMAINS)
    ids = torch.from_numpy(probe.input_ids)
    initial = make_module(len(datamodule.tokenizer))
    routed = {
        step: route_blocks(module.model, ids, batch_size=7).experts
        for step, module in ((0, initial), (steps[-1], final))
    }
    rows = read_table(run_dir / "routing" / "saturation.csv")
    assert [int(r["step"]) for r in rows] == [s for s in steps for _ in (0, 1)]
    assert {int(r["final_step"]) for r in rows} == {steps[-1]}
    for r in (r for r in rows if int(r["step"]) in routed):
        layer = int(r["layer"])
        expected = router_saturation(
            routed[int(r["step"])][layer].numpy(), routed[steps[-1]][layer].numpy(), EXPERTS
        )
        assert float(r["saturation_top1"]) == expected.top1, r
        assert float(r["saturation_top1_chance"]) == expected.top1_chance, r
    assert all(float(r["saturation_top1"]) < 1 for r in rows if r["step"] == "0")


def test_ddp_routing_counts_are_exact_and_survive_resume(tiny_mirror, tiny_tokenizer_dir, tmp_path):
    settings = dict(
        size_mb=1.0,
        block_size=BLOCK,
        tokenizer=str(tiny_tokenizer_dir),
        hub_mirror=str(tiny_mirror),
        cache_dir=str(tmp_path / "cache"),
        batch_size=BATCH,
        eval_fraction=0.2,
        show_progress=False,
        report_dir=str(tmp_path / "report"),
    )
    first = tmp_path / "first"
    module, trainer = fit(settings, first, max_steps=4)
    tally = merged_tally((first, range(1, 5)))
    assert tally[1, 0][0].sum() == 3 * BLOCK and tally[1, 0][1:].sum() == 3 * BLOCK
    check_windows(first, tally, [(0, 2), (2, 4)])
    check_final_counts(first, module, settings, step=4)
    check_val_losses(trainer, module, settings)
    trajectory = read_table(first / "routing" / "trajectory.csv")
    assert [int(r["step"]) for r in trajectory] == [0, 0, 2, 2, 4, 4]

    # Resume on 2 ranks from step 3 (inside the window 2-4): nothing counted twice or lost.
    second = tmp_path / "second"
    module, _ = fit(settings, second, max_steps=6, ckpt_path=first / "ckpt" / "step3.ckpt")
    tally = merged_tally((first, range(1, 4)), (second, range(4, 7)))
    check_windows(second, tally, [(0, 2), (2, 4), (4, 6)])
    check_final_counts(second, module, settings, step=6)
    check_saturation(second, module, settings, steps=[0, 2, 4, 6])
    trajectory = read_table(second / "routing" / "trajectory.csv")
    assert [int(r["step"]) for r in trajectory] == [0, 0, 2, 2, 4, 4, 6, 6]
