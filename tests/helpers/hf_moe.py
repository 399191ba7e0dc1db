"""Tiny random-initialised Hugging Face MoE models of each supported family, built from the
library's configs and saved like a Hub model repo (weights, config, tokenizer), and each
family's routing rule written out from its published definition (to check the captured
experts against)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

N_EXPERTS = 8
TOP_K = 2
TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=512,
)
FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "gpt_oss")
DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 10000.0}  # not the configs' long-context YaRN
MLA = dict(kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)


def tiny_config(model_type: str, vocab_size: int, eos: int, **extra):
    """A 2-layer config of ``model_type``: width 32, 8 experts, top-2, every layer MoE."""
    from transformers import AutoConfig

    moe = {
        "mixtral": dict(num_local_experts=N_EXPERTS),
        "olmoe": dict(num_experts=N_EXPERTS),
        "qwen2_moe": dict(
            num_experts=N_EXPERTS, moe_intermediate_size=16, shared_expert_intermediate_size=32
        ),
        "qwen3_moe": dict(num_experts=N_EXPERTS, moe_intermediate_size=16, head_dim=8),
        "deepseek_v2": dict(
            n_routed_experts=N_EXPERTS,
            moe_intermediate_size=16,
            first_k_dense_replace=0,
            n_group=4,
            topk_group=2,
            topk_method="group_limited_greedy",
            **MLA,
        ),
        "deepseek_v3": dict(
            n_routed_experts=N_EXPERTS,
            moe_intermediate_size=16,
            first_k_dense_replace=0,
            n_group=4,
            topk_group=2,
            rope_parameters=DEFAULT_ROPE,
            **MLA,
        ),
        "gpt_oss": dict(num_local_experts=N_EXPERTS, head_dim=8, rope_parameters=DEFAULT_ROPE),
    }[model_type]
    return AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        num_experts_per_tok=TOP_K,
        eos_token_id=eos,
        bos_token_id=eos,
        pad_token_id=eos,
        **TINY,
        **{**moe, **extra},
    )


def save_tiny_model(
    out: Path,
    model_type: str,
    tokenizer_dir: Path | None,
    seed: int = 0,
    change: Callable[[torch.nn.Module], None] | None = None,
    **extra,
) -> Path:
    """Build a tiny ``model_type`` model (seeded), apply ``change`` to it, and save it with
    the tokenizer of ``tokenizer_dir`` (None: no tokenizer) into ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else None
    vocab = len(tokenizer) if tokenizer is not None else 400
    eos = tokenizer.eos_token_id if tokenizer is not None else 0
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, vocab, eos, **extra))
    if model_type == "deepseek_v3":  # a trained V3's correction bias is not 0: make the rule bite
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(
                    torch.randn(buffer.shape, generator=torch.Generator().manual_seed(seed))
                )
    if change is not None:
        change(model)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


# ---------------------------------------------------------------------- the routing rules


def _group_mask(scores: torch.Tensor, n_group: int, topk_group: int, per_group) -> torch.Tensor:
    groups = per_group(scores.view(len(scores), n_group, -1))  # [N, G]
    chosen = torch.zeros_like(groups).scatter_(1, groups.topk(topk_group, dim=-1)[1], 1.0)
    return chosen.repeat_interleave(scores.shape[1] // n_group, dim=1).bool()


def routing_rule(router: torch.nn.Module, model_type: str, hidden: torch.Tensor) -> torch.Tensor:
    """Each token's experts [N, k] under ``model_type``'s rule, from the router's input
    ``hidden`` [N, H] and its weights, ordered by routing weight (largest first)."""
    logits = torch.nn.functional.linear(hidden.float(), router.weight.float())
    k = router.top_k
    if model_type == "gpt_oss":  # top-k of the logits (with bias), softmax over the k
        return (logits + router.bias.float()).topk(k, dim=-1)[1]
    if model_type == "deepseek_v3":  # sigmoid + bias within the top groups; weight: sigmoid
        scores = logits.sigmoid()
        choice = scores + router.e_score_correction_bias
        mask = _group_mask(choice, router.num_group, router.topk_group, _top2_sum)
        chosen = choice.masked_fill(~mask, float("-inf")).topk(k, dim=-1)[1]
        order = scores.gather(1, chosen).argsort(dim=-1, descending=True, stable=True)
        return chosen.gather(1, order)
    probs = logits.softmax(-1)
    if model_type == "deepseek_v2" and router.topk_method == "group_limited_greedy":
        mask = _group_mask(probs, router.num_group, router.topk_group, lambda g: g.amax(-1))
        probs = probs.masked_fill(~mask, 0.0)
    return probs.topk(k, dim=-1)[1]


def _top2_sum(groups: torch.Tensor) -> torch.Tensor:
    return groups.topk(2, dim=-1)[0].sum(-1)
