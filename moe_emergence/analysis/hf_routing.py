"""Routing of a Hugging Face MoE causal LM, captured from the model's own forward.

In transformers 5 every supported family's MoE block asks its router for the experts, then
calls its experts module as ``experts(hidden_states [N, H], top_k_index [N, k], top_k_weights
[N, k])`` (N = batch x sequence tokens, row-major). A forward pre-hook on that experts module
reads the ids the model actually runs: after the family's own rule (softmax top-k, DeepSeek-V3's
group-limited choice on sigmoid scores plus a bias, GPT-OSS's top-k of the logits), which for
DeepSeek-V3 is not the top-k of the router logits. A forward hook on the router module reads its
logits (output 0, [N, E]) for the router entropy and the distribution ``inspect`` shows.

Slot 0 is the first choice: each token's k ids are ordered by the weight the model gives them
(largest first, stable), the order the project's own top-k uses (DeepSeek's routers return them
unsorted). Only the ids (and, if asked, the weights) are kept, per MoE layer, on the host.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from moe_emergence.analysis.probe import eval_mode
from moe_emergence.errors import UserError
from moe_emergence.model.gpt2_moe import next_token_losses

# Config keys that give a model away as a Mixture of Experts (for the refusal's wording).
MOE_CONFIG_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class Family:
    """One supported architecture: its ``config.model_type``, the experts and router classes of
    ``transformers.models.<model_type>.modeling_<model_type>``, the names of the experts'
    index and weight arguments (also read by position: 1 and 2), and its routing rule."""

    name: str
    model_type: str
    experts: str
    router: str
    rule: str
    index_arg: str = "top_k_index"
    weight_arg: str = "top_k_weights"

    def classes(self) -> tuple[type, type]:
        module = importlib.import_module(
            f"transformers.models.{self.model_type}.modeling_{self.model_type}"
        )
        return getattr(module, self.experts), getattr(module, self.router)


SOFTMAX_TOPK = "top-k of softmax(logits)"
FAMILIES: tuple[Family, ...] = (
    Family("Mixtral", "mixtral", "MixtralExperts", "MixtralTopKRouter", SOFTMAX_TOPK),
    Family("OLMoE", "olmoe", "OlmoeExperts", "OlmoeTopKRouter", SOFTMAX_TOPK),
    Family(
        "Qwen2-MoE (Qwen1.5-MoE)",
        "qwen2_moe",
        "Qwen2MoeExperts",
        "Qwen2MoeTopKRouter",
        SOFTMAX_TOPK + "; the shared expert is not routed",
    ),
    Family("Qwen3-MoE", "qwen3_moe", "Qwen3MoeExperts", "Qwen3MoeTopKRouter", SOFTMAX_TOPK),
    Family(
        "DeepSeek-V2",
        "deepseek_v2",
        "DeepseekV2Experts",
        "DeepseekV2TopkRouter",
        "top-k of softmax(logits), greedy or group-limited; shared experts not routed",
    ),
    Family(
        "DeepSeek-V3",
        "deepseek_v3",
        "DeepseekV3Experts",
        "DeepseekV3TopkRouter",
        "top-k of sigmoid(logits) + bias within the top groups; weights without the bias; "
        "shared experts not routed",
    ),
    Family(
        "GPT-OSS",
        "gpt_oss",
        "GptOssExperts",
        "GptOssTopKRouter",
        "top-k of the logits (with the router's bias), softmax over the k",
        index_arg="router_indices",
        weight_arg="routing_weights",
    ),
)


def supported_names() -> str:
    """``Mixtral (mixtral), OLMoE (olmoe), ...``: the families, with their model types."""
    return ", ".join(f"{f.name} ({f.model_type})" for f in FAMILIES)


def family_of(config: Any, what: str) -> Family:
    """The supported family of a model config; a one-line UserError naming the supported ones
    for a dense model or an MoE whose routing this module cannot capture (``what``: how the
    message names the model)."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if family.model_type == model_type:
            return family
    archs = ", ".join(getattr(config, "architectures", None) or []) or "no architecture"
    if any(getattr(config, key, None) for key in MOE_CONFIG_KEYS):
        kind = "an MoE whose routing cannot be captured here"
    else:
        kind = "a dense model (no experts in its config): there is no routing to measure"
    raise UserError(
        f"{what}: model type '{model_type}' ({archs}) is {kind}; supported MoE families: "
        f"{supported_names()}."
    )


