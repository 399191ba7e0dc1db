"""Smoke test of ``benchmarks/bench_prepare.py`` on the fixture mirror and tokenizer: the
README's command (at a tiny budget, one run per stage) exits 0 with its checks passed and ends
with one JSON line; and the token cache the benchmark builds is one a later open hits (issue
#18: its cache key lacked the ``sources`` schema, so the warm stage found the cold stage's cache
"damaged" and stopped).

No timing is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from helpers.script import load_script

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
SIZE_MB = 0.02  # ~21,000 characters per domain: more than the fixture holds, so it cycles
BLOCK_SIZE = 64
CHECK_LINE = "check:            reference and cache hold identical token streams and blocks"
SUMMARY_KEYS = {
    "size_mb",
    "block_size",
    "tokenizer",
    "tokens_per_domain",
    "total_tokens",
    "texts_per_domain",
    "reference_tokens_per_s",
    "limit_tokens_per_s",
    "cold_tokens_per_s",
    "cold_vs_limit",
    "cold_vs_reference",
    "reference_s",
    "limit_s",
    "cold_s",
    "warm_setup_s",
    "warm_setup_s_by_block_size",
    "reference_peak_rss_mb",
    "limit_peak_rss_mb",
    "cold_peak_rss_mb",
    "warm_peak_rss_mb",
    "machine",
    "wall_s",
}


@pytest.fixture
def bench(monkeypatch) -> ModuleType:
    """``bench_prepare`` imported as the script runs (its ``from machine import ...`` needs the
    benchmarks folder on sys.path)."""
    return load_script(BENCHMARKS / "bench_prepare.py", monkeypatch)


@pytest.fixture(scope="module")
def finished(tiny_mirror, tiny_tokenizer_dir) -> subprocess.CompletedProcess:
    """``python benchmarks/bench_prepare.py`` run once on the fixture mirror, every stage in a
    fresh process, as the README runs it (one run per stage)."""
    cmd = [
        sys.executable,
        str(BENCHMARKS / "bench_prepare.py"),
        "--hub-mirror",
        str(tiny_mirror),
        "--tokenizer",
        str(tiny_tokenizer_dir),
        "--size-mb",
        str(SIZE_MB),
        "--block-size",
        str(BLOCK_SIZE),
        "--repeat",
        "1",
    ]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_exits_zero_with_checks_passed(finished):
    assert finished.returncode == 0, finished.stderr
    assert CHECK_LINE in finished.stdout.splitlines()
    assert "damaged" not in finished.stderr and "FAILED" not in finished.stderr, finished.stderr


def test_last_line_is_the_summary_json(finished, tiny_tokenizer_dir):
    assert finished.returncode == 0, finished.stderr
    summary = json.loads(finished.stdout.strip().splitlines()[-1])
    assert set(summary) == SUMMARY_KEYS
    assert summary["size_mb"] == SIZE_MB and summary["block_size"] == BLOCK_SIZE
    assert summary["tokenizer"] == str(tiny_tokenizer_dir)
    tokens = summary["tokens_per_domain"]
    assert set(tokens) == set(summary["texts_per_domain"]) == {"code", "math", "prose"}
    assert summary["total_tokens"] == sum(tokens.values()) and min(tokens.values()) > BLOCK_SIZE
    assert set(summary["warm_setup_s_by_block_size"]) == {str(BLOCK_SIZE), "128"}
    assert summary["warm_setup_s"] == max(summary["warm_setup_s_by_block_size"].values())
    assert "(cycled)" in finished.stdout  # the fixture holds less than the budget


def test_cache_key_is_one_a_later_open_hits(bench, tiny_tokenizer_dir, tmp_path):
    """The cold stage's cache, opened again with the same key, is a hit (not "damaged")."""
    from moe_emergence.data.cache import ensure_cache
    from moe_emergence.data.tokenize import load_tokenizer

    args = bench.parse_args(["--hub-mirror", str(tmp_path), "--tokenizer", str(tiny_tokenizer_dir)])
    tokenizer = load_tokenizer(args.tokenizer)
    texts = {"code": ["def f(x):\n    return x\n"] * 3, "math": ["1 + 1 = 2"], "prose": ["A b."]}
    inputs = bench._cache_inputs(args, tokenizer, texts)
    make_domains = bench._domain_inputs(texts)
    cold = ensure_cache(tmp_path, inputs, make_domains, tokenizer, rebuild=True)
    assert cold.built_now

    def no_build():
        raise AssertionError("the benchmark's cache was not found again: rebuilt")

    warm = ensure_cache(tmp_path, bench._cache_inputs(args, tokenizer, texts), no_build, tokenizer)
    assert not warm.built_now and warm.path == cold.path
    assert {d: len(s.doc_offsets) - 1 for d, s in warm.streams().items()} == {
        "code": 3,
        "math": 1,
        "prose": 1,
    }


def test_cycle_to_budget(bench):
    assert bench.cycle_to_budget(["ab", "cde"], 6) == ["ab", "cde", "ab"]
    assert bench.cycle_to_budget(["abcdef", "g"], 3) == ["abcdef"]  # already met: unchanged
    with pytest.raises(ValueError, match="no characters"):
        bench.cycle_to_budget(["", ""], 4)
