"""The LightningModule: GPT-2 with MoE layers, LM + auxiliary losses, per-domain metrics and
domain x expert routing analysis (``routing.csv``, ``routing.png`` in the run dir)."""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only

from moe_emergence.model.gpt2_moe import (
    build_gpt2,
    collect_aux_outputs,
    install_moe_layers,
    moe_layers,
    set_router_step,
)
from moe_emergence.model.routing import (
    collapsed_layers,
    count_assignments,
    plot_routing,
    router_entropy,
    write_routing_csv,
)

log = logging.getLogger(__name__)

DOMAINS = ("code", "math", "prose")
RECENT_STEPS = 50
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
    ``_partial_: true``). ``block_size`` (tokens per block) must fit ``n_positions``.
    """

    def __init__(
        self,
        optimizer: OptimizerFactory,
        block_size: int,
        pretrained: str | None = "gpt2",
        hub_mirror: str | None = None,
        vocab_size: int | None = None,
        n_positions: int = 1024,
        n_embd: int = 768,
        n_layer: int = 12,
        n_head: int = 12,
        dropout: float = 0.0,
        moe: Mapping[str, Any] | None = None,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        lb_coef: float = 0.01,
        z_coef: float = 0.001,
        domains: Sequence[str] = DOMAINS,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.model = build_gpt2(
            pretrained, hub_mirror, vocab_size, n_positions, n_embd, n_layer, n_head, dropout
        )
        n_positions = self.model.config.n_positions
        if block_size > n_positions:
            raise ValueError(
                f"data.block_size={block_size} exceeds the model's n_positions={n_positions}: "
                f"lower data.block_size (or, from scratch, raise model.n_positions)."
            )
        if moe:
            install_moe_layers(self.model, **dict(moe))
        self.optimizer_factory = optimizer
        self.domains = tuple(domains)
        self._domain_index = {d: i for i, d in enumerate(self.domains)}
        for layer, moe_layer in moe_layers(self.model).items():
            counts = torch.zeros(len(self.domains), moe_layer.n_experts, dtype=torch.long)
            self.register_buffer(f"routing_counts_{layer}", counts)
        self._step_started: float | None = None
        self._recent_losses = {d: deque(maxlen=RECENT_STEPS) for d in self.domains}

    # ------------------------------------------------------------------ forward and losses

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, vocab] for ``input_ids`` [B, T]."""
        return self.model(input_ids=input_ids).logits

    def _domain_ids(self, domains: Sequence[str]) -> torch.Tensor:
        try:
            ids = [self._domain_index[d] for d in domains]
        except KeyError as exc:
            raise ValueError(
                f"Batch has domain {exc.args[0]!r}, not in model.domains={list(self.domains)}."
            ) from None
        return torch.tensor(ids, device=self.device)

    def _losses(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Per-block LM loss [B] (mean over next-token predictions) and the aux outputs."""
        ids = batch["input_ids"]
        logits = self(ids)
        per_token = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            ids[:, 1:].reshape(-1),
            reduction="none",
        )
        per_block = per_token.view(ids.shape[0], -1).mean(1)
        domain_ids = self._domain_ids(batch["domains"])
        return per_block, domain_ids, collect_aux_outputs(self.model)

    def _log_per_domain(self, prefix: str, per_block: torch.Tensor, domain_ids: torch.Tensor,
                        on_step: bool) -> None:  # fmt: skip
        for d, domain in enumerate(self.domains):
            mask = domain_ids == d
            if mask.any():
                if prefix == "train":
                    self._recent_losses[domain].append(float(per_block[mask].mean()))
                self.log(f"{prefix}/loss_{domain}", per_block[mask].mean(), on_step=on_step,
                         on_epoch=not on_step, batch_size=int(mask.sum()))  # fmt: skip

    # ------------------------------------------------------------------ training

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
        self._log_per_domain("train", per_block.detach(), domain_ids, on_step=True)
        self._count_routing(aux.routing, domain_ids, batch["input_ids"].shape[1])
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._step_started is not None:
            seconds = time.perf_counter() - self._step_started
            self.log("train/tokens_per_s", batch["input_ids"].numel() / max(seconds, 1e-9))

    @torch.no_grad()
    def _count_routing(
        self, routing: Mapping[int, tuple[torch.Tensor, torch.Tensor]], domain_ids: torch.Tensor,
        seq_len: int,
    ) -> None:  # fmt: skip
        token_domains = domain_ids.repeat_interleave(seq_len)
        for layer, (indices, probs) in routing.items():
            counts: torch.Tensor = getattr(self, f"routing_counts_{layer}")
            counts += count_assignments(token_domains, indices, *counts.shape)
            self.log(f"train/router_entropy_l{layer}", router_entropy(probs))

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        per_block, domain_ids, _ = self._losses(batch)
        self.log("val/loss", per_block.mean(), prog_bar=True, batch_size=per_block.shape[0])
        self._log_per_domain("val", per_block, domain_ids, on_step=False)

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

    def recent_domain_losses(self) -> dict[str, float]:
        """Per domain, the mean train LM loss over its last (up to 50) logged steps."""
        return {d: sum(v) / len(v) for d, v in self._recent_losses.items() if v}

    # ------------------------------------------------------------------ routing analysis

    def routing_counts(self) -> dict[int, torch.Tensor]:
        """Domain x expert assignment counts accumulated over training, per MoE layer."""
        return {
            layer: getattr(self, f"routing_counts_{layer}").detach().cpu()
            for layer in moe_layers(self.model)
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the routing counts summed over DDP ranks (called on every rank)."""
        if self.trainer.world_size > 1:
            for layer, counts in self.routing_counts().items():
                total = self.all_gather(counts.to(self.device)).sum(0).cpu()
                checkpoint["state_dict"][f"routing_counts_{layer}"] = total

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rank 0 resumes the summed counts; the other ranks start from zero, so that the sum
        gathered at the end of fit counts every routing assignment once."""
        trainer = self._trainer
        if trainer is not None and trainer.global_rank != 0:
            for key, value in checkpoint["state_dict"].items():
                if key.startswith("routing_counts_"):
                    checkpoint["state_dict"][key] = torch.zeros_like(value)

    def on_fit_end(self) -> None:
        counts = self.routing_counts()
        if counts:
            if self.trainer.world_size > 1:
                counts = {
                    k: self.all_gather(v.to(self.device)).sum(0).cpu() for k, v in counts.items()
                }
            self._write_routing(counts)

    @rank_zero_only
    def _write_routing(self, counts: dict[int, torch.Tensor]) -> None:
        out = Path(self.trainer.default_root_dir)
        out.mkdir(parents=True, exist_ok=True)
        csv_path = write_routing_csv(counts, self.domains, out / "routing.csv")
        png_path = plot_routing(counts, self.domains, out / "routing.png")
        log.info("Routing written to %s and %s", csv_path, png_path)
        for layer, (expert, share) in collapsed_layers(counts).items():
            log.warning(
                "Router collapse in layer %d: expert %d took %.1f%% of the tokens (> 90%%). "
                "Consider a larger model.lb_coef or more router noise.",
                layer, expert, 100 * share,
            )  # fmt: skip
