"""The stages of ``bench_prepare.py``: each runs in a fresh interpreter
(``bench_prepare.py --stage NAME --workdir DIR``) and prints its result as one JSON line.

``texts`` pickles the cycled texts every other stage loads; ``reference``, ``limit``, ``cold``
and ``warm`` are the measured stages (see ``bench_prepare.py``'s docstring); ``check``
compares the reference's files with the cold stage's cache. Each stage loads the tokenizer
and the texts before its timer starts. Nothing heavy is imported at module level (the parent
imports this module; see ``bench_prepare.py``).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

MEASURED_STAGES = ("reference", "limit", "cold", "warm")
HELPER_STAGES = ("texts", "check")
WARM_EXTRA_BLOCK_SIZE = 128
LIMIT_BATCH_TEXTS = 512
TEXTS_FILE = "texts.pkl"
CACHE_DIR = "cache"

Texts = dict[str, list[str]]


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
