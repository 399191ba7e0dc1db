"""Benchmark the MoE model's training step against its dense twin, and the MoE layer alone
against the dense MLP it replaced.

For each expert count (``--experts``, default 8 and 32; top-1 unless ``--top-k``) it builds a
randomly initialised GPT-2 (``--d-model`` 768, ``--n-head`` 12, ``--block-size`` 512,
``--n-layer`` 2, ``--vocab-size`` 8192: the LM head of GPT-2's 50257 would dominate the step)
and a deep copy whose ``--moe-layer`` block (default 1) gets an MoE layer with experts copied
from that block's MLP (``install_moe_layers``: router noise on, as early in training). Then, in
one process, interleaved so that machine noise hits both alike (the order alternates every
repeat):

- ``model``: one training step of ``--batch`` x block-size tokens: forward, LM loss (+ the MoE
  aux losses at 0.01 / 0.001 for the MoE model), backward, AdamW step, zero_grad;
- ``layer``: the MoE layer alone against the dense MLP, on the same [batch, block, d] input
  (train mode): forward, backward of ``(out * g).sum()`` (+ the aux losses for the MoE layer).
  No optimizer: its cost grows with the parameter count, not with the dispatch.

Each figure is the median of ``--repeat`` timed runs after ``--warmup`` untimed ones; the
spread (min-max) is printed. ``ratio`` = MoE tokens/s / dense tokens/s for the whole step,
``layer_ratio`` the same for the layer alone (1.0: the MoE costs what the dense model costs).
The last line of stdout is one JSON object: ``{"configs": [{n_experts, moe_tokens_per_s,
dense_tokens_per_s, ratio, layer_ratio, ...}, ...], "shapes": ..., "machine": ...}``.

Run it from the repository root (about a minute on 2 cores)::

    python benchmarks/bench_moe.py
    python benchmarks/bench_moe.py --experts 32 --d-model 256 --n-head 4

It uses no data and no network, and is not part of the test run.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from machine import machine_info

from moe_emergence.model.gpt2_moe import build_gpt2, collect_aux_outputs, install_moe_layers

LB_WEIGHT, Z_WEIGHT = 0.01, 0.001


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--n-head", type=int, default=12)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--moe-layer", type=int, default=1)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--repeat", type=int, default=7, help="timed runs; the median is kept")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--bf16", action="store_true", help="bf16 autocast around forward and loss (GPU runs)"
    )
    parser.add_argument("--json-only", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.warmup < 0:
        parser.error("--repeat must be >= 1 and --warmup >= 0")
    if not 0 <= args.moe_layer < args.n_layer:
        parser.error(f"--moe-layer must be in [0, {args.n_layer})")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here; use --device cpu")
    return args


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
            loss = model(input_ids=ids, labels=ids).loss
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
    steps: dict[str, Callable[[], None]], repeat: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds of each step per timed run; the steps alternate order every run."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeat):
        for name in names if r % 2 == 0 else names[::-1]:
            synchronize(device)
            start = time.perf_counter()
            steps[name]()
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    return seconds


# --------------------------------------------------------------------------- one configuration


def build_pair(args: argparse.Namespace, n_experts: int) -> tuple[Any, Any]:
    torch.manual_seed(args.seed)
    dense = build_gpt2(
        pretrained=None,
        vocab_size=args.vocab_size,
        n_positions=args.block_size,
        n_embd=args.d_model,
        n_layer=args.n_layer,
        n_head=args.n_head,
    )
    moe = copy.deepcopy(dense)
    install_moe_layers(moe, [args.moe_layer], n_experts, top_k=args.top_k, seed=args.seed)
    device = torch.device(args.device)
    return dense.to(device).train(), moe.to(device).train()


def run_config(args: argparse.Namespace, n_experts: int) -> dict[str, Any]:
    dense, moe = build_pair(args, n_experts)
    device = torch.device(args.device)
    tokens = args.batch * args.block_size
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, args.vocab_size, (args.batch, args.block_size), generator=generator)
    x = torch.randn(args.batch, args.block_size, args.d_model, generator=generator)
    grad = torch.randn(x.shape, generator=generator)
    ids, x, grad = ids.to(device), x.to(device), grad.to(device)
    x.requires_grad_(True)

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=1e-4)

    model_s = interleaved(
        {
            "moe": model_step(moe, optimizer(moe), ids, True, autocast),
            "dense": model_step(dense, optimizer(dense), ids, False, autocast),
        },
        args.repeat,
        args.warmup,
        device,
    )
    moe_layer = moe.transformer.h[args.moe_layer].mlp
    dense_mlp = dense.transformer.h[args.moe_layer].mlp
    layer_s = interleaved(
        {
            "moe": layer_step(moe_layer, x, grad, True, autocast),
            "dense": layer_step(dense_mlp, x, grad, False, autocast),
        },
        args.repeat,
        args.warmup,
        device,
    )
    med = {
        f"{part}_{kind}": statistics.median(runs[kind])
        for part, runs in (("model", model_s), ("layer", layer_s))
        for kind in ("moe", "dense")
    }
    return {
        "n_experts": n_experts,
        "top_k": args.top_k,
        "moe_tokens_per_s": round(tokens / med["model_moe"], 1),
        "dense_tokens_per_s": round(tokens / med["model_dense"], 1),
        "ratio": round(med["model_dense"] / med["model_moe"], 3),
        "layer_moe_tokens_per_s": round(tokens / med["layer_moe"], 1),
        "layer_dense_tokens_per_s": round(tokens / med["layer_dense"], 1),
        "layer_ratio": round(med["layer_dense"] / med["layer_moe"], 3),
        "seconds": {
            f"{part}_{kind}": [round(s, 4) for s in runs[kind]]
            for part, runs in (("model", model_s), ("layer", layer_s))
            for kind in ("moe", "dense")
        },
    }


# --------------------------------------------------------------------------- report


def _spread(runs: list[float]) -> str:
    return f"{statistics.median(runs) * 1e3:8.1f} ms ({min(runs) * 1e3:.1f}-{max(runs) * 1e3:.1f})"


def format_table(shapes: dict[str, Any], configs: list[dict[str, Any]]) -> str:
    lines = [
        "MoE benchmark: " + ", ".join(f"{k} {v}" for k, v in shapes.items()),
        "median of interleaved runs (min-max); ratio = MoE tokens/s / dense tokens/s",
        "",
        f"{'experts':>7}  {'part':<6}{'MoE':>30}{'dense':>30}{'MoE tok/s':>11}"
        f"{'dense tok/s':>12}{'ratio':>7}",
    ]
    lines.append("-" * len(lines[-1]))
    for c in configs:
        s = c["seconds"]
        lines.append(
            f"{c['n_experts']:>7}  {'model':<6}{_spread(s['model_moe']):>30}"
            f"{_spread(s['model_dense']):>30}{c['moe_tokens_per_s']:>11,.0f}"
            f"{c['dense_tokens_per_s']:>12,.0f}{c['ratio']:>7.2f}"
        )
        lines.append(
            f"{'':>7}  {'layer':<6}{_spread(s['layer_moe']):>30}"
            f"{_spread(s['layer_dense']):>30}{c['layer_moe_tokens_per_s']:>11,.0f}"
            f"{c['layer_dense_tokens_per_s']:>12,.0f}{c['layer_ratio']:>7.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    configs = [run_config(args, n) for n in args.experts]
    shapes = {
        "d_model": args.d_model,
        "n_head": args.n_head,
        "block_size": args.block_size,
        "batch": args.batch,
        "tokens_per_step": args.batch * args.block_size,
        "n_layer": args.n_layer,
        "moe_layer": args.moe_layer,
        "vocab_size": args.vocab_size,
        "top_k": args.top_k,
        "repeat": args.repeat,
        "warmup": args.warmup,
        "device": args.device,
        "bf16": args.bf16,
    }
    gpu = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None
    summary = {
        "configs": configs,
        "shapes": shapes,
        "machine": machine_info(
            ("torch", "transformers"), torch_threads=torch.get_num_threads(), gpu=gpu
        ),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    if not args.json_only:
        print(format_table(shapes, configs))
        m = summary["machine"]
        print(
            f"machine: {m['nproc']} cores ({m['torch_threads']} torch threads), {m['cpu']}, "
            f"torch {m['torch']}, transformers {m['transformers']}; "
            f"wall time {summary['wall_s']:.1f} s\n"
        )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
