"""The LightningModule: GPT-2 with MoE layers, LM + auxiliary losses, per-domain metrics.

Routing analysis (what the experts do) is not here: see :mod:`moe_emergence.analysis`.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import lightning as L
import torch

from moe_emergence.distributed import gather_objects, sum_over_ranks
from moe_emergence.errors import UserError
from moe_emergence.model.gpt2_moe import (
    build_model,
    collect_aux_outputs,
    moe_layers,
    next_token_losses,
    routing_domains,
    set_load_balancing,
    set_router_step,
)
from moe_emergence.model.losses import check_lb_settings, router_entropy
from moe_emergence.model.router import check_domain_map
from moe_emergence.model.settings import ModelSettings, MoESettings

log = logging.getLogger(__name__)
RECENT_STEPS = 50
LB_WINDOWS_KEY = "moe_lb_windows"  # checkpoint key: MoE block index -> global LB window state
DISPATCH_KEY = "moe_dispatch"  # checkpoint and summary key: the MoE layers' dispatch path
RECENT_LOSSES_KEY = "recent_domain_losses"  # checkpoint key: each rank's RecentDomainLosses
OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]


def check_compile(compile: bool, dispatch: str | None, precision: str) -> None:
    """Refuse ``model.compile=true`` with ``model.moe.dispatch=grouped`` outside bf16: torch's
    compiled grouped GEMM takes bf16 only (``auto`` picks grouped only in bf16)."""
    if compile and dispatch == "grouped" and not str(precision).startswith("bf16"):
        raise UserError(
            f"model.compile=true with model.moe.dispatch=grouped needs bf16 (the compiled "
            f"grouped GEMM takes bf16 only), got trainer.precision={precision}: set "
            f"trainer.precision=bf16-mixed, or model.moe.dispatch=auto (loop outside bf16)."
        )


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

    ``compile``: ``torch.compile`` each transformer block in place (state-dict keys unchanged;
    attention stays Hugging Face's SDPA call, which the compiler lowers to the fused kernel).
    The MoE layers' dispatch (``moe.dispatch``) is resolved at fit start for the trainer's
    device and precision (:attr:`dispatch`), saved in checkpoints (``moe_dispatch``) and in
    ``summary.json``.

    ``moe.router`` (:class:`MoESettings`): under a ``frozen``, ``hash`` or ``domain`` router no
    loss has a gradient path through the router, so the load-balancing and z-losses are
    constants: still computed, logged (``train/lb_loss``: how balanced the fixed routing is)
    and added to ``train/loss``, changing nothing that trains. A ``domain`` router reads each
    block's domain, handed to the model's forward (:meth:`forward`).

    A training step reads nothing back to the host except at logging steps (every
    ``trainer.log_every_n_steps``): per-domain losses accumulate on the device.
    ``train/loss_<domain>`` is the mean over the domain's blocks of the logging step (nan when
    it has none).
    ``train/tokens_per_s`` (per device) covers the training steps only (forward, backward,
    optimizer; not validation, routing analysis or checkpoints), averaged over the steps since
    the last logging step, with a device synchronisation at that step.
    """

    def __init__(
        self,
        optimizer: OptimizerFactory,
        block_size: int,
        vocab_size: int | None = None,
        domains: Sequence[str] | None = None,
        moe: Mapping[str, Any] | None = None,
        **settings: Any,
    ) -> None:
        """``block_size``, ``vocab_size`` and ``domains``: the data's (the wiring hands them
        over; ``vocab_size`` None: the pretrained model's, else GPT-2's 50257); ``moe``: the
        ``model.moe.*`` fields (:class:`MoESettings`; None: dense); ``settings``: the
        ``model.*`` fields (:class:`ModelSettings`, defaults for those not given)."""
        super().__init__()
        if not domains:
            raise UserError(
                "MoEGPT2Module needs domains: the data's domain labels, in order (the wiring "
                "hands over the datamodule's domains)."
            )
        window = settings.get("lb_window")
        check_lb_settings(settings.get("lb_scope", "batch"), 1 if window is None else window)
        self.settings = ModelSettings.from_fields(settings)
        self.moe_settings = MoESettings.from_fields(moe) if moe is not None else None
        self.save_hyperparameters(
            {
                "block_size": block_size,
                "vocab_size": vocab_size,
                "domains": list(domains),
                **self.settings.to_dict(),
                "moe": self.moe_settings.to_dict() if self.moe_settings else None,
            }
        )
        if self.moe_settings is not None and self.moe_settings.router == "domain":
            check_domain_map(self.moe_settings.n_experts, self.moe_settings.top_k, domains)
        self.model = build_model(self.settings, self.moe_settings, vocab_size)
        n_positions = self.model.config.n_positions
        if block_size > n_positions:
            raise UserError(
                f"data.block_size={block_size} exceeds the model's n_positions={n_positions}: "
                f"lower data.block_size (or, from scratch, raise model.n_positions)."
            )
        # Until fit start resolves a null window from the trainer, f covers one micro-batch.
        s = self.settings
        set_load_balancing(self.model, s.lb_scope, s.lb_window or 1)
        if s.compile:
            for block in self.model.transformer.h:
                block.compile()
        self.dispatch: str | None = None  # resolved at fit start (MoE models)
        self.optimizer_factory = optimizer
        self.domains = tuple(domains)
        self._domain_index = {d: i for i, d in enumerate(self.domains)}
        self._recent = RecentDomainLosses(len(self.domains), RECENT_STEPS)
        self._log_this_step = True
        self._timer_open: float | None = None
        self._timed_seconds, self._timed_tokens = 0.0, 0
        # Held-out sums of this rank for the current validation epoch: [D] loss sum, [D] tokens.
        self._val_loss_sum: torch.Tensor | None = None
        self._val_tokens: torch.Tensor | None = None
        # from_pretrained returns eval mode and Lightning keeps module modes: without this,
        # dropout would never apply (experts are copies of those MLPs).
        self.train()

    # ------------------------------------------------------------------ forward and losses

    def forward(
        self, input_ids: torch.Tensor, block_domains: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [B, T, vocab] for ``input_ids`` [B, T]; ``block_domains`` [B] long: each
        block's index in :attr:`domains` (a ``domain`` router needs it)."""
        with routing_domains(self.model, block_domains):
            return self.model(input_ids=input_ids).logits

    def _domain_ids(self, domains: Sequence[str]) -> torch.Tensor:
        try:
            ids = [self._domain_index[d] for d in domains]
        except KeyError as exc:
            raise UserError(
                f"Batch has domain {exc.args[0]!r}, not among the model's domains "
                f"{list(self.domains)}."
            ) from None
        # From pageable host memory without a stream synchronisation (no host sync).
        return torch.tensor(ids).to(self.device, non_blocking=True)

    def _losses(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Per-block LM loss [B] (mean over next-token predictions) and the aux outputs."""
        ids = batch["input_ids"]
        domain_ids = self._domain_ids(batch["domains"])
        logits = self(ids, domain_ids)
        per_block = next_token_losses(logits, ids).mean(1)
        return per_block, domain_ids, collect_aux_outputs(self.model)

    # ------------------------------------------------------------------ training

    def setup(self, stage: str) -> None:
        """At fit start: resolve the MoE dispatch for the trainer's device and precision; an
        empty global load-balancing window of ``lb_window`` micro-batches (None: the
        trainer's ``accumulate_grad_batches``). A resume then restores the saved window
        (:meth:`on_load_checkpoint` runs after this hook). The recent per-domain losses start
        empty in this process: ddp_spawn hands the module to its workers through shared memory,
        and one buffer written by every rank would count each step once per rank."""
        if stage != "fit":
            return
        self._recent = RecentDomainLosses(len(self.domains), RECENT_STEPS)
        layers = moe_layers(self.model)
        if layers:
            precision = str(self.trainer.precision)
            dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float32
            device = self.trainer.strategy.root_device.type
            paths = {layer.path_for(device, dtype) for layer in layers.values()}
            self.dispatch = ",".join(sorted(paths))
            log.info(
                "MoE dispatch: %s (model.moe.dispatch=%s, %s, precision %s).",
                self.dispatch,
                self.moe_settings.dispatch if self.moe_settings else None,
                device,
                precision,
            )
        if self.settings.lb_scope != "global":
            return
        window = self.settings.lb_window or int(self.trainer.accumulate_grad_batches)
        set_load_balancing(self.model, "global", window)
        log.info(
            "Global-batch load balancing: f over all ranks and the last %d micro-batches.", window
        )

    def _is_logging_step(self) -> bool:
        """Whether Lightning writes this training step's logs (every log_every_n_steps; never
        without a trainer, where ``self.log`` writes nothing)."""
        connector = getattr(self._trainer, "_logger_connector", None)
        return connector is not None and bool(connector.should_update_logs)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        set_router_step(self.model, self.global_step)
        self._timer_open = time.perf_counter()

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        per_block, domain_ids, aux = self._losses(batch)
        lm_loss = per_block.mean()
        loss = lm_loss + self.settings.lb_coef * aux.lb_loss + self.settings.z_coef * aux.z_loss
        size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/lm_loss", lm_loss, batch_size=size)
        self.log("train/lb_loss", aux.lb_loss, batch_size=size)
        self.log("train/z_loss", aux.z_loss, batch_size=size)
        per_block = per_block.detach()
        self._recent.add(per_block, domain_ids)  # on the device
        self._log_this_step = self._is_logging_step()
        if self._log_this_step:  # reading which domains are present syncs: logging steps only
            for d, domain in enumerate(self.domains):
                mask = domain_ids == d
                if mask.any():
                    n = int(mask.sum())
                    self.log(f"train/loss_{domain}", per_block[mask].mean(), batch_size=n)
                else:  # nan, not the last logged value (Lightning would repeat it)
                    self.log(f"train/loss_{domain}", math.nan, batch_size=1)
        for layer, (_, logits) in aux.routing.items():
            # The router's own uncertainty (clean logits), not that of its training noise.
            self.log(f"train/router_entropy_l{layer}", router_entropy(logits), batch_size=size)
        self._timed_tokens += batch["input_ids"].numel()
        return loss

    def on_after_backward(self) -> None:
        # Forward and backward counted; the timer reopens for clipping and the optimizer (a
        # micro-batch that does not step leaves it open: the next batch start resets it).
        self._stop_timer()
        self._timer_open = time.perf_counter()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)  # runs the closure, then the optimizer
        if not self._log_this_step:
            self._stop_timer()
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the queued steps finish inside the timer
        self._stop_timer()
        if self._timed_seconds > 0:
            self.log("train/tokens_per_s", self._timed_tokens / self._timed_seconds)
        self._timed_seconds, self._timed_tokens = 0.0, 0

    def _stop_timer(self) -> None:
        if self._timer_open is not None:
            self._timed_seconds += time.perf_counter() - self._timer_open
            self._timer_open = None

    def final_domain_losses(self) -> dict[str, float]:
        """Per domain, the mean train LM loss of its blocks over the last (up to) 50 steps in
        which it appeared, over all ranks. Collective under DDP: call on every rank."""
        total = sum_over_ranks(self._recent.totals().to(self.device)).cpu()
        return {
            d: float(total[i, 0] / total[i, 1])
            for i, d in enumerate(self.domains)
            if total[i, 1] > 0
        }

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
        """The optimizer over the trainable parameters (a frozen router's gate is not one:
        it stays bitwise at its initial value, weight decay included), fused on CUDA where it
        takes ``fused`` and the config does not set it (one kernel for all parameters), and the
        warm-up + cosine schedule."""
        trainable = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(trainable, **self._fused_option())
        total = int(self.trainer.estimated_stepping_batches)
        warmup, ratio = self.settings.warmup_steps, self.settings.min_lr_ratio
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, total, ratio)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def _fused_option(self) -> dict[str, bool]:
        factory = self.optimizer_factory
        func = factory.func if isinstance(factory, functools.partial) else factory
        keywords = factory.keywords if isinstance(factory, functools.partial) else {}
        try:
            takes_fused = "fused" in inspect.signature(func).parameters
        except (TypeError, ValueError):
            takes_fused = False
        if self.device.type != "cuda" or not takes_fused or "fused" in keywords:
            return {}
        return {"fused": True}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the MoE dispatch path, the global load-balancing windows (the same on every
        rank: reduced counts) and every rank's recent per-domain losses (collective), so that
        a resumed run's final losses cover the last steps of the whole run."""
        checkpoint[RECENT_LOSSES_KEY] = gather_objects(self._recent.state_dict())
        if self.dispatch is not None:
            checkpoint[DISPATCH_KEY] = self.dispatch
        windows = {
            i: layer.lb_counts.state_dict()
            for i, layer in moe_layers(self.model).items()
            if layer.lb_counts is not None
        }
        if windows:
            checkpoint[LB_WINDOWS_KEY] = windows

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore this rank's recent per-domain losses and the global load-balancing windows
        (a window of another size starts empty)."""
        recent = checkpoint.get(RECENT_LOSSES_KEY) or []
        if self.global_rank < len(recent):
            self._recent.load_state_dict(recent[self.global_rank])
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


class RecentDomainLosses:
    """Per domain, (summed block loss, blocks) of the last ``steps`` training steps in which
    it appeared, kept on the device (no host sync when a step adds to it).

    ``sums`` / ``blocks`` [D, steps] float64 ring buffers; ``filled`` [D] long, steps written
    per domain (the next slot is ``filled % steps``).
    """

    def __init__(self, n_domains: int, steps: int) -> None:
        self.steps = steps
        self.sums = torch.zeros(n_domains, steps, dtype=torch.float64)
        self.blocks = torch.zeros(n_domains, steps, dtype=torch.float64)
        self.filled = torch.zeros(n_domains, dtype=torch.long)

    def add(self, per_block: torch.Tensor, domain_ids: torch.Tensor) -> None:
        """Add one step: per-block losses [B] and their domain indices [B] (one device)."""
        if self.sums.device != per_block.device:
            self.sums, self.blocks, self.filled = (
                t.to(per_block.device) for t in (self.sums, self.blocks, self.filled)
            )
        n_domains = self.sums.shape[0]
        sums = torch.zeros(n_domains, dtype=torch.float64, device=per_block.device)
        sums.index_add_(0, domain_ids, per_block.double())
        ones = torch.ones(domain_ids.shape, dtype=torch.float64, device=per_block.device)
        blocks = torch.zeros_like(sums).index_add_(0, domain_ids, ones)
        present = blocks > 0
        rows = torch.arange(n_domains, device=per_block.device)
        slot = self.filled % self.steps
        self.sums[rows, slot] = torch.where(present, sums, self.sums[rows, slot])
        self.blocks[rows, slot] = torch.where(present, blocks, self.blocks[rows, slot])
        self.filled += present.long()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"sums": self.sums.cpu(), "blocks": self.blocks.cpu(), "filled": self.filled.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a :meth:`state_dict` of the same shape (else keep the empty buffers)."""
        if state["sums"].shape == self.sums.shape:
            device = self.sums.device
            self.sums, self.blocks, self.filled = (
                state[k].to(device) for k in ("sums", "blocks", "filled")
            )

    def totals(self) -> torch.Tensor:
        """[D, 2] float64: per domain, summed loss and blocks over its kept steps."""
        return torch.stack([self.sums.sum(1), self.blocks.sum(1)], dim=1)
