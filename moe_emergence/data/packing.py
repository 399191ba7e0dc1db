"""Cut token streams into fixed blocks, report per-domain counts, balance and shuffle.

Blocks are views: ``stream[: n * block_size].reshape(n, block_size)`` with
``n = len(stream) // block_size``; the tail shorter than a block is dropped, nothing is padded.
Balancing and shuffling work on index arrays, never on copies of the tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from moe_emergence.data.checks import SettingError, is_int
from moe_emergence.data.settings import option

log = logging.getLogger(__name__)

IMBALANCE_RATIO = 1.5


def check_block_size(block_size: int) -> None:
    """Raise SettingError unless ``block_size`` is an integer ≥ 2 (for the public packing
    functions; the datamodule and the CLI have validated it already)."""
    if not is_int(block_size) or block_size < 2:
        raise SettingError(f"block_size={block_size!r} must be an integer ≥ 2.", "block_size")


def block_view(tokens: np.ndarray, block_size: int) -> np.ndarray:
    """``(len(tokens) // block_size, block_size)`` view of ``tokens``; the tail is dropped."""
    check_block_size(block_size)
    n = tokens.shape[0] // block_size
    return tokens[: n * block_size].reshape(n, block_size)


def format_report(rows: Mapping[str, Mapping[str, int]]) -> str:
    """A table: one row per domain with texts, chars, tokens and blocks."""
    width = max(8, *(len(d) + 1 for d in rows))
    header = f"{'domain':<{width}}{'texts':>10}{'chars':>14}{'tokens':>14}{'blocks':>10}"
    lines = [header, "-" * len(header)]
    for domain, r in rows.items():
        lines.append(
            f"{domain:<{width}}{r['num_texts']:>10,}{r['total_chars']:>14,}"
            f"{r['tokens']:>14,}{r['blocks']:>10,}"
        )
    return "\n".join(lines)


def imbalance_warning(token_counts: Mapping[str, int], balancing: bool) -> str | None:
    """The imbalance warning when the largest domain has > 1.5x the smallest's tokens."""
    smallest = min(token_counts, key=token_counts.__getitem__)
    largest = max(token_counts.values())
    if largest <= IMBALANCE_RATIO * token_counts[smallest]:
        return None
    lines = [
        f"Warning: Token imbalance detected (>{IMBALANCE_RATIO}x ratio)!",
        f"  Smallest: {smallest} with {token_counts[smallest]:,} tokens",
        f"  Largest has {largest:,} tokens",
    ]
    if not balancing:
        lines.append(
            f"  Hint: {option('balance_tokens', 'true')} keeps the same number of blocks for every "
            f"domain."
        )
    return "\n".join(lines)


def balance_line(per_domain: int, num_domains: int, block_size: int) -> str:
    total = per_domain * num_domains
    return (
        f"Balanced to {per_domain} blocks per domain "
        f"({total} total, ~{total * block_size:,} tokens)"
    )


def balanced_subsets(
    block_counts: Mapping[str, int], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """For every domain, a seeded random subset (sorted indices) of the smallest domain's size.

    Never oversamples: every kept index is distinct and below the domain's block count.
    """
    keep = min(block_counts.values())
    return {
        domain: np.sort(rng.choice(count, size=keep, replace=False))
        for domain, count in block_counts.items()
    }


def shuffled_order(
    kept: Sequence[np.ndarray], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle all (domain index, block index) pairs together.

    ``kept[d]`` holds domain d's block indices. Returns two aligned arrays of length
    ``sum(len(k) for k in kept)``: domain index (uint8) and block index (int64).
    """
    domain_ids = np.concatenate([np.full(len(k), d, dtype=np.uint8) for d, k in enumerate(kept)])
    block_ids = np.concatenate([np.asarray(k, dtype=np.int64) for k in kept])
    perm = rng.permutation(len(block_ids))
    return domain_ids[perm], block_ids[perm]
