"""The LightningModule: GPT-2 with MoE layers, LM + auxiliary losses, per-domain metrics.

Routing analysis (what the experts do) is not here: see :mod:`moe_emergence.analysis`.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import lightning as L
import torch

from moe_emergence.distributed import sum_over_ranks
from moe_emergence.errors import UserError
from moe_emergence.model.gpt2_moe import (
    build_gpt2,
    collect_aux_outputs,
    install_moe_layers,
    moe_layers,
    next_token_losses,
    set_load_balancing,
    set_router_step,
)
from moe_emergence.model.moe import check_lb_settings, router_entropy

log = logging.getLogger(__name__)
RECENT_STEPS = 50
LB_WINDOWS_KEY = "moe_lb_windows"  # checkpoint key: MoE block index -> global LB window state
OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up from 0 to 1 over ``warmup_steps``, then cosine to
    ``min_ratio`` at ``total_steps`` (held there after)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class MoEGPT2Module(L.LightningModule):
    """loss = LM loss + ``lb_coef`` * load-balancing loss + ``z_coef`` * router z-loss.

    The GPT-2 is :func:`build_gpt2` (``pretrained`` by name or folder, or from the size
    arguments when None); ``moe`` holds the keyword arguments of :func:`install_moe_layers`
    (None: the dense baseline); ``optimizer`` is a partial taking the parameters (Hydra
    ``_partial_: true``). ``block_size`` (tokens per block) must fit ``n_positions`` (None: the
    pretrained weights', else 1024).

    ``lb_scope``: ``batch`` computes the load-balancing loss ``E * sum_i f_i * P_i`` on each
    micro-batch; ``global`` takes f_i from the assignments summed over all DDP ranks and the
    last ``lb_window`` training micro-batches (None: ``trainer.accumulate_grad_batches``, read
    at fit start), P_i still local (Qiu et al. 2025). The window is saved in checkpoints
    (``moe_lb_windows``) so that resumes continue it.
    """

    def __init__(
        self,
        optimizer: OptimizerFactory,
        block_size: int,
        pretrained: str | None = "gpt2",
        hub_mirror: str | None = None,
        vocab_size: int | None = None,
        n_positions: int | None = None,
        n_embd: int = 768,
        n_layer: int = 12,
        n_head: int = 12,
        dropout: float = 0.0,
        moe: Mapping[str, Any] | None = None,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        lb_coef: float = 0.01,
        z_coef: float = 0.001,
        domains: Sequence[str] | None = None,
        lb_scope: str = "batch",
        lb_window: int | None = None,
    ) -> None:
        super().__init__()
        if not domains:
            raise UserError(
                "MoEGPT2Module needs domains: the data's domain labels, in order (train.py "
                "passes moe_emergence.data.DOMAINS)."
            )
        check_lb_settings(lb_scope, 1 if lb_window is None else lb_window)
        self.save_hyperparameters(ignore=["optimizer"])
        self.model = build_gpt2(
            pretrained, hub_mirror, vocab_size, n_positions, n_embd, n_layer, n_head, dropout
        )
        n_positions = self.model.config.n_positions
        if block_size > n_positions:
            raise UserError(
                f"data.block_size={block_size} exceeds the model's n_positions={n_positions}: "
                f"lower data.block_size (or, from scratch, raise model.n_positions)."
            )
        if moe:
            install_moe_layers(self.model, **dict(moe))
        # Until fit start resolves a null window from the trainer, f covers one micro-batch.
        set_load_balancing(self.model, lb_scope, lb_window or 1)
        self.optimizer_factory = optimizer
        self.domains = tuple(domains)
        self._domain_index = {d: i for i, d in enumerate(self.domains)}
        self._step_started: float | None = None
        # Per domain, (summed block loss, blocks) of this rank's last logged steps.
        self._recent = {d: deque(maxlen=RECENT_STEPS) for d in self.domains}
        # Held-out sums of this rank for the current validation epoch: [D] loss sum, [D] tokens.
        self._val_loss_sum: torch.Tensor | None = None
        self._val_tokens: torch.Tensor | None = None
        # from_pretrained returns eval mode and Lightning keeps module modes: without this,
        # dropout would never apply (experts are copies of those MLPs).
        self.train()

    # ------------------------------------------------------------------ forward and losses

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, vocab] for ``input_ids`` [B, T]."""
        return self.model(input_ids=input_ids).logits

    def _domain_ids(self, domains: Sequence[str]) -> torch.Tensor:
        try:
            ids = [self._domain_index[d] for d in domains]
        except KeyError as exc:
            raise UserError(
                f"Batch has domain {exc.args[0]!r}, not among the model's domains "
                f"{list(self.domains)}."
            ) from None
        return torch.tensor(ids, device=self.device)

    def _losses(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Per-block LM loss [B] (mean over next-token predictions) and the aux outputs."""
        ids = batch["input_ids"]
        logits = self(ids)
        per_block = next_token_losses(logits, ids).mean(1)
        domain_ids = self._domain_ids(batch["domains"])
        return per_block, domain_ids, collect_aux_outputs(self.model)

    # ------------------------------------------------------------------ training

    def setup(self, stage: str) -> None:
        """At fit start: an empty global load-balancing window of ``lb_window`` micro-batches
        (None: the trainer's ``accumulate_grad_batches``). A resume then restores the saved
        window (:meth:`on_load_checkpoint` runs after this hook)."""
        if stage != "fit" or self.hparams.lb_scope != "global":
            return
        window = self.hparams.lb_window or int(self.trainer.accumulate_grad_batches)
        set_load_balancing(self.model, "global", window)
        log.info("Global-batch load balancing: f over all ranks and the last %d micro-batches.",
                 window)  # fmt: skip

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        set_router_step(self.model, self.global_step)
        self._step_started = time.perf_counter()

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        per_block, domain_ids, aux = self._losses(batch)
        lm_loss = per_block.mean()
        loss = lm_loss + self.hparams.lb_coef * aux.lb_loss + self.hparams.z_coef * aux.z_loss
        size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/lm_loss", lm_loss, batch_size=size)
        self.log("train/lb_loss", aux.lb_loss, batch_size=size)
        self.log("train/z_loss", aux.z_loss, batch_size=size)
        per_block = per_block.detach()
        for d, domain in enumerate(self.domains):
            mask = domain_ids == d
            if mask.any():
                n = int(mask.sum())
                self._recent[domain].append((float(per_block[mask].sum()), n))
                self.log(f"train/loss_{domain}", per_block[mask].mean(), batch_size=n)
        for layer, (_, logits) in aux.routing.items():
            # The router's own uncertainty (clean logits), not that of its training noise.
            self.log(f"train/router_entropy_l{layer}", router_entropy(logits), batch_size=size)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._step_started is not None:
            seconds = time.perf_counter() - self._step_started
            self.log("train/tokens_per_s", batch["input_ids"].numel() / max(seconds, 1e-9))

    def final_domain_losses(self) -> dict[str, float]:
        """Per domain, the mean train LM loss of its blocks over the last (up to) 50 steps in
        which it appeared, over all ranks. Collective under DDP: call on every rank."""
        local = torch.tensor(
            [[sum(s for s, _ in self._recent[d]), sum(n for _, n in self._recent[d])]
             for d in self.domains],
            dtype=torch.float64, device=self.device,
        )  # fmt: skip
        total = sum_over_ranks(local).cpu()
        return {d: float(total[i, 0] / total[i, 1]) for i, d in enumerate(self.domains)
                if total[i, 1] > 0}  # fmt: skip

    # ------------------------------------------------------------------ validation

    def on_validation_epoch_start(self) -> None:
        n = len(self.domains)
        self._val_loss_sum = torch.zeros(n, dtype=torch.float64, device=self.device)
        self._val_tokens = torch.zeros(n, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        per_block, domain_ids, _ = self._losses(batch)
        predicted = batch["input_ids"].shape[1] - 1  # next-token predictions per block
        self._val_loss_sum.index_add_(0, domain_ids, per_block.double() * predicted)
        self._val_tokens.index_add_(
            0, domain_ids, torch.full_like(per_block, predicted, dtype=torch.float64)
        )

    def on_validation_epoch_end(self) -> None:
        """``val/loss`` and ``val/loss_<domain>``: token-weighted over every rank's held-out
        blocks (sums of losses and of tokens reduced, then divided)."""
        sums = sum_over_ranks(torch.stack([self._val_loss_sum, self._val_tokens]))
        loss_sum, tokens = sums[0], sums[1]
        if tokens.sum() == 0:
            return
        self.log("val/loss", (loss_sum.sum() / tokens.sum()).float(), prog_bar=True)
        for d, domain in enumerate(self.domains):
            if tokens[d] > 0:
                self.log(f"val/loss_{domain}", (loss_sum[d] / tokens[d]).float())

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(self.parameters())
        total = int(self.trainer.estimated_stepping_batches)
        warmup, ratio = self.hparams.warmup_steps, self.hparams.min_lr_ratio
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, total, ratio)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the global load-balancing windows (the same on every rank: reduced counts)."""
        windows = {i: layer.lb_counts.state_dict() for i, layer in moe_layers(self.model).items()
                   if layer.lb_counts is not None}  # fmt: skip
        if windows:
            checkpoint[LB_WINDOWS_KEY] = windows

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the global load-balancing windows (a window of another size starts empty).
        Checkpoints of earlier versions kept routing counts as buffers: drop them."""
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("routing_counts_")]:
            del state[key]
        saved = checkpoint.get(LB_WINDOWS_KEY) or {}
        for i, layer in moe_layers(self.model).items():
            if layer.lb_counts is None or i not in saved:
                continue
            try:
                layer.lb_counts.load_state_dict(saved[i])
            except ValueError as exc:
                # Without a trainer (e.g. load_from_checkpoint for inference) nothing trains.
                report = log.warning if self._trainer is not None else log.debug
                report("MoE layer %d: %s; its load-balancing window starts empty.", i, exc)
