"""The MoE layer (:class:`MoELayer`): routes each token to its experts and sums their weighted
outputs, dispatching the way ``model.moe.dispatch`` says (:func:`resolve_dispatch`); and
:func:`knocked_out`, an expert removed for analysis. Its parts: the routers
(:mod:`~moe_emergence.model.router`), the stacked experts and their dispatch
(:mod:`~moe_emergence.model.experts`), the auxiliary losses
(:mod:`~moe_emergence.model.losses`); their public names are importable from here too.

Shapes: N tokens (batch x time, flattened), E experts, k experts per token, d model width.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from moe_emergence.errors import UserError
from moe_emergence.model.experts import (
    PARAMETERS_OF_MLP,
    Dispatch,
    StackedExperts,
    compute_dtype,
)
from moe_emergence.model.losses import (
    GlobalAssignmentCounts,
    check_lb_settings,
    global_load_balancing_loss,
    load_balancing_loss,
    router_entropy,
    z_loss,
)
from moe_emergence.model.router import (
    HASH_PRIME,
    DomainRouter,
    HashRouter,
    Router,
    check_domain_map,
    hash_parameters,
    make_router,
)
from moe_emergence.model.settings import DISPATCHES
from moe_emergence.model.settings import MoESettings as MOE

__all__ = [
    "DISPATCHES",
    "HASH_PRIME",
    "PARAMETERS_OF_MLP",
    "Dispatch",
    "DomainRouter",
    "GlobalAssignmentCounts",
    "HashRouter",
    "MoELayer",
    "Router",
    "StackedExperts",
    "check_domain_map",
    "check_lb_settings",
    "cutlass_grouped_mm",
    "global_load_balancing_loss",
    "grouped_fits",
    "hash_parameters",
    "knocked_out",
    "load_balancing_loss",
    "resolve_dispatch",
    "router_entropy",
    "z_loss",
]


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
    themselves. ``dtype``: the compute dtype (the autocast dtype where autocast is on). A value
    outside :data:`DISPATCHES` is refused by the setting's own check (``MoESettings.dispatch``)."""
    MOE.check("dispatch", dispatch)
    return _path(dispatch, device_type, dtype)


def _path(dispatch: str, device_type: str, dtype: torch.dtype) -> str:
    """:func:`resolve_dispatch` of a ``dispatch`` already checked."""
    if dispatch != "auto":
        return dispatch
    fused = device_type == "cuda" and dtype == torch.bfloat16 and cutlass_grouped_mm()
    return "grouped" if fused else "loop"


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
        """Choose the dispatch path (``auto`` | ``loop`` | ``grouped``: the setting's check)."""
        MOE.check("dispatch", dispatch)
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
        path = _path(self.dispatch, device_type, dtype)  # checked at set_dispatch
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
        path = self.path_for(x.device.type, compute_dtype(x))
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
