"""Mixture-of-Experts building blocks: a noisy top-k router (learned, or frozen at its initial
weights), the fixed reference routers (by token hash, by domain), the auxiliary losses, experts
as stacked weights, and a layer that dispatches tokens to them.

Shapes: N tokens (batch x time, flattened), E experts, k experts per token, d model width,
h expert hidden width (4d for GPT-2), W micro-batches in the global load-balancing window.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_emergence.distributed import sum_over_ranks
from moe_emergence.errors import UserError
from moe_emergence.model.settings import DISPATCHES, LB_SCOPES, ROUTERS
from moe_emergence.model.settings import ModelSettings as MODEL
from moe_emergence.model.settings import MoESettings as MOE
from moe_emergence.settings import is_int

# The grouped GEMM: public in torch >= 2.10 (F.grouped_mm), private before (same operator).
grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm
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
    knocked_out: int | None = None  # an expert never selected (:func:`knocked_out`)

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
    knocked_out: int | None = None  # an expert never selected (:func:`knocked_out`)

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


@contextlib.contextmanager
def knocked_out(layer: MoELayer, expert: int) -> Iterator[MoELayer]:
    """Within the block, ``layer`` never selects ``expert``: its router's selection logit of
    that expert is -inf before top-k (learned and frozen routers), so each token that chose it
    takes its next choice and the combine weights are the softmax over the k experts then
    selected (top-1: 1.0); a fixed router (hash, domain) gives it instead to the next expert
    in cyclic order that the token does not hold (:func:`next_free_expert`). The router's
    reported logits stay the clean ones. Afterwards the layer is exactly as before. For
    analysis (eval mode, no grad): the layer's training path is not meant to run under it."""
    if not 0 <= expert < layer.n_experts:
        raise ValueError(f"expert {expert} is not in 0..{layer.n_experts - 1}")
    if layer.top_k >= layer.n_experts:
        raise ValueError(
            f"a layer of top_k={layer.top_k} of {layer.n_experts} experts uses every expert: "
            "nothing to take a knocked-out expert's place"
        )
    router = layer.router
    if router.knocked_out is not None:
        raise RuntimeError(f"expert {router.knocked_out} of this layer is already knocked out")
    router.knocked_out = int(expert)
    try:
        yield layer
    finally:
        del router.knocked_out  # back to the class's None


def router_entropy(logits: Tensor) -> Tensor:
    """Mean over tokens of the entropy (nats) of ``softmax(logits)``; logits [N, E] -> scalar.

    Pass the clean logits: the entropy of the router itself, not of its training noise.
    """
    log_p = logits.float().log_softmax(dim=-1)
    return -(log_p.exp() * log_p).sum(-1).mean()


def load_balancing_loss(probs: Tensor, indices: Tensor, n_experts: int) -> Tensor:
    """Switch Transformer balance loss ``E * sum_i f_i * P_i`` (scalar); ``lb_scope=batch``.

    probs: [N, E] router probabilities; indices: [N, k] selected experts. f_i is the fraction
    of the N * k assignments sent to expert i (no gradient), P_i the mean probability of i.
    Equals 1.0 for uniform routing and grows as routing concentrates.
    """
    assignments = F.one_hot(indices.reshape(-1), n_experts).to(probs.dtype)  # [N*k, E]
    fraction = assignments.mean(dim=0)
    mean_prob = probs.mean(dim=0)
    return n_experts * (fraction * mean_prob).sum()


def global_load_balancing_loss(probs: Tensor, fraction: Tensor) -> Tensor:
    """Global-batch balance loss ``E * sum_i f_i * P_i`` (scalar; Qiu et al. 2025).

    probs: [N, E] this micro-batch's router probabilities (P_i = their mean over the N tokens,
    the only path of the gradient); fraction: [E] the share f_i of expert i among the
    assignments of a larger batch (e.g. :meth:`GlobalAssignmentCounts.fraction`), sums to 1,
    no gradient. Routing that specialises per micro-batch but is balanced over that larger
    batch scores 1.0, where :func:`load_balancing_loss` scores up to E.
    """
    n_experts = probs.shape[-1]
    return n_experts * (fraction.detach().to(probs.dtype) * probs.mean(dim=0)).sum()


