"""The routers of an MoE layer (``model.moe.router``): a noisy top-k router (learned, or frozen
at its initial weights) and the fixed reference routers (by token hash, by domain), each giving
a :class:`RouterOutput`; :func:`make_router` builds the one a setting names.

Shapes: N tokens (batch x time, flattened), E experts, k experts per token, d model width.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_emergence.errors import UserError
from moe_emergence.model.settings import ROUTERS
from moe_emergence.model.settings import MoESettings as MOE

ROUTER_INIT_STD = 0.02  # GPT-2's initializer_range: small logits, so early routing is near uniform


@dataclass
class RouterOutput:
    """One routing decision for N tokens.

    logits:  [N, E] clean router logits (before noise), float32; input of the z-loss.
    probs:   [N, E] softmax of the logits used for selection (noisy in training); input of
             the load-balancing loss.
    weights: [N, k] combine weights of the selected experts (top-1: exactly 1.0 forward,
             straight-through gradient; top-k > 1: softmax over the selected logits).
    indices: [N, k] long, selected experts, best first.
    """

    logits: Tensor
    probs: Tensor
    weights: Tensor
    indices: Tensor


class Router(nn.Module):
    """Noisy top-k gating: a bias-free linear ``d_model -> n_experts`` plus Gaussian noise.

    In training the logits get noise of std :attr:`current_noise_std` before top-k; the std
    falls linearly from ``noise_std`` at step 0 to 0 at ``noise_anneal_steps`` (0 steps: no
    noise at all). The step lives in the ``step`` buffer, advanced by the owner with
    :meth:`set_step`, so it follows the trainer's global step and is saved in checkpoints.
    Eval mode adds no noise.

    ``frozen=True`` (``model.moe.router=frozen``): the gate keeps the weights it is given (no
    gradient: ``requires_grad`` False) and reads the hidden states detached, so no loss reaches
    anything through the router: the load-balancing and z-losses and the straight-through
    top-1 weight are constants. Routing then changes only as the representations it reads
    change under the LM loss. A frozen router takes no noise (``noise_std`` must be 0).
    """

    step: Tensor
    key: str | None = None  # what it reads besides the hidden states: nothing
    knocked_out: int | None = None  # an expert never selected (moe.knocked_out)

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        top_k: int = 1,
        noise_std: float = 1.0,
        noise_anneal_steps: int = 1000,
        frozen: bool = False,
    ) -> None:
        super().__init__()
        check_experts(n_experts, top_k)
        if frozen and noise_std > 0:
            raise UserError(
                f"{MOE.option('noise_std', str(noise_std))} with {MOE.option('router', 'frozen')}:"
                f" a frozen router takes no noise; set {MOE.option('noise_std', '0')}."
            )
        if noise_std < 0:
            raise UserError(f"{MOE.option('noise_std')} must be >= 0, got {noise_std}")
        if noise_anneal_steps < 0:
            raise UserError(
                f"{MOE.option('noise_anneal_steps')} must be >= 0, got {noise_anneal_steps}"
            )
        self.n_experts = n_experts
        self.top_k = top_k
        self.noise_std = float(noise_std)
        self.noise_anneal_steps = int(noise_anneal_steps)
        self.frozen = bool(frozen)
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        self.gate.weight.requires_grad_(not self.frozen)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, 0.02) gate weights; pass a CPU ``generator`` for a seeded init."""
        weight = torch.empty(self.gate.weight.shape)
        nn.init.normal_(weight, std=ROUTER_INIT_STD, generator=generator)
        with torch.no_grad():
            self.gate.weight.copy_(weight)

    def set_step(self, step: int) -> None:
        """Set the annealing step (the trainer's global step, >= 0)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        self.step.fill_(int(step))

    def _noise_scale(self) -> Tensor:
        """The noise std at the current step, as a 0-d tensor (no host sync)."""
        if self.noise_anneal_steps == 0:
            return torch.zeros((), device=self.step.device)
        remaining = 1.0 - self.step.float() / self.noise_anneal_steps
        return self.noise_std * remaining.clamp(min=0.0)

    @property
    def current_noise_std(self) -> float:
        """Std of the training noise at the current step (the eval std is always 0)."""
        return float(self._noise_scale())

    def forward(self, x: Tensor, keys: Tensor | None = None) -> RouterOutput:
        """Route ``x`` [N, d_model] to ``top_k`` of ``n_experts`` experts (``keys``: unused, the
        fixed routers' argument)."""
        if self.frozen:
            x = x.detach()
        # Gate, selection and softmax in float32, also under autocast (bf16 would flip ~0.1%
        # of the top-1 choices).
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.gate.weight.float())
        noisy = logits
        if self.training and self.noise_std > 0:
            noisy = logits + torch.randn_like(logits) * self._noise_scale()
        if self.knocked_out is not None:  # its tokens take their next choice
            noisy = noisy.index_fill(
                -1, torch.tensor([self.knocked_out], device=x.device), -math.inf
            )
        probs = noisy.softmax(dim=-1)
        top_logits, indices = noisy.topk(self.top_k, dim=-1)
        if self.top_k == 1:
            # Straight-through: forward value exactly 1.0, gradient d(weight) = d(p_selected).
            p_sel = probs.gather(-1, indices)
            weights = p_sel - p_sel.detach() + 1.0
        else:
            weights = top_logits.softmax(dim=-1)
        return RouterOutput(logits=logits, probs=probs, weights=weights, indices=indices)