@dataclass(frozen=True)
class MoeLayer:
    """One MoE block: its decoder layer ``index``, the experts module's path ``name``, the
    experts and router modules, ``n_experts`` E and ``top_k`` k."""

    index: int
    name: str
    experts: nn.Module
    router: nn.Module
    n_experts: int
    top_k: int


def moe_layers(model: nn.Module, family: Family) -> list[MoeLayer]:
    """The MoE blocks of ``model`` in layer order: each instance of the family's experts class,
    with the router module beside it (a child of the same parent). Dense layers of the model
    (DeepSeek's first layers, Qwen's ``mlp_only_layers``) have none and are left out."""
    experts_cls, router_cls = family.classes()
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, experts_cls):
            continue
        parent = model.get_submodule(name.rpartition(".")[0])
        routers = [m for m in parent.children() if isinstance(m, router_cls)]
        match = LAYER_INDEX.search(name)
        if len(routers) != 1 or match is None:
            raise UserError(
                f"{family.name}: the experts module {name} has no router beside it in a "
                f"numbered layer: this model's layout is not the one transformers ships."
            )
        router = routers[0]
        found.append(
            MoeLayer(int(match.group(1)), name, module, router, module.num_experts, router.top_k)
        )
    return sorted(found, key=lambda layer: layer.index)


# ---------------------------------------------------------------------- capture


@dataclass
class Captured:
    """One forward's routing of one MoE layer: ids int64 [N, k] (slot 0: largest weight),
    weights float32 [N, k] in that order, logits [N, E] of the router (None if not seen)."""

    ids: torch.Tensor
    weights: torch.Tensor
    logits: torch.Tensor | None = None


