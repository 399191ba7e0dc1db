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
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from machine import machine_info

MEASURED_STAGES = ("reference", "limit", "cold", "warm")
HELPER_STAGES = ("texts", "check")
WARM_EXTRA_BLOCK_SIZE = 128
LIMIT_BATCH_TEXTS = 512
TEXTS_FILE = "texts.pkl"
CACHE_DIR = "cache"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

Texts = dict[str, list[str]]


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


# --------------------------------------------------------------------------- stage helpers


def _peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _block_sizes(args: argparse.Namespace) -> list[int]:
    return sorted({args.block_size, WARM_EXTRA_BLOCK_SIZE})


def _load_tokenizer(args: argparse.Namespace):
    from moe_emergence.data.tokenize import load_tokenizer

    return load_tokenizer(args.tokenizer, args.hub_mirror)


def _load_texts(workdir: Path) -> Texts:
    import pickle

    with (workdir / TEXTS_FILE).open("rb") as f:
        return pickle.load(f)


def cycle_to_budget(texts: list[str], budget: int) -> list[str]:
    """``texts`` repeated from the start, taking a text while the running total of characters
    is below ``budget`` (the one crossing it is kept): ``load_domain``'s own rule, so a list
    that already met the budget comes back unchanged."""
    if not any(texts):
        raise ValueError("cannot cycle a list holding no characters")
    out: list[str] = []
    total = 0
    while total < budget:
        for text in texts:
            if total >= budget:
                break
            out.append(text)
            total += len(text)
    return out


def _cache_inputs(args: argparse.Namespace, tokenizer, texts: Texts) -> dict[str, Any]:
    """The cache key of this benchmark's texts, built by the package's own ``cache_inputs``
    (the schema every cache hit checks: one ``sources`` entry per domain): the budget, the
    tokenizer's definition and, per domain, the cycled texts' count and characters."""
    from moe_emergence.data.cache import tokenizer_identity
    from moe_emergence.data.prepare import cache_inputs
    from moe_emergence.data.settings import DataSettings

    settings = DataSettings(
        size_mb=args.size_mb, tokenizer=args.tokenizer, hub_mirror=args.hub_mirror
    )
    sources = {
        domain: [
            {
                "benchmark": {
                    "cycled": True,
                    "num_texts": len(domain_texts),
                    "chars": sum(map(len, domain_texts)),
                }
            }
        ]
        for domain, domain_texts in texts.items()
    }
    return cache_inputs(settings, sources, tokenizer_identity(tokenizer, args.tokenizer))


def _reference_files(workdir: Path, domain: str) -> tuple[Path, Path]:
    return workdir / f"reference-{domain}.ids.int64", workdir / f"reference-{domain}.blocks.int64"


def _save_reference(workdir: Path, domain: str, blocks: list, ids: list[int]) -> None:
    """Write the reference's id list and blocks as raw int64, a slice at a time (little RAM)."""
    import numpy as np

    ids_path, blocks_path = _reference_files(workdir, domain)
    chunk = 1 << 20
    with ids_path.open("wb") as f:
        for start in range(0, len(ids), chunk):
            np.array(ids[start : start + chunk], dtype=np.int64).tofile(f)
    with blocks_path.open("wb") as f:
        for block in blocks:
            block.numpy().tofile(f)


# --------------------------------------------------------------------------- stages


