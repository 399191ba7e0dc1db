"""The model settings, written once (see :mod:`moe_emergence.settings`): :class:`ModelSettings`
(``model.*``: the GPT-2, its schedule and auxiliary losses) and :class:`MoESettings`
(``model.moe.*``: the MoE layers; ``model.moe=null`` is the dense baseline).

What the data decides is not here: ``block_size``, ``vocab_size`` and ``domains`` are handed to
the model by the wiring (:mod:`moe_emergence.train`); the optimizer is a Hydra partial
(``model.optimizer``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moe_emergence.errors import UserError
from moe_emergence.settings import Settings, setting

LB_SCOPES = ("batch", "global")
DISPATCHES = ("auto", "loop", "grouped")
# How a router chooses: learned (trained), frozen (its initial weights kept), hash (by token id),
# domain (by each block's domain). The last three are references for the learned one.
ROUTERS = ("learned", "frozen", "hash", "domain")


def _check_layers(layers: list[int]) -> None:
    if len(set(layers)) != len(layers):
        raise ValueError(f"a layer index is listed twice in {list(layers)}")
    if any(i < 0 for i in layers):
        raise ValueError(f"layer indices are ≥ 0, got {list(layers)}")


@dataclass
class ModelSettings(Settings):
    """The GPT-2 (pretrained or from scratch), its schedule and its auxiliary losses."""

    PREFIX: ClassVar[str] = "model"

    pretrained: str | None = setting(
        "gpt2",
        help="Hub name or folder of the pretrained GPT-2 (resolved through data.hub_mirror), "
        "or null to train from scratch with the sizes below",
    )
    hub_mirror: str | None = setting(
        None, help="folder holding Hub repos (null: $MOE_HUB_MIRROR, else the Hub)"
    )
    n_positions: int | None = setting(
        None, low=1, help="positions (null: the pretrained weights', else 1024)"
    )
    n_embd: int = setting(768, low=1, help="width (from scratch only)")
    n_layer: int = setting(12, low=1, help="transformer blocks (from scratch only)")
    n_head: int = setting(12, low=1, help="attention heads (from scratch only)")
    dropout: float = setting(0.1, low=0, below=1, help="residual, embedding, attention dropout")
    compile: bool = setting(False, help="torch.compile each transformer block (GPU runs)")
    warmup_steps: int = setting(100, low=0, help="linear LR warm-up, optimizer steps")
    min_lr_ratio: float = setting(0.1, low=0, help="cosine decay ends at this share of the LR")
    lb_coef: float = setting(0.01, low=0, help="weight of the load-balancing loss")
    z_coef: float = setting(0.001, low=0, help="weight of the router z-loss")
    lb_scope: str = setting(
        "batch",
        choices=LB_SCOPES,
        help="batch: balance loss f_i per micro-batch; global: summed over ranks and lb_window",
    )
    lb_window: int | None = setting(
        None, low=1, help="micro-batches of a global window (null: accumulate_grad_batches)"
    )


@dataclass
class MoESettings(Settings):
    """The MoE layers that replace GPT-2 MLPs (experts warm-started from the dense MLP)."""

    PREFIX: ClassVar[str] = "model.moe"

    layers: list[int] = setting(
        (8, 9, 10, 11), check=_check_layers, help="block indices whose MLP becomes MoE"
    )
    n_experts: int = setting(8, low=1, help="experts per MoE layer")
    top_k: int = setting(1, low=1, help="experts per token")
    noise_std: float = setting(1.0, low=0, help="router noise, annealed linearly to 0 ...")
    noise_anneal_steps: int = setting(1000, low=0, help="... over this many optimizer steps")
    init_noise: float = setting(
        0.01, low=0, help="experts = copies of the dense MLP + this relative noise"
    )
    seed: int = setting(0, low=0, help="seed of the expert noise and router init")
    dispatch: str = setting(
        "auto",
        choices=DISPATCHES,
        help="loop | grouped | auto (grouped on CUDA bf16 with SM 9.x/10.x, loop elsewhere)",
    )
    router: str = setting(
        "learned",
        choices=ROUTERS,
        help="learned | frozen (kept at its init, top-1's at the same seed) | hash (a seeded "
        "hash of the token id) | domain (expert(s) fixed per domain); docs/method.md",
    )

    def validate(self) -> MoESettings:
        """The field checks, then: a router that is not learned takes no noise (the noise is
        exploration for a router that learns; ``noise_std`` must be 0)."""
        super().validate()
        if self.router != "learned" and self.noise_std > 0:
            raise UserError(
                f"{self.option('noise_std', repr(self.noise_std))} with "
                f"{self.option('router', self.router)}: only a learned router takes noise; set "
                f"{self.option('noise_std', '0')} (condition={self.router}_router does)."
            )
        return self
