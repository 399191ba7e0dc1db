"""Benchmark the data pipeline's cold prepare against a naive baseline and the tokenizer's ceiling.

Every domain's texts come from a local Hub mirror (``load_domain``), cycled from the start when
the mirror holds less than ``--size-mb`` MiB of characters, so that each domain reaches the same
budget. On exactly those texts it measures, each stage in its own fresh subprocess (so that the
peak RSS, ``ru_maxrss``, belongs to that stage alone):

- ``reference``: ``benchmarks/reference_pipeline.py``, the spec written the straightforward way
  (one ``tokenizer.encode`` per text, Python lists, one LongTensor per block);
- ``limit``: the Rust tokenizer alone (``encode_batch_fast`` over batches of 512 texts, all
  cores), the ceiling of any tokenization stage on this machine;
- ``cold``: the package's cold prepare, ``ensure_cache(..., rebuild=True)`` (tokenize, write the
  uint16 streams with checksums and the manifest);
- ``warm``: with that cache present, ``ensure_cache`` (which finds it and checks its manifest
  and file sizes) + ``.streams()`` + ``PackedMixedDomainDataset.from_token_streams``
  (balanced), for ``--block-size`` and 128; the slower of the two is ``warm_setup_s``.

Each stage loads the tokenizer and the texts before its timer starts and times only the work.
Then a check (also a subprocess) asserts that the reference and the cache hold identical token
streams and identical blocks per domain; the script exits non-zero if not. It prints a table and
ends with one JSON line (the last line of stdout; ``--json-only`` prints only that line).

Run it from the repository root (a few minutes on 2 cores)::

    python benchmarks/bench_prepare.py --hub-mirror ../shared/hub --size-mb 5

``--warm-hit`` instead times what every start of a training run pays on a cache hit: a fresh
``MixedDomainDataModule``'s ``prepare_data()`` + ``setup("fit")`` on the mirror as it is (a
domain the mirror holds less of than ``--size-mb`` uses all it holds; the output says so),
before vs after cheap hits, in one run: ``before`` is ``verify_cache=True`` (every file's
SHA-256, in prepare_data and again in setup: what every hit did before), ``after`` the default
hit (manifest and file sizes). ``--scale-mirror`` repeats it on a copy of the mirror whose data
files repeat their rows until every domain fills the budget (timing only: the texts repeat)::

    python benchmarks/bench_prepare.py --hub-mirror ../shared/hub --size-mb 10 \
        --warm-hit --scale-mirror --repeat 7

It never uses the network (it sets HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1), works in a
temporary folder it deletes at the end, and is not part of the test run.

The parent process imports nothing heavy: on Linux a child's ``ru_maxrss`` starts from its
parent's peak at spawn time, so a parent that had loaded the datasets would inflate every
stage's figure. Loading the texts is therefore a subprocess of its own too.

This script parses the flags, spawns the stages and reports; the stages themselves are in
``prepare_stages.py``, ``--warm-hit`` in ``prepare_warm_hit.py`` and ``--identity-cost`` in
``prepare_identity.py`` (all beside it, imported as it runs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from machine import machine_info
from prepare_identity import run_identity_cost
from prepare_stages import (
    HELPER_STAGES,
    MEASURED_STAGES,
    _cache_inputs,
    _domain_inputs,
    cycle_to_budget,
    run_stage,
)
from prepare_warm_hit import run_warm_hit

# what tests/test_bench_prepare.py uses of this script
__all__ = ["_cache_inputs", "_domain_inputs", "cycle_to_budget", "main", "parse_args"]

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


# --------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time the cold/warm prepare against a naive baseline and the tokenizer alone."
    )
    parser.add_argument("--hub-mirror", required=True, metavar="DIR", help="local Hub mirror root")
    parser.add_argument("--size-mb", type=float, default=5.0, help="MiB of characters per domain")
    parser.add_argument("--tokenizer", default=None, help="tokenizer (default: <mirror>/gpt2)")
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per timed stage; the median is kept"
    )
    parser.add_argument("--json-only", action="store_true", help="print only the JSON line")
    parser.add_argument(
        "--identity-cost",
        action="store_true",
        help="instead: time the token cache's content identity of a fresh mirror copy",
    )
    parser.add_argument(
        "--warm-hit",
        action="store_true",
        help="instead: time a cache hit (datamodule prepare_data + setup), full SHA-256 "
        "verification vs the default size check",
    )
    parser.add_argument(
        "--scale-mirror",
        action="store_true",
        help="with --warm-hit: also on a mirror copy whose rows repeat up to --size-mb",
    )
    parser.add_argument("--stage", choices=MEASURED_STAGES + HELPER_STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tokenizer is None:
        args.tokenizer = str(Path(args.hub_mirror) / "gpt2")
    if args.block_size < 2:
        parser.error("--block-size must be at least 2")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def _forwarded(args: argparse.Namespace) -> list[str]:
    return [
        "--hub-mirror",
        args.hub_mirror,
        "--size-mb",
        repr(args.size_mb),
        "--tokenizer",
        args.tokenizer,
        "--block-size",
        str(args.block_size),
        "--seed",
        str(args.seed),
    ]


# --------------------------------------------------------------------------- parent


def spawn_stage(args: argparse.Namespace, name: str, workdir: Path) -> dict[str, Any]:
    """Run ``name`` in a fresh interpreter; return the JSON line it printed last."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        *_forwarded(args),
        "--stage",
        name,
        "--workdir",
        str(workdir),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"Stage '{name}' failed (exit code {proc.returncode}); see above.")
    result = json.loads(lines[-1])
    (workdir / f"{name}.json").write_text(json.dumps(result))
    return result