def check_lb_settings(scope: str, window: int) -> None:
    """Refuse a scope outside :data:`LB_SCOPES` or a window that is not an integer >= 1."""
    if scope not in LB_SCOPES:
        raise UserError(
            f"{MODEL.option('lb_scope')} must be one of {', '.join(LB_SCOPES)}, got {scope!r}: set "
            f"{MODEL.option('lb_scope', 'batch')} (per micro-batch) or "
            f"{MODEL.option('lb_scope', 'global')}."
        )
    if not is_int(window) or window < 1:
        raise UserError(
            f"{MODEL.option('lb_window')} must be an integer >= 1 (micro-batches) or null, got "
            f"{window!r}: e.g. {MODEL.option('lb_window', '4')}, or null for "
            f"trainer.accumulate_grad_batches."
        )


class GlobalAssignmentCounts:
    """Expert-assignment counts of the last ``window`` training micro-batches, summed over ranks.

    ``counts`` [W, E] int64 is a ring buffer: :meth:`update` all-reduces one micro-batch's
    local counts [E] (sum over the DDP ranks of the default process group; no gradient) and
    overwrites the oldest row. Before W updates the unwritten rows are 0, so f covers the
    micro-batches seen so far. Every rank pushes the same reduced row, so all ranks hold the
    same buffer (and rank 0's is the one to checkpoint). :meth:`update` is a collective: call
    it on every rank equally often (training forwards), never in eval or no-grad forwards.

    A plain object, not a module or buffer: DDP would broadcast rank 0's buffers, and it is
    not part of the state_dict (see :meth:`state_dict` for checkpoints).
    """

    def __init__(self, n_experts: int, window: int) -> None:
        check_lb_settings("global", window)
        self.n_experts = n_experts
        self.window = window
        self.reset()

    def reset(self) -> None:
        """Empty the window."""
        self.counts = torch.zeros(self.window, self.n_experts, dtype=torch.long)
        self.position = 0  # the row the next update writes
        self.updates = 0  # updates since the last reset

    @torch.compiler.disable  # host-side ring position; a compiled block breaks its graph here
    @torch.no_grad()
    def update(self, local_counts: Tensor) -> Tensor:
        """Push this rank's counts [E] of one micro-batch (collective); return :meth:`fraction`."""
        row = sum_over_ranks(local_counts.detach().to(dtype=torch.long))
        if self.counts.device != row.device:
            self.counts = self.counts.to(row.device)
        self.counts[self.position] = row
        self.position = (self.position + 1) % self.window
        self.updates += 1
        return self.fraction()

    def fraction(self) -> Tensor:
        """f [E] float32: each expert's share of the window's assignments (zeros when empty)."""
        total = self.counts.sum(dim=0)
        return total.float() / total.sum().clamp(min=1).float()

    def state_dict(self) -> dict[str, Any]:
        """The window for a checkpoint: counts (CPU), position, updates."""
        return {
            "counts": self.counts.cpu().clone(),
            "position": self.position,
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; refuse one of another window or expert count."""
        counts = state["counts"]
        if tuple(counts.shape) != (self.window, self.n_experts):
            raise ValueError(
                f"saved load-balancing window has shape {tuple(counts.shape)}, expected "
                f"{(self.window, self.n_experts)} (window, n_experts)"
            )
        self.counts = counts.to(device=self.counts.device, dtype=torch.long).clone()
        self.position = int(state["position"])
        self.updates = int(state["updates"])


def z_loss(logits: Tensor) -> Tensor:
    """Router z-loss (ST-MoE): mean over tokens of ``logsumexp(logits) ** 2``; logits [N, E]."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def check_dispatch(dispatch: str) -> None:
    """Refuse a dispatch outside :data:`DISPATCHES`."""
    if dispatch not in DISPATCHES:
        raise UserError(
            f"{MOE.option('dispatch')} must be one of {', '.join(DISPATCHES)}, got {dispatch!r}: "
            f"auto picks grouped on CUDA in bf16 and loop elsewhere."
        )


def grouped_fits(d_model: int, d_hidden: int) -> bool:
    """Whether the grouped GEMM can take these widths: its kernels want rows of a multiple of
    16 bytes, i.e. widths that are multiples of 8 (bf16) and 4 (fp32)."""
    return d_model % 8 == 0 and d_hidden % 8 == 0


@torch.compiler.assume_constant_result
def cutlass_grouped_mm() -> bool:
    """Whether this process's CUDA device runs ``grouped_mm`` in bf16 on its fused kernel
    (compute capability 9.x / 10.x: H100, H200, B200); elsewhere torch falls back to a loop
    over groups that reads the offsets on the host."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] in (9, 10)


def resolve_dispatch(dispatch: str, device_type: str, dtype: torch.dtype) -> str:
    """The path ``dispatch`` runs on: ``auto`` is ``grouped`` on CUDA in bf16 where the fused
    grouped GEMM exists (:func:`cutlass_grouped_mm`) and ``loop`` elsewhere (on CPU the
    grouped GEMM is itself a loop over experts: benchmarks/README.md); the others are
    themselves. ``dtype``: the compute dtype (the autocast dtype where autocast is on)."""
    check_dispatch(dispatch)
    if dispatch != "auto":
        return dispatch
    fused = device_type == "cuda" and dtype == torch.bfloat16 and cutlass_grouped_mm()
    return "grouped" if fused else "loop"


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a matmul of ``x`` runs in: the autocast dtype where autocast is on."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


@dataclass
class Dispatch:
    """The (token, slot) assignments of N tokens to k experts each, sorted by expert (stable:
    within an expert, by token then slot). A = N * k.

    order:   [A] long, position in the flat [N * k] assignments of each sorted row.
    token:   [A] long, the token of each sorted row.
    expert:  [A] long, the expert of each sorted row (non-decreasing).
    ends:    [E] long, ends[e] = rows of experts 0..e (cumulative counts); computed on the
             device by a binary search of ``expert``, so no host sync.
    """

    order: Tensor
    token: Tensor
    expert: Tensor
    ends: Tensor

    @classmethod
    def sort(cls, indices: Tensor, n_experts: int) -> Dispatch:
        """Sort the assignments ``indices`` [N, k] by expert, on their device."""
        flat = indices.reshape(-1)
        order = torch.argsort(flat, stable=True)
        expert = flat[order]
        token = order // indices.shape[1]
        experts = torch.arange(n_experts, device=flat.device, dtype=flat.dtype)
        ends = torch.searchsorted(expert, experts, right=True)
        return cls(order=order, token=token, expert=expert, ends=ends)

    @property
    def counts(self) -> Tensor:
        """[E] long, assignments per expert (on the device)."""
        return torch.diff(self.ends, prepend=self.ends.new_zeros(1))


class StackedExperts(nn.Module):
    """E MLP experts of GPT-2's shape as stacked weights (Conv1D layout, ``x @ W + b``):
    ``c_fc_weight`` [E, d, h], ``c_fc_bias`` [E, h], ``c_proj_weight`` [E, h, d],
    ``c_proj_bias`` [E, d]; expert e maps x [n, d] to
    ``dropout(act(x @ c_fc_weight[e] + c_fc_bias[e]) @ c_proj_weight[e] + c_proj_bias[e])``.

    Two ways to run the assignments of a :class:`Dispatch`, with the same result up to
    rounding: :meth:`loop` (one pair of matmuls per expert: the reference) and :meth:`grouped`
    (two grouped GEMMs over all rows, no host sync). Both return [A, d] in sorted order.
    """

    def __init__(
        self, n_experts: int, d_model: int, d_hidden: int, activation: nn.Module, dropout: float
    ) -> None:
        super().__init__()
        if n_experts < 1:
            raise UserError(f"{MOE.option('n_experts')} must be >= 1, got {n_experts}")
        self.n_experts, self.d_model, self.d_hidden = n_experts, d_model, d_hidden
        self.c_fc_weight = nn.Parameter(torch.zeros(n_experts, d_model, d_hidden))
        self.c_fc_bias = nn.Parameter(torch.zeros(n_experts, d_hidden))
        self.c_proj_weight = nn.Parameter(torch.zeros(n_experts, d_hidden, d_model))
        self.c_proj_bias = nn.Parameter(torch.zeros(n_experts, d_model))
        self.act = activation
        self.dropout = nn.Dropout(dropout)

    @classmethod
    def from_mlp(cls, mlp: nn.Module, n_experts: int) -> StackedExperts:
        """E copies of a GPT-2 MLP (``c_fc``, ``act``, ``c_proj``, ``dropout``), on its device
        and dtype."""
        fc = mlp.c_fc
        d_model, d_hidden = fc.weight.shape
        experts = cls(n_experts, d_model, d_hidden, copy.deepcopy(mlp.act), mlp.dropout.p)
        experts.to(device=fc.weight.device, dtype=fc.weight.dtype)
        with torch.no_grad():
            for name, source in PARAMETERS_OF_MLP.items():
                stacked = getattr(experts, name)
                stacked.copy_(mlp.get_parameter(source).expand_as(stacked))
        return experts

    def loop(self, x: Tensor, routed: Dispatch, counts: list[int]) -> Tensor:
        """Per expert, its rows of ``x`` [N, d] through its MLP (``torch.addmm``, as GPT-2's
        Conv1D): [A, d]. ``counts``: rows per expert on the host. Every expert runs, on zero
        rows if it got none, so all stay in the autograd graph."""
        # One unbind per parameter: indexing [e] per expert would make every expert's backward
        # write a zero gradient of the whole stack (E^2 work).
        fc_w, fc_b, proj_w, proj_b = (getattr(self, name).unbind(0) for name in PARAMETERS_OF_MLP)
        outputs = []
        for e, tokens in enumerate(routed.token.split(counts)):
            hidden = torch.addmm(fc_b[e], x.index_select(0, tokens), fc_w[e])
            outputs.append(self.dropout(torch.addmm(proj_b[e], self.act(hidden), proj_w[e])))
        return torch.cat(outputs)

    def grouped(self, x: Tensor, routed: Dispatch) -> Tensor:
        """All rows of ``x`` [N, d] through their experts' MLPs by two grouped GEMMs
        (:func:`torch.nn.functional.grouped_mm`), in the compute dtype (autocast's where on):
        [A, d]. Offsets come from ``routed.ends`` on the device: no host sync."""
        dtype = _compute_dtype(x)
        offsets = routed.ends.to(torch.int32)
        rows = x.index_select(0, routed.token).to(dtype)
        hidden = grouped_mm(rows, self.c_fc_weight.to(dtype), offs=offsets)
        # Biases gathered per row in their own dtype, then cast: their gradient sums the rows
        # in float32 (a bf16 sum of thousands of rows would stall).
        hidden = self.act(hidden + self.c_fc_bias.index_select(0, routed.expert).to(dtype))
        out = grouped_mm(hidden, self.c_proj_weight.to(dtype), offs=offsets)
        return self.dropout(out + self.c_proj_bias.index_select(0, routed.expert).to(dtype))

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}"


# Stacked parameter -> the GPT-2 MLP parameter it stacks (``c_fc.weight`` [d, h], ...).
PARAMETERS_OF_MLP = {
    "c_fc_weight": "c_fc.weight",
    "c_fc_bias": "c_fc.bias",
    "c_proj_weight": "c_proj.weight",
    "c_proj_bias": "c_proj.bias",
}


class MoELayer(nn.Module):
    """Replace a dense MLP: route each token to ``top_k`` experts and sum their weighted outputs.

    The assignments are sorted by expert on the device (:class:`Dispatch`) and run by
    :class:`StackedExperts`, the way ``dispatch`` says (see :func:`resolve_dispatch`):
    ``loop`` (per expert, the reference; reads the counts on the host), ``grouped`` (grouped
    GEMMs, no host sync) or ``auto``. The combine is in float32, summing the k slots of a
    token in slot order (no atomics), then cast to the input's dtype.

    After each forward the layer keeps, for the training loss and for analysis:
    ``last_indices`` [N, k] long and ``last_logits`` [N, E] float32 clean router logits (both
    detached), ``last_counts`` [E] long assignments per expert, ``last_dispatch`` (the path
    that ran), and the scalar aux losses ``last_lb_loss`` and ``last_z_loss`` (with grad).
    Copies and pickles of the layer drop this state.

    Load balancing (``lb_scope``): ``batch`` is :func:`load_balancing_loss` over this forward's
    tokens. ``global`` is :func:`global_load_balancing_loss` with f from :attr:`lb_counts`
    (summed over DDP ranks and the last ``lb_window`` micro-batches) in training forwards
    (train mode with grad enabled), which all-reduce and push into that window; eval-mode or
    no-grad forwards (validation, routing probes) neither all-reduce nor push, and report the
    ``batch`` loss of their own tokens.

    ``router`` (``model.moe.router``, :func:`make_router`): ``learned``, ``frozen``, ``hash``
    or ``domain``. The last two read one key per token besides the hidden states, handed to
    the layer before each forward: :attr:`token_ids` [B, T] long (set by the GPT-2 body's
    pre-hook, :func:`moe_emergence.model.gpt2_moe.install_moe_layers`) or
    :attr:`block_domains` [B] long (set around the forward by
    :func:`moe_emergence.model.gpt2_moe.routing_domains`).
    """

    def __init__(
        self,
        experts: StackedExperts,
        top_k: int = 1,
        noise_std: float = 1.0,
        noise_anneal_steps: int = 1000,
        lb_scope: str = "batch",
        lb_window: int = 1,
        dispatch: str = "auto",
        router: str = "learned",
        hash_key: tuple[int, int] = (1, 0),
    ) -> None:
        super().__init__()
        self.experts = experts
        self.d_model = experts.d_model
        self.router_kind = router
        self.router = make_router(
            router, self.d_model, experts.n_experts, top_k, noise_std, noise_anneal_steps, hash_key
        )
        self.token_ids: Tensor | None = None
        self.block_domains: Tensor | None = None
        self.set_dispatch(dispatch)
        self.set_load_balancing(lb_scope, lb_window)
        self._clear_state()

    def set_dispatch(self, dispatch: str) -> None:
        """Choose the dispatch path (``auto`` | ``loop`` | ``grouped``)."""
        check_dispatch(dispatch)
        if dispatch == "grouped" and not grouped_fits(self.d_model, self.experts.d_hidden):
            raise UserError(
                f"{MOE.option('dispatch', 'grouped')} needs widths that are multiples of 8, got "
                f"n_embd={self.d_model} and hidden {self.experts.d_hidden}: set "
                f"{MOE.option('dispatch', 'loop')} (or auto)."
            )
        self.dispatch = dispatch

    def set_load_balancing(self, scope: str, window: int = 1) -> None:
        """Choose the balance loss scope (``batch`` | ``global``) and, for ``global``, the
        window of micro-batches; (re)starts an empty window."""
        check_lb_settings(scope, window)
        self.lb_scope = scope
        self.lb_counts = (
            GlobalAssignmentCounts(self.n_experts, window) if scope == "global" else None
        )

    @property
    def n_experts(self) -> int:
        return self.router.n_experts

    @property
    def top_k(self) -> int:
        return self.router.top_k

    def path_for(self, device_type: str, dtype: torch.dtype) -> str:
        """The path a forward on ``device_type`` in compute ``dtype`` runs:
        :func:`resolve_dispatch`, and ``loop`` where the grouped GEMM cannot take the widths
        (``auto`` only: an explicit ``grouped`` was refused at :meth:`set_dispatch`)."""
        path = resolve_dispatch(self.dispatch, device_type, dtype)
        if path == "grouped" and not grouped_fits(self.d_model, self.experts.d_hidden):
            return "loop"
        return path

    def _clear_state(self) -> None:
        self.last_indices: Tensor | None = None
        self.last_logits: Tensor | None = None
        self.last_counts: Tensor | None = None
        self.last_dispatch: str | None = None
        self.last_lb_loss: Tensor | None = None
        self.last_z_loss: Tensor | None = None

    def __getstate__(self) -> dict[str, Any]:
        # The last losses hold the autograd graph, which deepcopy and pickle refuse.
        state = super().__getstate__()
        state.update(
            token_ids=None,
            block_domains=None,
            last_indices=None,
            last_logits=None,
            last_counts=None,
            last_lb_loss=None,
            last_z_loss=None,
        )
        return state

    def forward(self, hidden: Tensor) -> Tensor:
        """hidden [B, T, d] -> [B, T, d]."""
        shape = hidden.shape
        x = hidden.reshape(-1, self.d_model)  # [N, d]
        route = self.router(x, self._router_keys(shape[:-1]))
        routed = Dispatch.sort(route.indices, self.n_experts)
        counts = routed.counts
        path = self.path_for(x.device.type, _compute_dtype(x))
        if path == "grouped":
            rows = self.experts.grouped(x, routed)
        else:
            rows = self.experts.loop(x, routed, counts.tolist())
        out = self._combine(rows, routed, route.weights).to(x.dtype)

        self.last_indices = route.indices.detach()
        self.last_logits = route.logits.detach()
        self.last_counts = counts
        self.last_dispatch = path
        if self.lb_counts is not None and self.training and torch.is_grad_enabled():
            fraction = self.lb_counts.update(counts)  # collective: training forwards only
            self.last_lb_loss = global_load_balancing_loss(route.probs, fraction)
        else:
            self.last_lb_loss = load_balancing_loss(route.probs, route.indices, self.n_experts)
        self.last_z_loss = z_loss(route.logits)
        return out.reshape(shape)

    def _router_keys(self, shape: torch.Size) -> Tensor | None:
        """The key per token [N] a fixed router reads (None for the others): the token ids
        [B, T] flattened, or each block's domain [B] repeated over its T tokens."""
        key = self.router.key
        if key is None:
            return None
        given = self.token_ids if key == "token_ids" else self.block_domains
        if given is None:
            hint = (
                "pass input_ids to the model's forward (not inputs_embeds)"
                if key == "token_ids"
                else "route under moe_emergence.model.gpt2_moe.routing_domains(model, domains): "
                "the domain of each block, as an index into the run's domains"
            )
            raise UserError(
                f"{MOE.option('router', self.router_kind)} routes by the {key} of each "
                f"token, which this forward was not given: {hint}."
            )
        expected = tuple(shape) if key == "token_ids" else tuple(shape[:1])
        if tuple(given.shape) != expected:
            raise RuntimeError(
                f"the {key} handed to this MoE layer have shape {tuple(given.shape)}, its "
                f"input {tuple(shape)} tokens (a forward's keys left from another forward?)"
            )
        if key == "token_ids":
            return given.reshape(-1)
        return given.repeat_interleave(shape[1])

    @staticmethod
    def _combine(rows: Tensor, routed: Dispatch, weights: Tensor) -> Tensor:
        """sum_j weights[n, j] * expert output of (n, j), in float32, slots in order: [N, d].

        rows [A, d] in sorted order; weights [N, k]. Unsorting is a gather by the inverse
        permutation (each row read once), so no atomics in either direction."""
        n, k = weights.shape
        positions = torch.arange(routed.order.numel(), device=routed.order.device)
        inverse = torch.empty_like(routed.order).scatter_(0, routed.order, positions)
        per_slot = rows.index_select(0, inverse).view(n, k, -1).float()
        out = per_slot[:, 0] * weights[:, :1]
        for j in range(1, k):
            out = out + per_slot[:, j] * weights[:, j : j + 1]
        return out

    def extra_repr(self) -> str:
        lb = (
            f", lb_scope=global, lb_window={self.lb_counts.window}"
            if self.lb_counts is not None
            else ""
        )
        return (
            f"n_experts={self.n_experts}, top_k={self.top_k}, router={self.router_kind}, "
            f"dispatch={self.dispatch}{lb}"
        )
