"""Time and peak memory of one routing analysis (the training callback's, and ``analyze``'s per
checkpoint) on a probe of the default config's shape, by stage.

    python benchmarks/bench_routing_analysis.py                      # default shape, ~5 min
    python benchmarks/bench_routing_analysis.py --route              # + routing through GPT-2

The default config (``python train.py data/size=10mb``: no held-out split) probes 64 training
blocks per domain: 3 x 64 blocks of 512 tokens, scored in the 4 MoE layers (8-11) of 8 experts
with 999 permutations a null. The probe here has that shape with synthetic text (Zipf token
ids; documents as long as those the default probe scores on the mirror: code 79, math 242,
prose 252 documents in 64 blocks each) and routing with some domain signal: the scoring's cost
depends on the shape, the documents and the distinct ids, not on what the text says.

Stages (each its wall time and its peak memory above what the process held before it):
``route`` (``--route``): the probe through GPT-2 124M with the MoE layers, randomly
initialised, eval mode, no grad, ``--batch-size`` blocks a forward (what the callback does);
``score``: :func:`~moe_emergence.analysis.probe.score_probe_routing` (NMI and its null, the
held-out gains and their nulls, cond_mi, the interval), the nulls drawn a batch at a time;
``score_one_array``: the same with every null drawn as one [K, N] array (the reference: how it
ran before), so the line reads as a ratio measured in the same run; ``specialise``:
:func:`~moe_emergence.analysis.specialisation.specialise_probe`. Peak memory is the process's
allocations traced (numpy's; tracemalloc) and the process's high-water mark (VmHWM, reset
before each stage: torch's too).

Prints one line per stage, then one JSON line (machine, shape, stages, the score's memory ratio
one array / batched). No figure is asserted anywhere; tests/test_bench_routing_analysis.py runs
it on tiny inputs so that it cannot rot.
"""

from __future__ import annotations

import argparse
import json
import re
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from machine import machine_info

from moe_emergence.analysis import heldout
from moe_emergence.analysis.probe import Probe, make_probe, score_probe_routing
from moe_emergence.analysis.specialisation import specialise_probe

DOMAINS = ("code", "math", "prose")
MEAN_DOC_TOKENS = {"code": 400, "math": 130, "prose": 130}  # the default probe on the mirror


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--blocks-per-domain", type=int, default=64, help="probe blocks per domain (64)")
    add("--block-size", type=int, default=512, help="tokens per block (512)")
    add("--layers", type=int, default=4, help="MoE layers scored (4: layers 8-11)")
    add("--experts", type=int, default=8, help="experts per MoE layer (8)")
    add("--permutations", type=int, default=999, help="draws per null (999)")
    add("--vocab-size", type=int, default=50257, help="token ids drawn from (GPT-2's)")
    add("--route", action="store_true", help="also route the probe through GPT-2 124M + MoE")
    add("--batch-size", type=int, default=32, help="probe blocks a forward (--route; 32)")
    add("--n-layer", type=int, default=12, help="--route: GPT-2 layers (12: 124M)")
    add("--n-embd", type=int, default=768, help="--route: GPT-2 width (768)")
    add("--n-head", type=int, default=12, help="--route: attention heads (12)")
    add("--seed", type=int, default=0)
    return parser.parse_args(argv)


def synthetic_probe(args: argparse.Namespace, rng: np.random.Generator) -> Probe:
    """A probe of the given shape: each domain's blocks cut from one stream of documents of
    geometric lengths (mean ``MEAN_DOC_TOKENS``), Zipf token ids."""
    t, per = args.block_size, args.blocks_per_domain
    ids = (rng.zipf(1.2, size=(len(DOMAINS) * per, t)) - 1) % args.vocab_size
    texts = np.empty_like(ids)
    for d, domain in enumerate(DOMAINS):
        lengths = rng.geometric(1 / MEAN_DOC_TOKENS[domain], size=per * t)
        text_of_token = np.repeat(np.arange(lengths.size), lengths)[: per * t]
        texts[d * per : (d + 1) * per] = text_of_token.reshape(per, t)
    block_domains = np.repeat(np.arange(len(DOMAINS)), per)
    return make_probe(ids, block_domains, DOMAINS, "train_sample", texts)


