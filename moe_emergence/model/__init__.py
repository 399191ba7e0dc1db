"""The model: a noisy top-k MoE layer (moe.py) with its routers (learned, frozen, hash, domain;
router.py), stacked experts (experts.py) and auxiliary losses (losses.py), installed into
GPT-2's MLPs (gpt2_moe.py)."""

from moe_emergence.lazy import lazy_exports

# name -> the module that defines it, imported on first use (moe_emergence.lazy)
_EXPORTS = {
    "AuxOutputs": "moe_emergence.model.gpt2_moe",
    "DomainRouter": "moe_emergence.model.router",
    "FixedRouter": "moe_emergence.model.router",
    "HashRouter": "moe_emergence.model.router",
    "MoELayer": "moe_emergence.model.moe",
    "Router": "moe_emergence.model.router",
    "RouterOutput": "moe_emergence.model.router",
    "build_gpt2": "moe_emergence.model.gpt2_moe",
    "collect_aux_outputs": "moe_emergence.model.gpt2_moe",
    "count_parameters": "moe_emergence.model.gpt2_moe",
    "install_moe_layers": "moe_emergence.model.gpt2_moe",
    "load_balancing_loss": "moe_emergence.model.losses",
    "moe_layers": "moe_emergence.model.gpt2_moe",
    "routing_domains": "moe_emergence.model.gpt2_moe",
    "set_router_step": "moe_emergence.model.gpt2_moe",
    "z_loss": "moe_emergence.model.losses",
}

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
