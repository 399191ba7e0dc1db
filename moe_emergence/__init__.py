"""moe_emergence: a packed multi-domain (code, math, prose) data pipeline and an MoE GPT-2."""

__version__ = "0.1.0"
