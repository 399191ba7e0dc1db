"""The model: a noisy top-k MoE layer and its reference routers (frozen, hash, domain; moe.py)
installed into GPT-2's MLPs (gpt2_moe.py)."""

from moe_emergence.model.gpt2_moe import (
    AuxOutputs,
    build_gpt2,
    collect_aux_outputs,
    count_parameters,
    install_moe_layers,
    moe_layers,
    routing_domains,
    set_router_step,
)
from moe_emergence.model.moe import (
    DomainRouter,
    FixedRouter,
    HashRouter,
    MoELayer,
    Router,
    RouterOutput,
    load_balancing_loss,
    z_loss,
)

__all__ = [
    "AuxOutputs",
    "DomainRouter",
    "FixedRouter",
    "HashRouter",
    "MoELayer",
    "Router",
    "RouterOutput",
    "build_gpt2",
    "collect_aux_outputs",
    "count_parameters",
    "install_moe_layers",
    "load_balancing_loss",
    "moe_layers",
    "routing_domains",
    "set_router_step",
    "z_loss",
]