def stage_texts(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Read every domain from the mirror, cycle it up to the budget, pickle the texts."""
    import pickle

    from moe_emergence.data.domains import domain_set
    from moe_emergence.data.sources import MAX_EXAMPLE_CHARS, budget_chars, load_domain

    budget = budget_chars(args.size_mb)
    texts: Texts = {}
    summary: dict[str, Any] = {}
    for domain, sources in domain_set("code_math_prose").items():
        loaded, meta = load_domain(
            domain, sources, args.size_mb, MAX_EXAMPLE_CHARS, args.hub_mirror, show_progress=False
        )
        if not loaded:
            raise SystemExit(f"The mirror '{args.hub_mirror}' gave no {domain} text.")
        texts[domain] = cycle_to_budget(loaded, budget)
        summary[domain] = {
            "mirror_texts": len(loaded),
            "mirror_chars": meta["total_chars"],
            "num_texts": len(texts[domain]),
            "total_chars": sum(map(len, texts[domain])),
        }
    with (workdir / TEXTS_FILE).open("wb") as f:
        pickle.dump(texts, f, protocol=pickle.HIGHEST_PROTOCOL)
    return {"budget_chars": budget, "domains": summary}


def stage_reference(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """``reference_pack`` per domain; the blocks of every domain stay held, as a dataset would."""
    from reference_pipeline import reference_pack

    tokenizer, texts = _load_tokenizer(args), _load_texts(workdir)
    before = _peak_rss_mb()
    seconds: dict[str, float] = {}
    tokens: dict[str, int] = {}
    num_blocks: dict[str, int] = {}
    held = {}
    peak = before
    for domain, domain_texts in texts.items():
        start = time.perf_counter()
        blocks, total, ids = reference_pack(domain_texts, tokenizer, args.block_size)
        seconds[domain] = time.perf_counter() - start
        peak = max(peak, _peak_rss_mb())  # read before the (untimed) save below
        tokens[domain], num_blocks[domain] = total, len(blocks)
        _save_reference(workdir, domain, blocks, ids)
        held[domain] = blocks
        del ids
    return _result(tokens, seconds, peak, before, blocks=num_blocks)


def stage_limit(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The Rust tokenizer alone, batched over all cores: the tokenization ceiling."""
    from moe_emergence.data.tokenize import untruncated

    tokenizer, texts = _load_tokenizer(args), _load_texts(workdir)
    guard = untruncated(tokenizer)  # truncation off while this stage runs
    backend = guard.__enter__()
    before = _peak_rss_mb()
    seconds: dict[str, float] = {}
    tokens: dict[str, int] = {}
    for domain, domain_texts in texts.items():
        start = time.perf_counter()
        count = 0
        for i in range(0, len(domain_texts), LIMIT_BATCH_TEXTS):
            batch = domain_texts[i : i + LIMIT_BATCH_TEXTS]
            encodings = backend.encode_batch_fast(batch, add_special_tokens=False)
            count += sum(len(e.ids) for e in encodings) + len(batch)  # + EOS per text
        seconds[domain] = time.perf_counter() - start
        tokens[domain] = count
    guard.__exit__(None, None, None)
    return _result(tokens, seconds, _peak_rss_mb(), before)


def _domain_inputs(texts: Texts) -> Callable[[], Iterator[Any]]:
    from moe_emergence.data.cache import DomainInput

    def make_domains() -> Iterator[DomainInput]:
        for domain, domain_texts in texts.items():
            meta = {
                "domain": domain,
                "num_texts": len(domain_texts),
                "total_chars": sum(map(len, domain_texts)),
            }
            yield DomainInput(domain, domain_texts, meta)

    return make_domains


def stage_cold(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The package's cold prepare: ``ensure_cache(rebuild=True)`` on the benchmark's texts."""
    from moe_emergence.data.cache import ensure_cache

    tokenizer, texts = _load_tokenizer(args), _load_texts(workdir)
    inputs = _cache_inputs(args, tokenizer, texts)
    make_domains = _domain_inputs(texts)
    before = _peak_rss_mb()
    start = time.perf_counter()
    cache = ensure_cache(workdir / CACHE_DIR, inputs, make_domains, tokenizer, rebuild=True)
    elapsed = time.perf_counter() - start
    peak = _peak_rss_mb()
    if not cache.built_now:
        raise SystemExit("cold stage: ensure_cache(rebuild=True) did not build the cache")
    tokens = {d: int(e["num_tokens"]) for d, e in cache.manifest["domains"].items()}
    result = _result(tokens, {"all": elapsed}, peak, before)
    result["cache_path"] = str(cache.path)
    return result


def stage_warm(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Open the cache built by ``cold`` and build the balanced dataset, per block size."""
    from moe_emergence.data.cache import ensure_cache
    from moe_emergence.data.dataset import PackedMixedDomainDataset

    def no_build() -> Iterator[Any]:
        raise SystemExit(
            "warm stage: the cold stage's cache is missing or was rejected (see the warning "
            "above); _cache_inputs must give what cache.check_manifest accepts"
        )

    start = time.perf_counter()
    tokenizer = _load_tokenizer(args)
    tokenizer_load_s = time.perf_counter() - start
    texts = _load_texts(workdir)
    start = time.perf_counter()
    inputs = _cache_inputs(args, tokenizer, texts)
    inputs_s = time.perf_counter() - start
    before = _peak_rss_mb()
    per_block_size: dict[str, dict[str, Any]] = {}
    for block_size in _block_sizes(args):
        start = time.perf_counter()
        cache = ensure_cache(workdir / CACHE_DIR, inputs, no_build, tokenizer)
        streams = cache.streams()
        dataset = PackedMixedDomainDataset.from_token_streams(
            streams, block_size, balance_tokens=True, seed=args.seed
        )
        elapsed = time.perf_counter() - start
        assert not cache.built_now, "warm stage rebuilt the cache"
        per_block_size[str(block_size)] = {
            "seconds": elapsed,
            "items": len(dataset),
            "block_counts": dataset.block_counts,
        }
    return {
        "per_block_size": per_block_size,
        "warm_setup_s": max(r["seconds"] for r in per_block_size.values()),
        "untimed_tokenizer_load_s": tokenizer_load_s,
        "untimed_cache_inputs_s": inputs_s,
        "peak_rss_mb": _peak_rss_mb(),
        "pre_work_rss_mb": before,
    }


def stage_check(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Compare the reference's ids and blocks with the cache's streams, per domain."""
    import numpy as np

    from moe_emergence.data.cache import TokenCache, verify

    cache_path = Path(json.loads((workdir / "cold.json").read_text())["cache_path"])
    streams = TokenCache(cache_path, verify(cache_path), built_now=False).streams()
    problems: list[str] = []
    for domain, stream in streams.items():
        ids_path, blocks_path = _reference_files(workdir, domain)
        ids = np.fromfile(ids_path, dtype=np.int64)
        if ids.shape != stream.tokens.shape or not np.array_equal(ids, stream.tokens):
            where = _first_difference(ids, np.asarray(stream.tokens, dtype=np.int64))
            problems.append(
                f"{domain}: token streams differ (reference {len(ids):,} tokens, cache "
                f"{stream.num_tokens:,}; first difference at index {where})"
            )
        n = stream.num_tokens // args.block_size
        expected = stream.tokens[: n * args.block_size].reshape(n, args.block_size)
        blocks = np.fromfile(blocks_path, dtype=np.int64)
        if blocks.size != expected.size or not np.array_equal(
            blocks.reshape(-1, args.block_size), expected
        ):
            problems.append(
                f"{domain}: blocks differ (reference {blocks.size // args.block_size:,} blocks, "
                f"cache view {n:,} blocks of {args.block_size})"
            )
    return {"problems": problems, "domains": list(streams)}


def _first_difference(a: Any, b: Any) -> int:
    import numpy as np

    common = min(len(a), len(b))
    diff = np.flatnonzero(a[:common] != b[:common])
    return int(diff[0]) if diff.size else common


def _result(
    tokens: dict[str, int],
    seconds: dict[str, float],
    peak: float,
    before: float,
    **extra: Any,
) -> dict[str, Any]:
    total_tokens, total_s = sum(tokens.values()), sum(seconds.values())
    return {
        "tokens": tokens,
        "total_tokens": total_tokens,
        "seconds_by_domain": seconds,
        "seconds": total_s,
        "tokens_per_s": total_tokens / total_s if total_s > 0 else float("inf"),
        "peak_rss_mb": peak,
        "pre_work_rss_mb": before,
        **extra,
    }


STAGES: dict[str, Callable[[argparse.Namespace, Path], dict[str, Any]]] = {
    "texts": stage_texts,
    "reference": stage_reference,
    "limit": stage_limit,
    "cold": stage_cold,
    "warm": stage_warm,
    "check": stage_check,
}


def run_stage(args: argparse.Namespace) -> int:
    """In a child process: run one stage and print its result as one JSON line."""
    result = STAGES[args.stage](args, args.workdir)
    print(json.dumps(result))
    return 0


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


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run_identity_cost(args: argparse.Namespace) -> int:
    """Warm ``prepare_domains`` on a fresh copy of the mirror: the first run hashes every data
    file (the per-file index knows none of the copy's files), later runs hash none. Each
    figure is the median of ``--repeat`` runs; the tokenizer is loaded before timing."""
    import statistics

    from moe_emergence import files as files_module
    from moe_emergence.data.domains import domain_set
    from moe_emergence.data.prepare import describe_request, prepare_domains
    from moe_emergence.data.settings import DataSettings
    from moe_emergence.data.tokenize import load_tokenizer

    workdir = Path(tempfile.mkdtemp(prefix="bench_identity-"))
    hashed: list[int] = []
    real_sha = files_module.sha256_file

    def counting_sha(path: Path) -> str:
        hashed.append(path.stat().st_size)
        return real_sha(path)

    files_module.sha256_file = counting_sha
    try:
        base = shutil.copytree(args.hub_mirror, workdir / "hub-0", symlinks=True)
        settings = DataSettings(
            size_mb=args.size_mb,
            block_size=args.block_size,
            tokenizer=args.tokenizer,
            hub_mirror=str(base),
            cache_dir=str(workdir / CACHE_DIR),
        )
        load_tokenizer(args.tokenizer)
        cold_s, _ = _timed(lambda: prepare_domains(settings, show_progress=False))
        first, later, first_identity, later_identity = [], [], [], []
        files_first, files_later = [], []
        for i in range(args.repeat):
            copy = shutil.copytree(args.hub_mirror, workdir / f"hub-{i + 1}", symlinks=True)
            moved = DataSettings(**{**settings.to_dict(), "hub_mirror": str(copy)})
            hashed.clear()
            seconds, prepared = _timed(lambda s=moved: prepare_domains(s, show_progress=False))
            assert prepared.from_cache, "a fresh copy of the mirror must hit"
            first.append(seconds)
            first_bytes = sum(hashed)
            hashed.clear()
            later.append(_timed(lambda s=moved: prepare_domains(s, show_progress=False))[0])
            assert not hashed, "an unchanged mirror must not be hashed again"
            later_identity.append(_timed(lambda s=moved: describe_request(s))[0])
            (workdir / CACHE_DIR / "file-index.json").unlink(missing_ok=True)
            first_identity.append(_timed(lambda s=moved: describe_request(s))[0])
            fresh = files_module.FileIndex(None)
            folders = [
                copy / src.dataset
                for srcs in domain_set("code_math_prose").values()
                for src in srcs
            ]

            def identities(index=fresh, folders=folders) -> list:
                return [files_module.folder_identity(f, index) for f in folders]

            files_first.append(_timed(identities)[0])
            files_later.append(_timed(identities)[0])
        summary = {
            "mirror_bytes_hashed": first_bytes,
            "cold_prepare_s": round(cold_s, 3),
            "warm_prepare_first_run_after_copy_s": round(statistics.median(first), 4),
            "warm_prepare_later_runs_s": round(statistics.median(later), 4),
            "request_identity_first_run_s": round(statistics.median(first_identity), 4),
            "request_identity_later_runs_s": round(statistics.median(later_identity), 4),
            "data_files_identity_first_run_s": round(statistics.median(files_first), 4),
            "data_files_identity_later_runs_s": round(statistics.median(files_later), 5),
        }
    finally:
        files_module.sha256_file = real_sha
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(summary))
    return 0


# --------------------------------------------------------------------------- warm hit

WARM_HIT_MODES = {
    "before": "verify_cache=true: every file's SHA-256 (what every hit did before)",
    "after": "default: manifest + file sizes",
}


def scale_mirror(source: Path, target: Path, factor: int) -> Path:
    """A copy of mirror ``source`` whose data files hold their rows ``factor`` times (parquet
    tables concatenated, gzipped JSON lines repeated): the same sources, ``factor`` times the
    characters. For timing only (the texts repeat)."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.copytree(source, target)
    for path in target.rglob("*.parquet"):
        table = pq.read_table(path)
        pq.write_table(pa.concat_tables([table] * factor), path)
    for path in target.rglob("*.json.gz"):
        data = gzip.decompress(path.read_bytes())
        if not data.endswith(b"\n"):
            data += b"\n"
        path.write_bytes(gzip.compress(data * factor, compresslevel=1))
    return target


def time_warm_hit(args: argparse.Namespace, mirror: str, workdir: Path) -> dict[str, Any]:
    """Build the cache of ``mirror`` once, then time a fresh datamodule's ``prepare_data`` +
    ``setup`` per mode, ``--repeat`` times interleaved, after one untimed start of each (which
    also counts the cache-file bytes each mode hashes). The tokenizer is loaded once per
    process (as ``load_tokenizer`` does), so the figures exclude it for both modes alike."""
    import statistics

    from moe_emergence.data import MixedDomainDataModule
    from moe_emergence.data import cache as cache_module
    from moe_emergence.data.cache import MANIFEST

    cache_dir = workdir / f"cache-{Path(mirror).name}"

    def start(verify: bool) -> tuple[float, Any]:
        dm = MixedDomainDataModule(
            size_mb=args.size_mb,
            block_size=args.block_size,
            seed=args.seed,
            tokenizer=args.tokenizer,
            hub_mirror=mirror,
            cache_dir=str(cache_dir),
            verify_cache=verify,
            report_dir=str(workdir),
            show_progress=False,
        )
        begin = time.perf_counter()
        dm.prepare_data()
        dm.setup("fit")
        return time.perf_counter() - begin, dm

    cold_s, dm = start(False)
    entries = [p for p in cache_dir.iterdir() if (p / MANIFEST).is_file()]
    if len(entries) != 1:
        raise SystemExit(f"expected one cache entry in {cache_dir}, found {len(entries)}")
    entry = entries[0]
    manifest = json.loads((entry / MANIFEST).read_text())
    built = (entry / MANIFEST).stat().st_mtime_ns

    hashed: dict[str, int] = {}
    real_sha = cache_module.sha256_file
    for mode in WARM_HIT_MODES:  # untimed: warm both paths, count what each hashes
        sizes: list[int] = []
        cache_module.sha256_file = lambda path, sizes=sizes: (
            sizes.append(path.stat().st_size) or real_sha(path)
        )
        try:
            start(mode == "before")
        finally:
            cache_module.sha256_file = real_sha
        hashed[mode] = sum(sizes)
    runs: dict[str, list[float]] = {mode: [] for mode in WARM_HIT_MODES}
    for _ in range(args.repeat):
        for mode in WARM_HIT_MODES:
            runs[mode].append(start(mode == "before")[0])
    if (entry / MANIFEST).stat().st_mtime_ns != built:
        raise SystemExit("a timed start rebuilt the cache: the figures are not hits")
    median = {mode: statistics.median(r) for mode, r in runs.items()}
    budget = manifest["domains"]["code"]["metadata"]["budget_chars"]
    domains = {
        d: {
            "chars": e["metadata"].get("total_chars"),
            "short_of_budget": e["metadata"]["total_chars"] < budget,
            "tokens": e["num_tokens"],
            "cache_bytes": sum(f.stat().st_size for f in entry.glob(f"{d}.*.bin")),
        }
        for d, e in manifest["domains"].items()
    }
    return {
        "mirror": mirror,
        "budget_chars": budget,
        "domains": domains,
        "train_blocks": len(dm.train_dataset),
        "cold_prepare_setup_s": round(cold_s, 3),
        "before_s": round(median["before"], 4),
        "after_s": round(median["after"], 4),
        "before_over_after": round(median["before"] / median["after"], 2),
        "runs_s": {mode: [round(t, 4) for t in r] for mode, r in runs.items()},
        "cache_bytes_hashed_per_start": hashed,
    }


def format_warm_hit(results: dict[str, dict[str, Any]], s: dict[str, Any]) -> str:
    mib = 1024 * 1024
    lines = [
        f"warm set-up (cache hit: a fresh datamodule's prepare_data + setup, as each start of a "
        f"run): {s['size_mb']:g} MiB of characters per domain asked, block_size "
        f"{s['block_size']}, tokenizer {s['tokenizer']}, median of {s['repeat']}",
    ]
    for name, r in results.items():
        short = [d for d, i in r["domains"].items() if i["short_of_budget"]]
        held = ", ".join(f"{d} {r['domains'][d]['chars'] / mib:.2f} MiB" for d in short)
        lines += [
            "",
            f"{name}: {r['mirror']}"
            + (f" (holds less than the budget: {held}; all of it is used)" if short else ""),
            f"{'domain':<8}{'chars':>14}{'tokens':>13}{'cache bytes':>14}",
        ]
        for domain, info in r["domains"].items():
            lines.append(
                f"{domain:<8}{info['chars']:>14,}{info['tokens']:>13,}{info['cache_bytes']:>14,}"
            )
        for mode, what in WARM_HIT_MODES.items():
            runs = ", ".join(f"{t:.3f}" for t in r["runs_s"][mode])
            lines.append(
                f"{mode:<7} {r[f'{mode}_s']:>8.3f} s   hashes "
                f"{r['cache_bytes_hashed_per_start'][mode]:>11,} B   ({what}; runs {runs})"
            )
        lines.append(
            f"ratio   {r['before_over_after']:>8.2f}x  (before / after; cold build + set-up "
            f"{r['cold_prepare_setup_s']:.2f} s)"
        )
    m = s["machine"]
    lines.append(
        f"\nmachine: {m['nproc']} cores, {m['cpu']}, Python {m['python']}, "
        f"tokenizers {m['tokenizers']}, lightning {m['lightning']}, torch {m['torch']}"
    )
    return "\n".join(lines)


def run_warm_hit(args: argparse.Namespace) -> int:
    """Time cache hits before (full verification) vs after (manifest + sizes): see the module
    docstring. Runs in this process (no peak-RSS figures here)."""
    import logging
    import math

    from moe_emergence.data.sources import budget_chars

    logging.getLogger("moe_emergence").setLevel(logging.ERROR)  # no per-start report tables
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="bench_warm_hit-"))
    results: dict[str, dict[str, Any]] = {}
    try:
        results["mirror"] = time_warm_hit(args, args.hub_mirror, workdir)
        domains = results["mirror"]["domains"].values()
        held = [i["chars"] for i in domains if i["short_of_budget"]]
        if args.scale_mirror and held:
            factor = math.ceil(budget_chars(args.size_mb) / min(held))
            scaled = scale_mirror(Path(args.hub_mirror), workdir / f"hub-x{factor}", factor)
            results[f"scaled x{factor}"] = time_warm_hit(args, str(scaled), workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary = {
        "benchmark": "warm_hit",
        "size_mb": args.size_mb,
        "block_size": args.block_size,
        "tokenizer": args.tokenizer,
        "repeat": args.repeat,
        "results": results,
        "machine": machine_info(("tokenizers", "transformers", "torch", "numpy", "lightning")),
    }
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    if not args.json_only:
        print(format_warm_hit(results, summary))
        print(f"wall time: {summary['wall_s']:.1f} s\n")
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
