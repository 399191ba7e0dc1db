"""GPT-2 with MoE layers: build the dense model, swap chosen blocks' MLPs for MoE layers whose
experts start as copies of that MLP, and gather the MoE layers' aux losses and routing.

Blocks are indexed 0..n_layer-1 as in ``model.transformer.h``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from transformers import GPT2Config, GPT2LMHeadModel

from moe_emergence.errors import UserError
from moe_emergence.hub import HubUnavailableError, resolve_repo
from moe_emergence.model.experts import PARAMETERS_OF_MLP, StackedExperts
from moe_emergence.model.losses import check_lb_settings
from moe_emergence.model.moe import MoELayer
from moe_emergence.model.router import hash_parameters
from moe_emergence.model.settings import ModelSettings, MoESettings
from moe_emergence.settings import is_int

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
SCRATCH_HINT = "To train from scratch instead, set model.pretrained=null."


class MissingWeightsError(UserError, FileNotFoundError):
    """A pretrained model's folder holds config/tokenizer files but no weights."""


def build_gpt2(
    pretrained: str | None = "gpt2",
    hub_mirror: str | None = None,
    vocab_size: int | None = None,
    n_positions: int | None = None,
    n_embd: int = 768,
    n_layer: int = 12,
    n_head: int = 12,
    dropout: float = 0.0,
    weights: bool = True,
) -> GPT2LMHeadModel:
    """A dense GPT-2 (float32): pretrained weights, or random init from the size arguments.

    pretrained: Hub id or local folder (looked up in ``hub_mirror`` first), or None for a
    fresh model of ``vocab_size`` (default 50257) x ``n_positions`` (default 1024) x ``n_embd``
    x ``n_layer`` x ``n_head``. For a pretrained model the size arguments are ignored, except
    that a larger ``vocab_size`` grows the token embeddings and ``n_positions`` (None: the
    checkpoint's) may not exceed the checkpoint's. ``dropout`` sets the residual, embedding and
    attention dropout of both. ``weights=False``: a pretrained model's architecture from its
    ``config.json`` alone, randomly initialised, of exactly ``vocab_size`` x ``n_positions``
    (for weights loaded from a checkpoint next).
    """
    dropouts = {"resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout}
    if pretrained is None:
        vocab_size = vocab_size or 50257
        special = 50256 if vocab_size > 50256 else None  # GPT-2's <|endoftext|>, if it fits
        config = GPT2Config(
            vocab_size=vocab_size,
            bos_token_id=special,
            eos_token_id=special,
            n_positions=n_positions or 1024,
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            **dropouts,
        )
        return GPT2LMHeadModel(config)

    if not weights:
        return _pretrained_architecture(pretrained, hub_mirror, vocab_size, n_positions, dropouts)
    try:
        source = resolve_repo(pretrained, hub_mirror, kind="model")
    except (HubUnavailableError, FileNotFoundError) as exc:
        raise type(exc)(f"{exc} {SCRATCH_HINT}") from exc
    if Path(source).is_dir() and not any((Path(source) / f).is_file() for f in WEIGHT_FILES):
        raise MissingWeightsError(
            f"Model '{pretrained}' resolved to '{source}', which holds no weights (none of "
            f"{', '.join(WEIGHT_FILES)}); a mirror with only config/tokenizer files cannot "
            f"give a pretrained model. Download the weights with `hf download "
            f"{pretrained} --local-dir {source}`. {SCRATCH_HINT}"
        )
    config = GPT2Config.from_pretrained(source, **dropouts)
    if n_positions is not None and n_positions > config.n_positions:
        raise UserError(
            f"model.n_positions={n_positions} exceeds the {config.n_positions} positions of the "
            f"pretrained model '{pretrained}': set model.n_positions={config.n_positions} or "
            f"null (null takes it from the weights)."
        )
    model = GPT2LMHeadModel.from_pretrained(source, config=config, dtype=torch.float32)
    if vocab_size is not None and vocab_size > config.vocab_size:
        model.resize_token_embeddings(vocab_size)
    return model


def _pretrained_architecture(
    name: str,
    mirror: str | None,
    vocab_size: int | None,
    n_positions: int | None,
    dropouts: Mapping[str, float],
) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 of a pretrained model's ``config.json`` (no weights read)."""
    try:
        config = GPT2Config.from_pretrained(resolve_repo(name, mirror, kind="model"), **dropouts)
    except (OSError, HubUnavailableError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(
            f"The model starts from pretrained '{name}', whose config.json cannot be read here "
            f"({reason}): make it available (a Hub mirror in $MOE_HUB_MIRROR)."
        ) from None
    config.vocab_size = vocab_size or config.vocab_size
    config.n_positions = n_positions or config.n_positions
    return GPT2LMHeadModel(config)


def build_model(
    settings: ModelSettings,
    moe: MoESettings | None,
    vocab_size: int | None,
    weights: bool = True,
) -> GPT2LMHeadModel:
    """The GPT-2 of ``settings`` with the MoE layers of ``moe`` (None: dense): the one path by
    which training, ``init_from``, ``analyze`` and ``inspect`` build the model.

    ``weights=False`` (a checkpoint's weights are loaded next): no pretrained weights are read
    and no expert noise is drawn; ``vocab_size`` and ``settings.n_positions`` are then the
    checkpoint's exact shapes.
    """
    s = settings
    model = build_gpt2(
        s.pretrained,
        s.hub_mirror,
        vocab_size,
        s.n_positions,
        s.n_embd,
        s.n_layer,
        s.n_head,
        s.dropout,
        weights=weights,
    )
    if moe is not None:
        fields = moe.to_dict()
        install_moe_layers(model, **(fields if weights else {**fields, "init_noise": 0.0}))
    return model


def install_moe_layers(
    model: GPT2LMHeadModel,
    layers: Sequence[int],
    n_experts: int,
    top_k: int = 1,
    noise_std: float = 1.0,
    noise_anneal_steps: int = 1000,
    init_noise: float = 0.0,
    seed: int = 0,
    dispatch: str = "auto",
    router: str = "learned",
) -> list[MoELayer]:
    """Replace ``model.transformer.h[i].mlp`` for each i in ``layers`` by an MoE layer (in place).

    The experts (:class:`StackedExperts`) are copies of that block's dense MLP, each parameter
    plus Gaussian noise of std ``init_noise * std(parameter)``. With ``init_noise=0`` and no
    router noise (eval mode) the model computes the dense model's logits, for any top_k and
    dispatch. Expert noise (expert by expert, parameter by parameter) and then the router init
    draw from a generator seeded with ``seed``. Returns the layers in ``layers`` order.

    ``router`` (``model.moe.router``): every kind draws the same numbers, so a model of one
    seed has the same experts whatever its router, and a ``frozen`` router the initial gate of
    the ``learned`` one (it is that gate, then frozen). A ``hash`` router of block i hashes
    with :func:`~moe_emergence.model.router.hash_parameters` ``(seed, i)``; the GPT-2 body gets a
    pre-hook that hands each forward's ``input_ids`` to its MoE layers.
    """
    blocks = model.transformer.h
    n_layer = len(blocks)
    seen: set[int] = set()
    for i in layers:
        if not is_int(i) or not 0 <= i < n_layer:
            raise UserError(
                f"MoE layer index {i!r} is out of range: the model has n_layer={n_layer}"
            )
        if i in seen:
            raise UserError(f"MoE layer index {i} is listed twice (model n_layer={n_layer})")
        if isinstance(blocks[i].mlp, MoELayer):
            raise UserError(f"Block {i} already has an MoE layer (model n_layer={n_layer})")
        seen.add(i)
    if init_noise < 0:
        raise UserError(f"init_noise must be >= 0, got {init_noise}")

    generator = torch.Generator().manual_seed(seed)
    installed = []
    for i in layers:
        dense = blocks[i].mlp
        experts = StackedExperts.from_mlp(dense, n_experts)
        if init_noise > 0:
            _perturb(experts, init_noise, generator)
        moe = MoELayer(
            experts,
            top_k,
            noise_std,
            noise_anneal_steps,
            dispatch=dispatch,
            router=router,
            hash_key=hash_parameters(seed, i),
        )
        moe.router.reset_parameters(generator)
        reference = next(dense.parameters())
        moe.router.to(device=reference.device, dtype=reference.dtype)
        blocks[i].mlp = moe
        installed.append(moe)
    hooks = model.transformer._forward_pre_hooks.values()
    if any(layer.router.key == "token_ids" for layer in installed) and hand_token_ids not in hooks:
        model.transformer.register_forward_pre_hook(hand_token_ids, with_kwargs=True)
    return installed


def hand_token_ids(body: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of the GPT-2 body (``model.transformer``): give its MoE layers this
    forward's ``input_ids`` [B, T] (None when it has none), the key of a hash router. A plain
    function (no state), so copies and pickles of the model keep a working hook."""
    input_ids = args[0] if args else kwargs.get("input_ids")
    for block in body.h:
        if isinstance(block.mlp, MoELayer):
            block.mlp.token_ids = input_ids


@contextlib.contextmanager
def routing_domains(model: GPT2LMHeadModel, block_domains: Tensor | None) -> Iterator[None]:
    """Within the block, every MoE layer of ``model`` knows the domain of each block of its
    forwards: ``block_domains`` [B] long, indices into the run's ``domains`` (None: unknown).
    A ``domain`` router needs them; the others ignore them."""
    layers = list(moe_layers(model).values())
    for layer in layers:
        layer.block_domains = block_domains
    try:
        yield
    finally:
        for layer in layers:
            layer.block_domains = None


def needs_domains(model: GPT2LMHeadModel) -> bool:
    """Whether a router of ``model`` routes by each block's domain (``model.moe.router=domain``)."""
    return any(layer.router.key == "domains" for layer in moe_layers(model).values())


@torch.no_grad()
def _perturb(experts: StackedExperts, scale: float, generator: torch.Generator) -> None:
    """Per expert, per parameter in GPT-2's MLP order (c_fc weight, bias, c_proj weight,
    bias), add N(0, (scale * std(p))^2) noise, p the expert's slice (more than one element)."""
    stacked = [getattr(experts, name) for name in PARAMETERS_OF_MLP]
    for e in range(experts.n_experts):
        for param in stacked:
            p = param[e]
            if p.numel() < 2:
                continue
            noise = torch.randn(p.shape, generator=generator).to(device=p.device, dtype=p.dtype)
            p.add_(noise * (scale * p.float().std()).to(p.dtype))


def moe_layers(model: GPT2LMHeadModel) -> dict[int, MoELayer]:
    """Block index -> MoE layer, for the blocks whose MLP is an MoE layer."""
    return {i: b.mlp for i, b in enumerate(model.transformer.h) if isinstance(b.mlp, MoELayer)}


def set_router_step(model: GPT2LMHeadModel, step: int) -> None:
    """Advance every router's noise annealing to ``step`` (the trainer's global step)."""
    for layer in moe_layers(model).values():
        layer.router.set_step(step)


def set_load_balancing(model: GPT2LMHeadModel, scope: str, window: int = 1) -> None:
    """Set every MoE layer's balance loss scope (``batch`` | ``global``) and, for ``global``,
    its window of micro-batches (see :class:`~moe_emergence.model.moe.MoELayer`); each layer
    starts an empty window."""
    check_lb_settings(scope, window)
    for layer in moe_layers(model).values():
        layer.set_load_balancing(scope, window)


@dataclass
class AuxOutputs:
    """The MoE layers' state from the model's last forward.

    lb_loss, z_loss: scalar means over MoE layers, with grad (0 when there are none).
    routing: block index -> (indices [N, k] long, clean router logits [N, E] float32), detached.
    """

    lb_loss: Tensor
    z_loss: Tensor
    routing: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)


def collect_aux_outputs(model: GPT2LMHeadModel) -> AuxOutputs:
    """Gather aux losses and routing of every MoE layer after a forward."""
    layers = moe_layers(model)
    if not layers:
        zero = torch.zeros((), device=model.device)
        return AuxOutputs(lb_loss=zero, z_loss=zero.clone())
    missing = [i for i, layer in layers.items() if layer.last_lb_loss is None]
    if missing:
        raise RuntimeError(f"MoE layers {missing} have not run a forward yet")
    lb = torch.stack([layer.last_lb_loss for layer in layers.values()]).mean()
    z = torch.stack([layer.last_z_loss for layer in layers.values()]).mean()
    routing = {i: (layer.last_indices, layer.last_logits) for i, layer in layers.items()}
    return AuxOutputs(lb_loss=lb, z_loss=z, routing=routing)


def count_parameters(model: GPT2LMHeadModel) -> dict[str, int]:
    """Parameter counts (tied weights once).

    total; experts (all experts of all MoE layers); per_expert (one expert); routers;
    active: parameters one token uses (total minus the experts it does not visit).
    """
    total = sum(p.numel() for p in model.parameters())
    experts = routers = inactive = per_expert = 0
    for layer in moe_layers(model).values():
        size = sum(p.numel() for p in layer.experts.parameters())
        per_expert = size // layer.n_experts
        experts += size
        inactive += (layer.n_experts - layer.top_k) * per_expert
        routers += sum(p.numel() for p in layer.router.parameters())
    return {
        "total": total,
        "experts": experts,
        "per_expert": per_expert,
        "routers": routers,
        "active": total - inactive,
    }


# Logit elements per cross-entropy chunk: 2^26 (256 MiB in float32; 1,335 positions of
# GPT-2's 50,257-token vocabulary).
CE_CHUNK_ELEMENTS = 1 << 26


def next_token_losses(
    logits: Tensor, input_ids: Tensor, chunk_elements: int = CE_CHUNK_ELEMENTS
) -> Tensor:
    """Cross-entropy (nats, float32) of each next-token prediction within each block:
    logits [B, T, V] and input_ids [B, T] -> [B, T - 1] (position t predicts token t + 1).

    Computed over chunks of about ``chunk_elements`` logits, each upcast to float32 on its own
    and, under autograd, recomputed in the backward pass (activation checkpointing): no
    float32 copy of the whole [B, T, V] is ever held, and the values are those of one
    cross-entropy over all positions (each row's log-softmax is its own)."""
    batch, length, vocab = logits.shape
    rows = max(1, chunk_elements // (vocab * max(1, length - 1)))  # blocks per chunk
    recompute = torch.is_grad_enabled() and logits.requires_grad
    chunks = []
    for b in range(0, batch, rows):
        part, ids = logits[b : b + rows], input_ids[b : b + rows]
        if recompute:
            chunks.append(checkpoint(_chunk_losses, part, ids, use_reentrant=False))
        else:
            chunks.append(_chunk_losses(part, ids))
    return torch.cat(chunks)


def _chunk_losses(logits: Tensor, input_ids: Tensor) -> Tensor:
    """[b, T, V] logits, [b, T] ids -> [b, T - 1] float32 next-token losses."""
    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        input_ids[:, 1:].reshape(-1),
        reduction="none",
    )
    return per_token.view(input_ids.shape[0], -1)
