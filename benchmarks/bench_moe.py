"""Benchmark the MoE model's training step against its dense twin, and the MoE layer alone
against the dense MLP it replaced, for each dispatch path, with and without torch.compile.

For each expert count (``--experts``, default 8 and 32; top-1 unless ``--top-k``), dispatch
path (``--dispatch``, default ``loop grouped``; ``auto`` too) and compile setting
(``--compile``: ``off`` and ``on`` on CUDA, ``off`` only on CPU, where inductor takes about a
minute per compile on 2 cores, even at toy widths, and the loop path recompiles in its first
steps as its per-expert row counts change) it builds a randomly initialised GPT-2
(``--d-model`` 768, ``--n-head`` 12, ``--block-size`` 512, ``--n-layer`` 2, ``--vocab-size``
8192: the LM head of GPT-2's 50257 would dominate the step) and a deep copy whose
``--moe-layer`` blocks (default 1) get MoE layers with experts copied from that block's MLP
(``install_moe_layers``: router noise on, as early in training). ``--compile on`` compiles
each transformer block in place (``block.compile()``) of both models, and separate copies of
the layers timed alone. Then, in one process, interleaved so that machine noise hits both
alike (the order alternates every repeat):

- ``model``: one training step of ``--batch`` x block-size tokens: forward, LM loss
  (``next_token_losses``, the training module's chunked cross-entropy, + the MoE aux losses
  at 0.01 / 0.001 for the MoE model), backward, AdamW step (``fused=True`` on CUDA),
  zero_grad;
- ``layer``: the first MoE layer alone against the dense MLP it replaced, on the same
  [batch, block, d] input (train mode): forward, backward of ``(out * g).sum()`` (+ the aux
  losses for the MoE layer). No optimizer: its cost grows with the parameter count, not with
  the dispatch.

``--real-shape`` benchmarks the shape of the study instead: GPT-2 124M (12 layers, width 768,
12 heads, vocab 50,257, 1,024 positions; random init, nothing downloaded) with MoE layers of
8 experts, top-1, in blocks 8-11, batch 8 x 512, bf16 autocast, against the dense twin (the
same GPT-2 without MoE, ``condition=dense``). Shape flags given explicitly still override it
(the tests run it scaled down).

Each figure is the median of ``--repeat`` timed runs (default 5 on CPU, 10 on CUDA) after
``--warmup`` untimed ones (default 1 on CPU, 3 on CUDA; with ``--compile on`` one more
untimed step first: its seconds, compile included, are ``first_step_s``); the spread
(min-max) is printed. ``ratio`` = MoE tokens/s / dense tokens/s for the whole step,
``layer_ratio`` the same for the layer alone (1.0: the MoE costs what the dense model costs).
``dispatch_ran`` is the path the MoE layers report (``last_dispatch``) after the timed steps
(``auto`` resolves per device and dtype).

Peak memory (CUDA only; null on CPU): ``peak_mem_mb`` is ``torch.cuda.max_memory_allocated``
over the whole configuration (reset before it; both models, their AdamW states and the
layer copies are resident), and ``moe_peak_mem_mb`` / ``dense_peak_mem_mb`` that model's step
as if it ran alone: its parameters and AdamW state plus the most its step allocates above
what was allocated before it (reset before every step).

Model FLOPs utilisation (the PaLM / nanoGPT estimate): ``flops_per_token = 6 * N + 12 *
n_layer * n_embd * block_size``, N the active non-embedding parameters (all parameters but
the position embeddings, the token embeddings counted once as the tied LM head; an MoE
layer counts its router and top_k of its experts) and the second term attention's scores;
``mfu = flops_per_token * tokens_per_s / peak``. The peak is ``--peak-tflops``, else, with
``--bf16`` on CUDA, the bf16 dense peak of the device looked up by name (H100 / H200 SXM 989,
H100 PCIe 756, A100 312 TFLOP/s); else null (and always on CPU without ``--peak-tflops``).

The last line of stdout is one JSON object: ``{"mode", "configs": [{n_experts, dispatch,
dispatch_ran, compile, moe_tokens_per_s, dense_tokens_per_s, ratio, layer_ratio, ...,
peak_mem_mb, moe_mfu, ...}, ...], "shapes", "machine", "wall_s"}``. A configuration that
fails records only its ``error`` (traceback on stderr) and the script exits 1 after
reporting the rest.

Run it from the repository root. On CPU (defaults: 8 and 32 experts x loop and grouped,
compile off, 5 repeats after 1 warmup, cut from 7 after 2 to save time) it took 4.5 minutes on
2 shared cores (torch 2.13), over half of it in the 32-expert loop configuration; ``--threads
1`` gives steadier ratios where other processes share the cores::

    python benchmarks/bench_moe.py
    python benchmarks/bench_moe.py --experts 32 --d-model 256 --n-head 4

On a GPU (compile off and on; add ``--batch 8`` for the study's batch)::

    python benchmarks/bench_moe.py --device cuda --bf16
    python benchmarks/bench_moe.py --device cuda --real-shape    # bf16 implied

``--compile on`` with ``--dispatch grouped`` needs ``--bf16`` (compile's shape check of the
grouped GEMM accepts bf16 only). It uses no data and no network, and is not part of the test
run (``tests/test_bench_moe.py`` runs it at toy shapes). The timed steps and the FLOPs and
memory figures are in ``moe_timing.py`` beside it.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import traceback
from typing import Any

import torch
from machine import machine_info
from moe_timing import (
    flops_per_token,
    interleaved,
    layer_step,
    model_step,
    peak_flops,
    resident_bytes,
)

from moe_emergence.model.gpt2_moe import build_gpt2, install_moe_layers, moe_layers
from moe_emergence.model.moe import DISPATCHES, grouped_fits

# what tests/test_bench_moe.py uses of this script
__all__ = ["flops_per_token", "main", "parse_args", "run_config"]

MIB = 2**20

# Shapes: the synthetic default, and --real-shape (GPT-2 124M, MoE in blocks 8-11).
DEFAULTS = {
    "experts": [8, 32],
    "d_model": 768,
    "n_head": 12,
    "block_size": 512,
    "n_positions": None,  # the block size
    "batch": 2,
    "n_layer": 2,
    "moe_layer": [1],
    "vocab_size": 8192,
}
REAL_SHAPE = {
    "experts": [8],
    "d_model": 768,
    "n_head": 12,
    "block_size": 512,
    "n_positions": 1024,
    "batch": 8,
    "n_layer": 12,
    "moe_layer": [8, 9, 10, 11],
    "vocab_size": 50257,
}


def _add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and MoE shape flags (None: the shape's default, filled by parse_args)."""
    parser.add_argument(
        "--real-shape",
        action="store_true",
        help="GPT-2 124M, MoE (8 experts, top-1) in blocks 8-11, batch 8 x 512, bf16 autocast; "
        "shape flags given explicitly override it",
    )
    parser.add_argument("--experts", type=int, nargs="+", help="default 8 32 (real shape: 8)")
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument(
        "--dispatch",
        nargs="+",
        choices=DISPATCHES,
        default=["loop", "grouped"],
        help="MoE dispatch paths to time (default: loop grouped)",
    )
    parser.add_argument(
        "--compile",
        nargs="+",
        choices=("off", "on"),
        default=None,
        help="compile each block (block.compile()); default: off on for CUDA, off on CPU",
    )
    parser.add_argument("--d-model", type=int, help="default 768")
    parser.add_argument("--n-head", type=int, help="default 12")
    parser.add_argument("--block-size", type=int, help="default 512")
    parser.add_argument("--n-positions", type=int, help="default: block size (real shape 1024)")
    parser.add_argument("--batch", type=int, help="default 2 (real shape 8)")
    parser.add_argument("--n-layer", type=int, help="default 2 (real shape 12)")
    parser.add_argument(
        "--moe-layer", type=int, nargs="+", help="MoE blocks; default 1 (real shape 8 9 10 11)"
    )
    parser.add_argument("--vocab-size", type=int, help="default 8192 (real shape 50257)")


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The timing, device and output flags."""
    parser.add_argument(
        "--repeat", type=int, help="timed runs; the median is kept (default: 5 on CPU, 10 CUDA)"
    )
    parser.add_argument("--warmup", type=int, help="untimed runs first (default: 1 CPU, 3 CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--bf16", action="store_true", help="bf16 autocast around forward and loss (GPU runs)"
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="device peak TFLOP/s for MFU (default: looked up by CUDA device name with --bf16)",
    )
    parser.add_argument("--json-only", action="store_true", help="print only the JSON line")


def _fill_defaults(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The shape's defaults (DEFAULTS or REAL_SHAPE) for flags not given, then the device's."""
    shape = REAL_SHAPE if args.real_shape else DEFAULTS
    for name, value in shape.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.n_positions is None:
        args.n_positions = args.block_size
    if args.real_shape:
        args.bf16 = True

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here; use --device cpu")
    cuda = args.device.startswith("cuda")
    if args.compile is None:
        args.compile = ["off", "on"] if cuda else ["off"]
    if args.repeat is None:
        args.repeat = 10 if cuda else 5
    if args.warmup is None:
        args.warmup = 3 if cuda else 1


