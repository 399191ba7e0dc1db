"""``bench_prepare.py --warm-hit``: what every start of a training run pays on a cache hit (a
fresh ``MixedDomainDataModule``'s ``prepare_data()`` + ``setup("fit")``), before (full
SHA-256 verification) vs after (manifest + file sizes); ``--scale-mirror`` repeats it on a
copy of the mirror whose rows repeat up to the budget. See ``bench_prepare.py``'s docstring."""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from machine import machine_info

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


def _starter(
    args: argparse.Namespace, mirror: str, workdir: Path, cache_dir: Path
) -> Callable[[bool], tuple[float, Any]]:
    """``start(verify)``: a fresh datamodule's ``prepare_data`` + ``setup("fit")``, timed;
    returns its seconds and the datamodule."""
    from moe_emergence.data import MixedDomainDataModule

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

    return start


def _only_entry(cache_dir: Path) -> Path:
    """The one cache entry (folder with a manifest) in ``cache_dir``."""
    from moe_emergence.data.cache import MANIFEST

    entries = [p for p in cache_dir.iterdir() if (p / MANIFEST).is_file()]
    if len(entries) != 1:
        raise SystemExit(f"expected one cache entry in {cache_dir}, found {len(entries)}")
    return entries[0]


def _hashed_bytes(start: Callable[[bool], tuple[float, Any]]) -> dict[str, int]:
    """One untimed start per mode (warms both paths): the cache-file bytes each hashes."""
    from moe_emergence.data import cache as cache_module

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
    return hashed


def _domains(manifest: dict[str, Any], entry: Path, budget: int) -> dict[str, dict[str, Any]]:
    """Per domain: characters, whether short of the budget, tokens and cache bytes."""
    return {
        d: {
            "chars": e["metadata"].get("total_chars"),
            "short_of_budget": e["metadata"]["total_chars"] < budget,
            "tokens": e["num_tokens"],
            "cache_bytes": sum(f.stat().st_size for f in entry.glob(f"{d}.*.bin")),
        }
        for d, e in manifest["domains"].items()
    }


def time_warm_hit(args: argparse.Namespace, mirror: str, workdir: Path) -> dict[str, Any]:
    """Build the cache of ``mirror`` once, then time a fresh datamodule's ``prepare_data`` +
    ``setup`` per mode, ``--repeat`` times interleaved, after one untimed start of each (which
    also counts the cache-file bytes each mode hashes). The tokenizer is loaded once per
    process (as ``load_tokenizer`` does), so the figures exclude it for both modes alike."""
    from moe_emergence.data.cache import MANIFEST

    cache_dir = workdir / f"cache-{Path(mirror).name}"
    start = _starter(args, mirror, workdir, cache_dir)
    cold_s, dm = start(False)
    entry = _only_entry(cache_dir)
    manifest = json.loads((entry / MANIFEST).read_text())
    built = (entry / MANIFEST).stat().st_mtime_ns
    hashed = _hashed_bytes(start)
    runs: dict[str, list[float]] = {mode: [] for mode in WARM_HIT_MODES}
    for _ in range(args.repeat):
        for mode in WARM_HIT_MODES:
            runs[mode].append(start(mode == "before")[0])
    if (entry / MANIFEST).stat().st_mtime_ns != built:
        raise SystemExit("a timed start rebuilt the cache: the figures are not hits")
    median = {mode: statistics.median(r) for mode, r in runs.items()}
    budget = manifest["domains"]["code"]["metadata"]["budget_chars"]
    return {
        "mirror": mirror,
        "budget_chars": budget,
        "domains": _domains(manifest, entry, budget),
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
