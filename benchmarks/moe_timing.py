"""The timed pieces of ``bench_moe.py``: one training step of a model, one step of a layer
alone, their interleaved timing (seconds, first-step seconds, CUDA peak bytes), and the FLOPs
and memory figures (see ``bench_moe.py``'s docstring for what each measures)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

from moe_emergence.model.gpt2_moe import collect_aux_outputs, count_parameters, next_token_losses

LB_WEIGHT, Z_WEIGHT = 0.01, 0.001

# bf16 dense peak TFLOP/s by CUDA device name (first match wins; PCIe before the SXM default).
PEAK_TFLOPS_BF16 = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so that a timer reads finished work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- steps


def model_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ids: torch.Tensor,
    moe: bool,
    autocast: Callable[[], Any],
) -> Callable[[], None]:
    """One training step: forward, loss (LM + aux for the MoE model), backward, AdamW."""

    def step() -> None:
        with autocast():
            logits = model(input_ids=ids).logits
            loss = next_token_losses(logits, ids).mean()  # the training module's loss
            if moe:
                aux = collect_aux_outputs(model)
                loss = loss + LB_WEIGHT * aux.lb_loss + Z_WEIGHT * aux.z_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def layer_step(
    layer: torch.nn.Module,
    x: torch.Tensor,
    grad: torch.Tensor,
    moe: bool,
    autocast: Callable[[], Any],
) -> Callable[[], None]:
    """The layer alone: forward, backward of ``(out * grad).sum()`` (+ aux losses for MoE)."""

    def step() -> None:
        with autocast():
            loss = (layer(x) * grad).sum()
            if moe:
                loss = loss + LB_WEIGHT * layer.last_lb_loss + Z_WEIGHT * layer.last_z_loss
        loss.backward()
        layer.zero_grad(set_to_none=True)
        x.grad = None

    return step


def interleaved(
    steps: dict[str, Callable[[], None]],
    repeat: int,
    warmup: int,
    device: torch.device,
    first: bool = False,
) -> tuple[dict[str, list[float]], dict[str, float | None], dict[str, int | None]]:
    """Seconds of each step per timed run (the steps alternate order every run); the seconds
    of one extra untimed first step each where ``first`` (compilation), else None; and on CUDA
    the most each step allocated above what was allocated before it (bytes), else None."""
    names = list(steps)
    first_s: dict[str, float | None] = dict.fromkeys(names)
    if first:
        for name in names:
            synchronize(device)
            start = time.perf_counter()
            steps[name]()
            synchronize(device)
            first_s[name] = round(time.perf_counter() - start, 2)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    cuda = device.type == "cuda"
    seconds: dict[str, list[float]] = {name: [] for name in names}
    peak: dict[str, int | None] = {name: 0 if cuda else None for name in names}
    for r in range(repeat):
        for name in names if r % 2 == 0 else names[::-1]:
            synchronize(device)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            steps[name]()
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
            if cuda:
                above = torch.cuda.max_memory_allocated(device) - before
                peak[name] = max(peak[name], above)
    return seconds, first_s, peak


# --------------------------------------------------------------------------- FLOPs


def flops_per_token(model: torch.nn.Module, block_size: int) -> int:
    """PaLM / nanoGPT estimate: ``6 * N + 12 * n_layer * n_embd * block_size``, N the active
    parameters but the position embeddings (the tied token embeddings count once, as the LM
    head)."""
    config = model.config
    active = count_parameters(model)["active"] - model.transformer.wpe.weight.numel()
    return 6 * active + 12 * config.n_layer * config.n_embd * block_size


def peak_flops(args: argparse.Namespace) -> float | None:
    """The device's peak FLOP/s for MFU: ``--peak-tflops``, else the bf16 peak looked up by
    CUDA device name (with ``--bf16``), else None."""
    if args.peak_tflops is not None:
        return args.peak_tflops * 1e12
    if not (args.device.startswith("cuda") and args.bf16):
        return None
    name = torch.cuda.get_device_name(args.device)
    for key, tflops in PEAK_TFLOPS_BF16:
        if key in name:
            return tflops * 1e12
    return None


def tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def resident_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of the module's parameters and the optimizer's state (grads are freed per step)."""
    total = tensor_bytes(module.parameters())
    if optimizer is not None:
        for state in optimizer.state.values():
            total += tensor_bytes(state.values())
    return total