def check_experts(n_experts: int, top_k: int) -> None:
    """Refuse fewer than 1 expert, or a ``top_k`` outside [1, n_experts]."""
    if n_experts < 1:
        raise UserError(f"{MOE.option('n_experts')} must be >= 1, got {n_experts}")
    if not 1 <= top_k <= n_experts:
        raise UserError(f"{MOE.option('top_k')} must be in [1, n_experts={n_experts}], got {top_k}")


# The logit of an expert a fixed router never picks: its softmax is exactly 0 in float32 and
# float64, and entropies (p log p) stay finite (-inf would give nan).
UNCHOSEN_LOGIT = -1.0e4
HASH_PRIME = 2**31 - 1  # a Mersenne prime; token ids (< 2^32) times a (< 2^31) fit in int64


def hash_parameters(seed: int, layer: int) -> tuple[int, int]:
    """``(a, b)`` of the hash router of block ``layer`` in a model of ``model.moe.seed=seed``:
    from SHA-256 of ``"hash-router:<seed>:<layer>"``, so the same on every machine and version;
    1 <= a < p, 0 <= b < p, p = 2^31 - 1."""
    digest = hashlib.sha256(f"hash-router:{seed}:{layer}".encode()).digest()
    a = 1 + int.from_bytes(digest[:8], "big") % (HASH_PRIME - 1)
    b = int.from_bytes(digest[8:16], "big") % HASH_PRIME
    return a, b