@dataclass
class RoutingCapture:
    """Hooks on the MoE layers while in a ``with`` block: after each forward, :meth:`take`
    gives each layer's :class:`Captured` (and forgets it). A layer whose experts module did not
    run in a forward (a fused kernel path that bypasses it) is refused by :meth:`take`."""

    layers: Sequence[MoeLayer]
    family: Family
    _seen: dict[int, Captured] = field(default_factory=dict)
    _logits: dict[int, torch.Tensor] = field(default_factory=dict)
    _handles: list[Any] = field(default_factory=list)

    def __enter__(self) -> RoutingCapture:
        for layer in self.layers:
            self._handles.append(
                layer.experts.register_forward_pre_hook(self._on_experts(layer), with_kwargs=True)
            )
            self._handles.append(layer.router.register_forward_hook(self._on_router(layer)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _on_experts(self, layer: MoeLayer) -> Callable:
        index_arg, weight_arg = self.family.index_arg, self.family.weight_arg

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            ids = args[1] if len(args) > 1 else kwargs[index_arg]
            weights = args[2] if len(args) > 2 else kwargs[weight_arg]
            order = weights.float().argsort(dim=-1, descending=True, stable=True)
            self._seen[layer.index] = Captured(
                ids.detach().gather(-1, order).long(), weights.detach().float().gather(-1, order)
            )

        return hook

    def _on_router(self, layer: MoeLayer) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self._logits[layer.index] = output[0].detach()

        return hook

    def take(self) -> dict[int, Captured]:
        missing = [layer.name for layer in self.layers if layer.index not in self._seen]
        if missing:
            raise UserError(
                f"{self.family.name}: the experts of {', '.join(missing)} did not run in the "
                f"forward (a fused or quantized path that bypasses them): their routing cannot "
                f"be captured; load the model unquantized."
            )
        out = self._seen
        for index, captured in out.items():
            captured.logits = self._logits.get(index)
        self._seen, self._logits = {}, {}
        return out


# ---------------------------------------------------------------------- routing a probe


@dataclass
class HFRouting:
    """Routing of P blocks of T tokens, per MoE layer (decoder layer index): experts int
    [P, T, k] (uint8 for E <= 256, else int16; slot 0 the first choice), weights float16
    [P, T, k] (only when asked), entropy_sum: the summed entropy (nats) of softmax(router
    logits) over the P x T tokens; loss_sum float64 [P]: each block's next-token cross-entropy
    (nats) summed over its T - 1 predictions; tokens_per_s: routed tokens per second."""

    experts: dict[int, np.ndarray]
    weights: dict[int, np.ndarray]
    entropy_sum: dict[int, float]
    loss_sum: np.ndarray
    tokens_per_s: float


def _id_dtype(n_experts: int) -> np.dtype:
    return np.dtype(np.uint8) if n_experts <= 256 else np.dtype(np.int16)


def input_device(model: nn.Module) -> torch.device:
    """Where the model's token ids go: its input embedding's device."""
    return model.get_input_embeddings().weight.device


@torch.no_grad()
def route_probe(
    model: nn.Module,
    layers: Sequence[MoeLayer],
    family: Family,
    input_ids: np.ndarray,
    batch_size: int,
    keep_weights: bool = False,
    progress: bool = True,
    with_loss: bool = True,
) -> HFRouting:
    """Route ``input_ids`` int [P, T] through ``model`` in eval mode, ``batch_size`` blocks per
    forward, keeping per MoE layer only the captured ids (and weights when ``keep_weights``)
    on the host, and each block's loss (``with_loss``; else the LM head does not run and
    ``loss_sum`` is NaN); a progress bar counts tokens (tokens/s)."""
    p, t = input_ids.shape
    experts = {m.index: np.zeros((p, t, m.top_k), dtype=_id_dtype(m.n_experts)) for m in layers}
    weights = (
        {m.index: np.zeros((p, t, m.top_k), dtype=np.float16) for m in layers}
        if keep_weights
        else {}
    )
    entropy = dict.fromkeys(experts, 0.0)
    loss_sum = np.zeros(p) if with_loss else np.full(p, np.nan)
    device = input_device(model)
    bar = tqdm(total=p * t, unit="tok", unit_scale=True, desc="routing", disable=not progress)
    started = time.perf_counter()
    with bar, eval_mode(model), RoutingCapture(layers, family) as capture:
        for start in range(0, p, batch_size):
            chunk = torch.as_tensor(input_ids[start : start + batch_size], device=device).long()
            stop = start + len(chunk)
            if with_loss:
                logits = model(input_ids=chunk, use_cache=False).logits
                losses = next_token_losses(logits, chunk).double().sum(1)
                loss_sum[start:stop] = losses.cpu().numpy()
            else:
                model.base_model(input_ids=chunk, use_cache=False)
            for index, seen in capture.take().items():
                experts[index][start:stop] = seen.ids.view(len(chunk), t, -1).cpu().numpy()
                if keep_weights:
                    weights[index][start:stop] = seen.weights.view(len(chunk), t, -1).cpu()
                if seen.logits is not None:
                    log_p = seen.logits.double().log_softmax(-1)
                    entropy[index] += float(-(log_p.exp() * log_p).sum())
            bar.update(len(chunk) * t)
    rate = p * t / max(time.perf_counter() - started, 1e-9)
    return HFRouting(experts, weights, entropy, loss_sum, rate)


@torch.no_grad()
def route_text(
    model: nn.Module, layers: Sequence[MoeLayer], family: Family, token_ids: Sequence[int]
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per MoE layer, ``(experts int64 [T, k], probs float32 [T, E])`` of one token sequence
    (one forward, eval mode): the captured ids and softmax(router logits), as
    :func:`moe_emergence.analysis.inspect.render_html` takes them."""
    ids = torch.as_tensor(np.asarray(token_ids), dtype=torch.long, device=input_device(model))
    with eval_mode(model), RoutingCapture(layers, family) as capture:
        model(input_ids=ids.view(1, -1), use_cache=False)
        seen = capture.take()
    out = {}
    for index, captured in sorted(seen.items()):
        logits = captured.logits
        probs = (
            logits.float().softmax(-1)
            if logits is not None
            else torch.full((len(ids), 0), float("nan"))
        )
        out[index] = (captured.ids.cpu().numpy(), probs.cpu().numpy())
    return out


def peak_memory(device: torch.device) -> str:
    """The peak memory of this process: CUDA's peak allocation on ``device`` (tensors only, not
    the allocator's reserve) when it is a GPU, and the host's peak resident set size."""
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB
    text = f"host peak RSS {host:.2f} GiB"
    if device.type == "cuda":
        gpu = torch.cuda.max_memory_allocated(device) / 2**30
        text = f"GPU peak allocated {gpu:.2f} GiB ({torch.cuda.get_device_name(device)}); {text}"
    return text


# ---------------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    """A loaded MoE causal LM (eval mode): where it came from, its family and MoE layers, the
    dtype and device it runs in, and notes on how it was loaded."""

    model: nn.Module
    name: str
    location: str
    family: Family
    layers: list[MoeLayer]
    dtype: torch.dtype
    device: torch.device
    notes: list[str] = field(default_factory=list)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(spec: str | None) -> tuple[torch.device, Any]:
    """``(device of the inputs, device_map for from_pretrained)``: None picks cuda when there
    is a GPU, else cpu; ``auto`` spreads the model over every GPU (needs accelerate). Without
    accelerate the device_map is None: the model loads on the CPU and is moved."""
    if spec is None:
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    accelerate = importlib.util.find_spec("accelerate") is not None
    if spec == "auto":
        if not accelerate:
            raise UserError(
                "--device auto spreads the model over the GPUs with accelerate, which is not "
                "installed: pip install accelerate, or pass --device cuda (one GPU) or cpu."
            )
        return torch.device("cuda" if torch.cuda.is_available() else "cpu"), "auto"
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UserError(
            f"--device {spec!r} is not a torch device: pass cpu, cuda or auto."
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {spec}: CUDA is not available here; pass --device cpu.")
    return device, ({"": str(device)} if accelerate else None)


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """``--dtype``: bf16, fp16 or fp32; None: bf16 on a GPU, fp32 on the CPU."""
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def load_config(name: str, location: str, trust_remote_code: bool) -> Any:
    """The model's config (no weights), its errors as one line naming ``--model``."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        reason = " ".join(str(exc).split())[:300]
        hint = "" if trust_remote_code else " (a model with its own code needs --trust-remote-code)"
        raise UserError(f"--model {name}: its config cannot be read{hint}: {reason}") from None


def load_model(
    name: str,
    location: str,
    config: Any,
    device_spec: str | None,
    dtype_name: str | None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load the weights of ``location`` (a folder, or a Hub id reachable as the data's are:
    :func:`moe_emergence.hub.resolve_repo`), whose ``config`` (:func:`load_config`) must be of a
    supported family, in ``dtype`` on the device (``auto``: spread by accelerate), eval mode.
    MXFP4-quantized GPT-OSS weights are dequantized, so that its experts module runs."""
    from transformers import AutoModelForCausalLM

    family = family_of(config, f"--model {name}")
    device, device_map = resolve_device(device_spec)
    dtype = resolve_dtype(dtype_name, device)
    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": device_map}
    notes = []
    quant = getattr(config, "quantization_config", None) or {}
    method = quant.get("quant_method") if isinstance(quant, dict) else quant.quant_method
    if str(method) == "mxfp4":
        from transformers import Mxfp4Config

        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
        notes.append("MXFP4 weights dequantized (their fused kernel bypasses the experts module)")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            location, trust_remote_code=trust_remote_code, **kwargs
        )
    except (OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise UserError(f"--model {name}: its weights cannot be loaded: {reason}") from None
    if device_map is None:
        model.to(device)
    model.eval()
    layers = moe_layers(model, family)
    source = type(model).__module__
    if not layers and not source.startswith("transformers."):
        raise UserError(
            f"--model {name}: its modelling code is its own ({source}), not transformers' "
            f"{family.name}: its routing cannot be captured; leave out --trust-remote-code to "
            f"load transformers' implementation."
        )
    if not layers:
        raise UserError(
            f"--model {name}: a {family.name} model with no MoE layer (dense in every layer): "
            f"there is no routing to measure."
        )
    return LoadedModel(model, name, location, family, layers, dtype, device, notes)