def _check_shape(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.repeat < 1 or args.warmup < 0:
        parser.error("--repeat must be >= 1 and --warmup >= 0")
    for name in ("d_model", "n_head", "block_size", "batch", "n_layer", "vocab_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.d_model % args.n_head:
        parser.error(
            f"--d-model {args.d_model} is not a multiple of --n-head {args.n_head}: "
            f"pick a width divisible by the head count"
        )
    if args.block_size > args.n_positions:
        parser.error(
            f"--block-size {args.block_size} exceeds --n-positions {args.n_positions}: "
            f"raise --n-positions or lower --block-size"
        )
    bad = [i for i in args.moe_layer if not 0 <= i < args.n_layer]
    if bad or len(set(args.moe_layer)) != len(args.moe_layer):
        parser.error(f"--moe-layer must be distinct blocks in [0, {args.n_layer}) (--n-layer)")


def _check_moe(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if min(args.experts) < 1:
        parser.error("--experts must all be >= 1")
    if not 1 <= args.top_k <= min(args.experts):
        parser.error(f"--top-k must be in [1, {min(args.experts)}] (the fewest --experts)")
    if "grouped" in args.dispatch and not grouped_fits(args.d_model, 4 * args.d_model):
        parser.error(
            f"--dispatch grouped needs --d-model a multiple of 8 (the grouped GEMM's rows), got "
            f"{args.d_model}: use e.g. --d-model {args.d_model + (-args.d_model) % 8}, or "
            f"--dispatch loop"
        )
    if "grouped" in args.dispatch and "on" in args.compile and not args.bf16:
        parser.error(
            "--compile on with --dispatch grouped needs --bf16 (torch.compile's check of the "
            "grouped GEMM accepts bf16 only): add --bf16, or use --compile off or --dispatch loop"
        )
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        parser.error("--peak-tflops must be > 0")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _add_shape_arguments(parser)
    _add_run_arguments(parser)
    args = parser.parse_args(argv)
    _fill_defaults(parser, args)
    _check_shape(parser, args)
    _check_moe(parser, args)
    return args


# --------------------------------------------------------------------------- one configuration


def build_pair(args: argparse.Namespace, n_experts: int, dispatch: str) -> tuple[Any, Any]:
    torch.manual_seed(args.seed)
    dense = build_gpt2(
        pretrained=None,
        vocab_size=args.vocab_size,
        n_positions=args.n_positions,
        n_embd=args.d_model,
        n_layer=args.n_layer,
        n_head=args.n_head,
    )
    moe = copy.deepcopy(dense)
    install_moe_layers(
        moe, args.moe_layer, n_experts, top_k=args.top_k, seed=args.seed, dispatch=dispatch
    )
    device = torch.device(args.device)
    return dense.to(device).train(), moe.to(device).train()


def _inputs(args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Token ids [batch, block] for the models; a layer input x [batch, block, d] (requires
    grad) and the output gradient g of its shape for the layers, all seeded."""
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, args.vocab_size, (args.batch, args.block_size), generator=generator)
    x = torch.randn(args.batch, args.block_size, args.d_model, generator=generator)
    grad = torch.randn(x.shape, generator=generator)
    ids, x, grad = ids.to(device), x.to(device), grad.to(device)
    x.requires_grad_(True)
    return ids, x, grad


def _layer_pair(
    args: argparse.Namespace, dense: Any, moe: Any, compiled: bool
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Copies of the first MoE layer and the dense MLP it replaced, so that compiling them
    leaves the models' blocks alone; with ``compiled`` every block of both models and both
    copies are compiled in place."""
    block = args.moe_layer[0]
    moe_layer = copy.deepcopy(moe.transformer.h[block].mlp)
    dense_mlp = copy.deepcopy(dense.transformer.h[block].mlp)
    if compiled:
        for model in (dense, moe):
            for b in model.transformer.h:
                b.compile()
        moe_layer.compile()
        dense_mlp.compile()
    return moe_layer, dense_mlp


def _by_part(model: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    """``{"model_moe", "model_dense", "layer_moe", "layer_dense"}`` of two per-kind dicts."""
    return {
        f"{part}_{kind}": runs[kind]
        for part, runs in (("model", model), ("layer", layer))
        for kind in ("moe", "dense")
    }


def _memory(
    device: torch.device, models: dict[str, Any], opt: dict[str, Any], step_peak: dict
) -> dict[str, float | None]:
    """Peak MiB on CUDA (None elsewhere): ``all`` over the configuration, and per model its
    parameters and AdamW state plus the most its step allocated above what was before it."""
    mem: dict[str, float | None] = {"all": None, "moe": None, "dense": None}
    if device.type == "cuda":
        mem["all"] = round(torch.cuda.max_memory_allocated(device) / MIB, 1)
        for kind, model in models.items():
            static = resident_bytes(model, opt[kind])
            mem[kind] = round((static + step_peak[kind]) / MIB, 1)
    return mem


def _throughput(
    args: argparse.Namespace, models: dict[str, Any], med: dict[str, float]
) -> dict[str, Any]:
    """Per kind (moe, dense): tokens/s of the step, FLOPs per token and MFU (None without a
    peak); and the peak TFLOP/s used."""
    tokens = args.batch * args.block_size
    peak = peak_flops(args)
    flops = {kind: flops_per_token(models[kind], args.block_size) for kind in ("moe", "dense")}
    tokens_per_s = {kind: tokens / med[f"model_{kind}"] for kind in ("moe", "dense")}
    mfu = {
        kind: None if peak is None else float(f"{flops[kind] * tokens_per_s[kind] / peak:.4g}")
        for kind in ("moe", "dense")
    }
    return {
        "tokens_per_s": tokens_per_s,
        "flops": flops,
        "mfu": mfu,
        "peak_tflops": None if peak is None else peak / 1e12,
    }


def _time_steps(
    args: argparse.Namespace, device: torch.device, dense: Any, moe: Any, compiled: bool
) -> dict[str, Any]:
    """The model steps, then the layers alone, each pair interleaved: per-run seconds,
    first-step seconds, per-step peak bytes, the optimizers and the dispatch paths run."""
    ids, x, grad = _inputs(args, device)
    moe_layer, dense_mlp = _layer_pair(args, dense, moe, compiled)

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
        fused = True if device.type == "cuda" else None
        return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)

    opt = {"moe": optimizer(moe), "dense": optimizer(dense)}
    model_s, model_first, model_peak = interleaved(
        {
            "moe": model_step(moe, opt["moe"], ids, True, autocast),
            "dense": model_step(dense, opt["dense"], ids, False, autocast),
        },
        args.repeat,
        args.warmup,
        device,
        first=compiled,
    )
    layer_s, layer_first, _ = interleaved(
        {
            "moe": layer_step(moe_layer, x, grad, True, autocast),
            "dense": layer_step(dense_mlp, x, grad, False, autocast),
        },
        args.repeat,
        args.warmup,
        device,
        first=compiled,
    )
    ran = sorted({layer.last_dispatch for layer in moe_layers(moe).values()})
    return {
        "seconds": _by_part(model_s, layer_s),
        "first_s": _by_part(model_first, layer_first),
        "model_peak": model_peak,
        "opt": opt,
        "ran": ran[0] if len(ran) == 1 else ran,
        "layer_ran": moe_layer.last_dispatch,
    }


def run_config(
    args: argparse.Namespace, n_experts: int, dispatch: str, compiled: bool
) -> dict[str, Any]:
    device = torch.device(args.device)
    if compiled:
        torch._dynamo.reset()  # no cache entries (or recompile budget) left from other configs
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    dense, moe = build_pair(args, n_experts, dispatch)
    timed = _time_steps(args, device, dense, moe, compiled)
    seconds = timed["seconds"]
    med = {name: statistics.median(runs) for name, runs in seconds.items()}
    models = {"moe": moe, "dense": dense}
    mem = _memory(device, models, timed["opt"], timed["model_peak"])
    rate = _throughput(args, models, med)
    tokens = args.batch * args.block_size
    return {
        "n_experts": n_experts,
        "top_k": args.top_k,
        "dispatch": dispatch,
        "dispatch_ran": timed["ran"],
        "layer_dispatch_ran": timed["layer_ran"],
        "compile": "on" if compiled else "off",
        "moe_tokens_per_s": round(rate["tokens_per_s"]["moe"], 1),
        "dense_tokens_per_s": round(rate["tokens_per_s"]["dense"], 1),
        "ratio": round(med["model_dense"] / med["model_moe"], 3),
        "layer_moe_tokens_per_s": round(tokens / med["layer_moe"], 1),
        "layer_dense_tokens_per_s": round(tokens / med["layer_dense"], 1),
        "layer_ratio": round(med["layer_dense"] / med["layer_moe"], 3),
        "peak_mem_mb": mem["all"],
        "moe_peak_mem_mb": mem["moe"],
        "dense_peak_mem_mb": mem["dense"],
        "moe_flops_per_token": rate["flops"]["moe"],
        "dense_flops_per_token": rate["flops"]["dense"],
        "peak_tflops": rate["peak_tflops"],
        "moe_mfu": rate["mfu"]["moe"],
        "dense_mfu": rate["mfu"]["dense"],
        "first_step_s": timed["first_s"] if compiled else None,
        "seconds": {name: [round(t, 4) for t in runs] for name, runs in seconds.items()},
    }


def failed_config(n_experts: int, dispatch: str, compiled: bool, exc: Exception) -> dict:
    return {
        "n_experts": n_experts,
        "dispatch": dispatch,
        "compile": "on" if compiled else "off",
        "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
    }


# --------------------------------------------------------------------------- report


def _spread(runs: list[float]) -> str:
    return f"{statistics.median(runs) * 1e3:8.1f} ms ({min(runs) * 1e3:.1f}-{max(runs) * 1e3:.1f})"


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(mode: str, shapes: dict[str, Any], configs: list[dict[str, Any]]) -> str:
    lines = [
        f"MoE benchmark ({mode}): " + ", ".join(f"{k} {v}" for k, v in shapes.items()),
        "median of interleaved runs (min-max); ratio = MoE tokens/s / dense tokens/s; "
        "peak MiB and MFU: MoE / dense (CUDA only)",
        "",
        f"{'experts':>7} {'dispatch':<9}{'compile':<8}{'part':<6}{'MoE':>28}{'dense':>28}"
        f"{'MoE tok/s':>11}{'dense tok/s':>12}{'ratio':>7}{'peak MiB':>18}{'MFU':>14}",
    ]
    lines.append("-" * len(lines[-1]))
    for c in configs:
        head = f"{c['n_experts']:>7} {c['dispatch']:<9}{c['compile']:<8}"
        if "error" in c:
            lines.append(f"{head}failed: {c['error']}")
            continue
        s = c["seconds"]
        mem = f"{_num(c['moe_peak_mem_mb'], ',.0f')} / {_num(c['dense_peak_mem_mb'], ',.0f')}"
        mfu = f"{_num(c['moe_mfu'], '.3f')} / {_num(c['dense_mfu'], '.3f')}"
        lines.append(
            f"{head}{'model':<6}{_spread(s['model_moe']):>28}"
            f"{_spread(s['model_dense']):>28}{c['moe_tokens_per_s']:>11,.0f}"
            f"{c['dense_tokens_per_s']:>12,.0f}{c['ratio']:>7.2f}{mem:>18}{mfu:>14}"
        )
        ran = c["dispatch_ran"]
        note = "" if ran == c["dispatch"] else f"  (ran: {ran})"
        lines.append(
            f"{'':>7} {'':<9}{'':<8}{'layer':<6}{_spread(s['layer_moe']):>28}"
            f"{_spread(s['layer_dense']):>28}{c['layer_moe_tokens_per_s']:>11,.0f}"
            f"{c['layer_dense_tokens_per_s']:>12,.0f}{c['layer_ratio']:>7.2f}{note}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    configs = []
    for n_experts in args.experts:
        for dispatch in args.dispatch:
            for setting in args.compile:
                compiled = setting == "on"
                try:
                    configs.append(run_config(args, n_experts, dispatch, compiled))
                except Exception as exc:  # report it with the rest; exit 1 at the end
                    traceback.print_exc()
                    configs.append(failed_config(n_experts, dispatch, compiled, exc))
    mode = "real-shape" if args.real_shape else "synthetic"
    shapes = {
        "d_model": args.d_model,
        "n_head": args.n_head,
        "block_size": args.block_size,
        "n_positions": args.n_positions,
        "batch": args.batch,
        "tokens_per_step": args.batch * args.block_size,
        "n_layer": args.n_layer,
        "moe_layers": args.moe_layer,
        "vocab_size": args.vocab_size,
        "top_k": args.top_k,
        "repeat": args.repeat,
        "warmup": args.warmup,
        "device": args.device,
        "bf16": args.bf16,
        "fused_adamw": args.device.startswith("cuda"),
    }
    gpu = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None
    summary = {
        "mode": mode,
        "configs": configs,
        "shapes": shapes,
        "machine": machine_info(
            ("torch", "transformers"), torch_threads=torch.get_num_threads(), gpu=gpu
        ),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    if not args.json_only:
        print(format_table(mode, shapes, configs))
        m = summary["machine"]
        print(
            f"machine: {m['nproc']} cores ({m['torch_threads']} torch threads), {m['cpu']}, "
            f"gpu {m['gpu']}, torch {m['torch']}, transformers {m['transformers']}; "
            f"wall time {summary['wall_s']:.1f} s\n"
        )
    print(json.dumps(summary))
    failed = any("error" in c for c in configs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