def synthetic_routing(args: argparse.Namespace, probe: Probe, rng: np.random.Generator):
    """Per layer (8, 9, ...): experts [P, T, 1], half the tokens sent by their domain."""
    p, t = probe.input_ids.shape
    out = {}
    for layer in range(8, 8 + args.layers):
        chosen = rng.integers(0, args.experts, size=(p, t))
        by_domain = rng.random((p, t)) < 0.5
        chosen[by_domain] = np.broadcast_to(probe.block_domains[:, None], (p, t))[by_domain]
        out[layer] = chosen[..., None] % args.experts
    return out


def _kib(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1))


def measure(name: str, work: Callable[[], Any]) -> dict[str, Any]:
    """``work()``'s wall time and peak memory (MiB): ``traced``, the peak of what Python and
    numpy allocated during it (tracemalloc; torch's tensors are not traced); ``resident``, the
    process's high-water mark above its resident set before it (counts torch, but misses
    memory the allocator kept from an earlier stage and reused)."""
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark (Linux)
    before = _kib("VmRSS")
    tracemalloc.start()
    started = time.perf_counter()
    work()
    seconds = time.perf_counter() - started
    traced = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    resident = (_kib("VmHWM") - before) / 1024
    print(
        f"{name:>16}: {seconds:8.1f} s   peak {traced:8.1f} MiB traced, "
        f"+{resident:8.1f} MiB resident",
        flush=True,
    )
    return {
        "stage": name,
        "seconds": round(seconds, 2),
        "traced_mib": round(traced, 1),
        "resident_mib": round(resident, 1),
    }


def route(args: argparse.Namespace, probe: Probe) -> Callable[[], Any]:
    """The callback's routing of the probe through GPT-2 (124M by default) with MoE in the
    last ``--layers`` layers."""
    import torch

    from moe_emergence.analysis.probe import route_blocks
    from moe_emergence.model.gpt2_moe import build_gpt2, install_moe_layers

    torch.manual_seed(args.seed)
    model = build_gpt2(
        pretrained=None,
        vocab_size=args.vocab_size,
        n_positions=max(args.block_size, 1024),
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
    )
    layers = list(range(args.n_layer - args.layers, args.n_layer))
    install_moe_layers(model, layers, args.experts, top_k=1, seed=0)
    ids = torch.from_numpy(probe.input_ids)
    return lambda: route_blocks(model, ids, args.batch_size, progress="probe")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    probe = synthetic_probe(args, rng)
    experts = synthetic_routing(args, probe, rng)
    entropy = dict.fromkeys(experts, float("nan"))
    p, t = probe.input_ids.shape
    print(
        f"probe {p} blocks x {t} tokens, {probe.n_docs} documents; {args.layers} layers x "
        f"{args.experts} experts; {args.permutations} permutations a null",
        flush=True,
    )

    def score() -> Any:
        return score_probe_routing(
            probe, experts, entropy, args.experts, args.permutations, args.seed
        )

    stages = []
    if args.route:
        stages.append(measure("route", route(args, probe)))
    stages.append(measure("score", score))
    batched = heldout.CELLS_PER_BATCH
    heldout.CELLS_PER_BATCH = 2**62  # every [K, N] null as one array (the reference)
    try:
        stages.append(measure("score_one_array", score))
    finally:
        heldout.CELLS_PER_BATCH = batched
    stages.append(
        measure(
            "specialise",
            lambda: specialise_probe(
                probe, experts, None, args.experts, args.permutations, args.seed
            ),
        )
    )
    by_name = {s["stage"]: s for s in stages}
    ratio = by_name["score_one_array"]["traced_mib"] / max(by_name["score"]["traced_mib"], 1e-9)
    print(f"score's peak memory, one array / batched: {ratio:.1f}x")
    shape = {k: v for k, v in vars(args).items() if k != "route"}
    line = {
        "machine": machine_info(["numpy", "torch"]),
        "shape": {**shape, "blocks": p, "documents": probe.n_docs},
        "stages": stages,
        "score_peak_ratio_one_array_over_batched": round(ratio, 2),
    }
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
