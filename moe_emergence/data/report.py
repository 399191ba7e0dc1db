"""The per-domain data report: printed as a table, written as JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from moe_emergence.data.dataset import PackedMixedDomainDataset
from moe_emergence.data.packing import format_report
from moe_emergence.data.prepare import PreparedDomains
from moe_emergence.data.settings import DataSettings
from moe_emergence.files import write_atomic


def build_report(
    prepared: PreparedDomains, dataset: PackedMixedDomainDataset, settings: DataSettings
) -> dict[str, Any]:
    """Per-domain maps (num_texts, total_chars, token_counts, block_counts[, balanced_...]),
    loader metadata, tokenizer and the settings used. Token counts are before chunking."""
    meta = prepared.metadata
    report: dict[str, Any] = {
        "settings": settings.to_dict(),
        "tokenizer": prepared.tokenizer_info,
        "domains": list(dataset.domains),
        "num_texts": {d: meta[d]["num_texts"] for d in dataset.domains},
        "total_chars": {d: meta[d]["total_chars"] for d in dataset.domains},
        "token_counts": dict(dataset.token_counts),
        "block_counts": dict(dataset.block_counts),
    }
    if dataset.balanced_block_counts is not None:
        report["balanced_block_counts"] = dict(dataset.balanced_block_counts)
    counts = dataset.token_counts.values()
    report["imbalance_ratio"] = round(max(counts) / max(min(counts), 1), 4)
    report["num_blocks"] = len(dataset)
    report["cache"] = {"path": str(prepared.cache_path), "from_cache": prepared.from_cache}
    report["metadata"] = meta
    return report


def report_table(prepared: PreparedDomains, block_size: int) -> str:
    """Texts, chars, tokens (before chunking) and full blocks per domain; the sample source is
    labelled as such above the table."""
    rows = {
        d: {
            "num_texts": prepared.metadata[d]["num_texts"],
            "total_chars": prepared.metadata[d]["total_chars"],
            "tokens": stream.num_tokens,
            "blocks": stream.num_tokens // block_size,
        }
        for d, stream in prepared.streams.items()
    }
    sources = {m.get("source", "hub") for m in prepared.metadata.values()}
    if sources == {"sample"}:
        return "Source: sample (offline corpus built on this machine)\n" + format_report(rows)
    return format_report(rows)


def write_report(report: dict[str, Any], path: str | os.PathLike) -> Path:
    return write_atomic(path, json.dumps(report, indent=2) + "\n")