class FixedRouter(nn.Module):
    """A router whose choice is a fixed function of one key per token (:attr:`key`: its
    ``token_ids`` or its block's ``domains``), not of the hidden states: no parameters, no
    noise, no gradient. Its ``top_k`` experts are distinct and weighted ``1 / top_k`` each
    (1 for top-1). Subclasses give :meth:`experts_of`.

    What it reports as router logits is the log of that fixed distribution (``log(1/k)`` on
    the chosen experts, :data:`UNCHOSEN_LOGIT` elsewhere): its entropy is ``log k``, its
    z-loss 0, and its load-balancing loss ``E * sum_i f_i^2`` (1.0 when balanced), logged but
    with no gradient.
    """

    key: str = ""
    knocked_out: int | None = None  # an expert never selected (moe.knocked_out)

    def __init__(self, d_model: int, n_experts: int, top_k: int = 1) -> None:
        super().__init__()
        check_experts(n_experts, top_k)
        self.d_model, self.n_experts, self.top_k = d_model, n_experts, top_k
        self.noise_std = 0.0
        self.current_noise_std = 0.0

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw what a learned router's init draws (a [E, d] normal) and discard it, so that
        the MoE layers after this one get the experts of the learned router's model of the
        same seed."""
        torch.empty(self.n_experts, self.d_model).normal_(std=ROUTER_INIT_STD, generator=generator)

    def set_step(self, step: int) -> None:
        """Nothing anneals (no noise)."""

    def experts_of(self, keys: Tensor) -> Tensor:
        """keys [N] long -> the experts [N, top_k] long (distinct per row)."""
        raise NotImplementedError

    @torch.compiler.disable  # a few integer ops; keys come from outside the compiled block
    def forward(self, x: Tensor, keys: Tensor | None = None) -> RouterOutput:
        """Route the N tokens of ``x`` [N, d] by ``keys`` [N] long (:attr:`key` of each)."""
        if keys is None or keys.shape != x.shape[:1]:
            raise RuntimeError(
                f"{type(self).__name__} needs the {self.key} of the {x.shape[0]} tokens, got "
                f"{None if keys is None else tuple(keys.shape)}"
            )
        indices = self.experts_of(keys.to(device=x.device, dtype=torch.long))
        if self.knocked_out is not None:
            indices = next_free_expert(indices, self.knocked_out, self.n_experts)
        n, k = indices.shape
        logits = torch.full((n, self.n_experts), UNCHOSEN_LOGIT, device=x.device)
        logits.scatter_(1, indices, math.log(1.0 / k))
        weights = torch.full((n, k), 1.0 / k, device=x.device)
        probs = logits.softmax(-1)
        return RouterOutput(logits=logits, probs=probs, weights=weights, indices=indices)

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, top_k={self.top_k}"


def next_free_expert(indices: Tensor, expert: int, n_experts: int) -> Tensor:
    """``indices`` [N, k] (distinct per row) with ``expert`` replaced, where a row holds it, by
    the first of ``expert + 1, expert + 2, ...`` (mod E) that the row does not hold: a fixed
    router's "next choice" (the hash router's own rule past its k experts). Needs E > k."""
    hit = indices == expert
    candidates = (expert + torch.arange(1, n_experts, device=indices.device)) % n_experts
    held = (indices[:, :, None] == candidates).any(dim=1)  # [N, E - 1]
    replacement = candidates[(~held).int().argmax(dim=1)]  # the first free candidate
    return torch.where(hit, replacement[:, None], indices)


class HashRouter(FixedRouter):
    """Routing by token identity alone (Roller et al. 2021, Hash Layers): token id t goes to
    ``h(t) = ((a * t + b) mod p) mod E`` (a universal hash, p = 2^31 - 1; ``(a, b)`` from
    :func:`hash_parameters` of the seed and the layer) and, for top-k, also to ``h(t) + 1, ...,
    h(t) + k - 1`` (mod E)."""

    key = "token_ids"

    def __init__(self, d_model: int, n_experts: int, top_k: int, a: int, b: int) -> None:
        super().__init__(d_model, n_experts, top_k)
        if not (1 <= a < HASH_PRIME and 0 <= b < HASH_PRIME):
            raise ValueError(f"hash parameters need 1 <= a < p and 0 <= b < p, got {a}, {b}")
        self.a, self.b = int(a), int(b)

    def experts_of(self, keys: Tensor) -> Tensor:
        first = (keys * self.a + self.b) % HASH_PRIME % self.n_experts
        offsets = torch.arange(self.top_k, device=keys.device)
        return (first[:, None] + offsets) % self.n_experts

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, a={self.a}, b={self.b}"


class DomainRouter(FixedRouter):
    """Ideal domain specialisation: every token of a block of domain i (its index in the
    model's ``domains``) goes to experts ``i * k, ..., i * k + k - 1`` (mod E): domain i ->
    expert i for top-1. Each domain has its own experts when ``E >= n_domains * k``
    (:func:`check_domain_map`)."""

    key = "domains"

    def experts_of(self, keys: Tensor) -> Tensor:
        offsets = torch.arange(self.top_k, device=keys.device)
        return (keys[:, None] * self.top_k + offsets) % self.n_experts


def check_domain_map(n_experts: int, top_k: int, domains: Sequence[str]) -> None:
    """Refuse a domain router that cannot give each domain its own ``top_k`` experts."""
    if n_experts < len(domains) * top_k:
        raise UserError(
            f"{MOE.option('router', 'domain')} needs {MOE.option('n_experts')} >= domains x "
            f"top_k = {len(domains)} x {top_k} (each domain its own experts), got "
            f"{MOE.option('n_experts', str(n_experts))}: raise it or lower "
            f"{MOE.option('top_k')}."
        )


def make_router(
    kind: str,
    d_model: int,
    n_experts: int,
    top_k: int = 1,
    noise_std: float = 1.0,
    noise_anneal_steps: int = 1000,
    hash_key: tuple[int, int] = (1, 0),
) -> Router | FixedRouter:
    """The router of ``model.moe.router=kind`` (:data:`ROUTERS`); ``hash_key``: the hash
    router's ``(a, b)`` (:func:`hash_parameters`)."""
    if kind not in ROUTERS:
        raise UserError(f"{MOE.option('router')} must be one of {', '.join(ROUTERS)}, got {kind!r}")
    if kind in ("learned", "frozen"):
        return Router(d_model, n_experts, top_k, noise_std, noise_anneal_steps, kind == "frozen")
    if noise_std > 0:
        raise UserError(
            f"{MOE.option('noise_std', str(noise_std))} with {MOE.option('router', kind)}: a "
            f"{kind} router takes no noise; set {MOE.option('noise_std', '0')}."
        )
    if kind == "hash":
        return HashRouter(d_model, n_experts, top_k, *hash_key)
    return DomainRouter(d_model, n_experts, top_k)