def check_tokens_agree(results: dict[str, dict[str, Any]]) -> list[str]:
    """Every measured stage must count the same tokens per domain."""
    reference = results["reference"]["tokens"]
    return [
        f"{stage} counts {results[stage]['tokens']} tokens, reference {reference}"
        for stage in ("limit", "cold")
        if results[stage]["tokens"] != reference
    ]


def summarize(
    args: argparse.Namespace, texts: dict[str, Any], results: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    ref, limit, cold, warm = (results[s] for s in MEASURED_STAGES)
    return {
        "size_mb": args.size_mb,
        "block_size": args.block_size,
        "tokenizer": args.tokenizer,
        "tokens_per_domain": cold["tokens"],
        "total_tokens": cold["total_tokens"],
        "texts_per_domain": {d: s["num_texts"] for d, s in texts["domains"].items()},
        "reference_tokens_per_s": round(ref["tokens_per_s"]),
        "limit_tokens_per_s": round(limit["tokens_per_s"]),
        "cold_tokens_per_s": round(cold["tokens_per_s"]),
        "cold_vs_limit": round(cold["tokens_per_s"] / limit["tokens_per_s"], 3),
        "cold_vs_reference": round(cold["tokens_per_s"] / ref["tokens_per_s"], 3),
        "reference_s": round(ref["seconds"], 3),
        "limit_s": round(limit["seconds"], 3),
        "cold_s": round(cold["seconds"], 3),
        "warm_setup_s": round(warm["warm_setup_s"], 4),
        "warm_setup_s_by_block_size": {
            b: round(r["seconds"], 4) for b, r in warm["per_block_size"].items()
        },
        "reference_peak_rss_mb": round(ref["peak_rss_mb"], 1),
        "limit_peak_rss_mb": round(limit["peak_rss_mb"], 1),
        "cold_peak_rss_mb": round(cold["peak_rss_mb"], 1),
        "warm_peak_rss_mb": round(warm["peak_rss_mb"], 1),
        "machine": machine_info(("tokenizers", "transformers", "torch", "numpy")),
    }


def format_table(texts: dict[str, Any], results: dict[str, dict[str, Any]], s: dict) -> str:
    mib = 1024 * 1024
    lines = [
        f"prepare benchmark: {s['size_mb']:g} MiB of characters per domain, "
        f"block_size {s['block_size']}, tokenizer {s['tokenizer']}",
        "",
        f"{'domain':<8}{'texts':>9}{'from mirror':>22}{'chars':>13}{'tokens':>13}",
    ]
    for domain, info in texts["domains"].items():
        cycled = " (cycled)" if info["num_texts"] > info["mirror_texts"] else ""
        mirror = f"{info['mirror_chars'] / mib:.2f} MiB{cycled}"
        lines.append(
            f"{domain:<8}{info['num_texts']:>9,}{mirror:>22}{info['total_chars']:>13,}"
            f"{s['tokens_per_domain'][domain]:>13,}"
        )
    header = (
        f"{'stage':<11}{'tokens':>12}{'seconds':>10}{'tokens/s (M)':>14}"
        f"{'peak RSS (MB)':>15}{'pre-work (MB)':>15}"
    )
    lines += ["", header, "-" * len(header)]
    for stage in ("reference", "limit", "cold"):
        r = results[stage]
        lines.append(
            f"{stage:<11}{r['total_tokens']:>12,}{r['seconds']:>10.2f}"
            f"{r['tokens_per_s'] / 1e6:>14.2f}"
            f"{r['peak_rss_mb']:>15.0f}{r['pre_work_rss_mb']:>15.0f}"
        )
    warm = results["warm"]
    by_size = ", ".join(f"block {b}: {t:.3f} s" for b, t in s["warm_setup_s_by_block_size"].items())
    lines += [
        f"{'warm':<11}{'':>12}{warm['warm_setup_s']:>10.3f}{'':>14}"
        f"{warm['peak_rss_mb']:>15.0f}{warm['pre_work_rss_mb']:>15.0f}",
        "",
        f"cold / limit:     {s['cold_vs_limit']:.2f}",
        f"cold / reference: {s['cold_vs_reference']:.2f}",
        f"warm set-up:      {s['warm_setup_s']:.3f} s ({by_size}; excludes loading the "
        f"tokenizer {warm['untimed_tokenizer_load_s']:.2f} s and hashing its identity "
        f"{warm['untimed_cache_inputs_s']:.2f} s)",
        "check:            reference and cache hold identical token streams and blocks",
    ]
    m = s["machine"]
    lines.append(
        f"machine:          {m['nproc']} cores, {m['cpu']}, Python {m['python']}, "
        f"tokenizers {m['tokenizers']}, transformers {m['transformers']}, torch {m['torch']}"
    )
    return "\n".join(lines)


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, dict[str, Any]]:
    """Run the timed stages ``--repeat`` times, interleaved so that machine noise hits them
    alike; keep each stage's median run (by seconds) and record every run's seconds."""
    timed = [s for s in MEASURED_STAGES if s != "warm"]
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in timed}
    for _ in range(args.repeat):
        for stage in timed:
            runs[stage].append(spawn_stage(args, stage, workdir))
    results = {}
    for stage, stage_runs in runs.items():
        ordered = sorted(stage_runs, key=lambda r: r["seconds"])
        median = ordered[len(ordered) // 2]
        median["runs_s"] = [round(r["seconds"], 3) for r in stage_runs]
        median["peak_rss_mb"] = max(r["peak_rss_mb"] for r in stage_runs)
        results[stage] = median
    results["warm"] = spawn_stage(args, "warm", workdir)  # needs the cold stage's cache
    return results


def run_benchmark(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="bench_prepare-"))
    try:
        texts = spawn_stage(args, "texts", workdir)
        results = measure(args, workdir)
        problems = check_tokens_agree(results) + spawn_stage(args, "check", workdir)["problems"]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if problems:
        raise SystemExit("Correctness check FAILED:\n  " + "\n  ".join(problems))
    summary = summarize(args, texts, results)
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    if not args.json_only:
        print(format_table(texts, results, summary))
        print(f"wall time:        {summary['wall_s']:.1f} s\n")
    print(json.dumps(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.update(OFFLINE_ENV)  # inherited by every stage: the mirror is all we read
    args = parse_args(argv)
    if args.stage is not None:
        return run_stage(args)
    if args.identity_cost:
        return run_identity_cost(args)
    if args.warm_hit:
        return run_warm_hit(args)
    return run_benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
