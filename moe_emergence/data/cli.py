"""The data CLI: ``python -m moe_emergence.data --size-mb 1 --block-size 256 ...``.

Loads every domain, tokenizes and packs, prints the per-domain report (and the imbalance
warning / balance line), checks the blocks and the collate function, and writes a JSON report.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moe_emergence.data.dataset import PackedMixedDomainDataset, collate_packed
from moe_emergence.data.prepare import prepare_domains
from moe_emergence.data.report import build_report, report_table, write_report
from moe_emergence.data.settings import DataSettings
from moe_emergence.errors import UserError
from moe_emergence.hub import HubUnavailableError

log = logging.getLogger("moe_emergence.data")


class _StdoutHandler(logging.StreamHandler):
    """Writes each record to the current ``sys.stdout`` (which tests and notebooks swap)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:
        pass


def log_to_stdout() -> None:
    """Show the package's INFO lines (report, balance line) as bare messages on stdout.

    Attached to the ``moe_emergence`` logger, not the root, so that it works where the root
    logger is already configured (pytest, notebooks); records still propagate.
    """
    package = logging.getLogger("moe_emergence")
    package.setLevel(logging.INFO)
    if not any(isinstance(h, _StdoutHandler) for h in package.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        package.addHandler(handler)


def parse_args(argv: Sequence[str] | None = None) -> tuple[DataSettings, argparse.Namespace]:
    defaults = DataSettings()
    parser = argparse.ArgumentParser(
        prog="python -m moe_emergence.data",
        description="Prepare the packed code/math/prose dataset and report its token counts.",
    )
    parser.add_argument(
        "--size-mb",
        type=float,
        default=defaults.size_mb,
        help="budget per domain in MiB of characters (default %(default)s)",
    )
    parser.add_argument(
        "--block-size",
        type=int,
        default=defaults.block_size,
        help="tokens per block (default %(default)s)",
    )
    parser.add_argument(
        "--balance-tokens",
        action="store_true",
        help="keep the smallest domain's block count for every domain",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="seed for balancing and shuffling (default %(default)s)",
    )
    parser.add_argument(
        "--max-example-chars",
        type=int,
        default=defaults.max_example_chars,
        help="keep texts shorter than this many characters (default %(default)s)",
    )
    parser.add_argument(
        "--hub-mirror",
        default=defaults.hub_mirror,
        help="folder holding Hub repos as <mirror>/<org>/<name> "
        "(default: $MOE_HUB_MIRROR, else the Hub)",
    )
    parser.add_argument(
        "--tokenizer",
        default=defaults.tokenizer,
        help="tokenizer Hub name or folder, or sample_bpe (default %(default)s)",
    )
    parser.add_argument(
        "--source",
        choices=["hub", "sample"],
        default=defaults.source,
        help="hub: the datasets (through --hub-mirror if set); sample: the offline corpus "
        "(pair it with --tokenizer sample_bpe)",
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="token cache root (default: $MOE_CACHE_DIR, else .cache/moe_emergence)",
    )
    parser.add_argument(
        "--rebuild-cache", action="store_true", help="tokenize again even on a cache hit"
    )
    parser.add_argument(
        "--verify-cache",
        action="store_true",
        help="on a cache hit, check every file's SHA-256 too (default: sizes only); "
        "a mismatch is rebuilt",
    )
    parser.add_argument("--report", default=None, help="write the JSON report to this file")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    settings = DataSettings(
        size_mb=args.size_mb,
        block_size=args.block_size,
        balance_tokens=args.balance_tokens,
        seed=args.seed,
        max_example_chars=args.max_example_chars,
        tokenizer=args.tokenizer,
        hub_mirror=args.hub_mirror,
        cache_dir=args.cache_dir,
        rebuild_cache=args.rebuild_cache,
        verify_cache=args.verify_cache,
        source=args.source,
    )
    try:
        settings.validate()
        check_report_path(args.report)
    except UserError as exc:
        parser.error(str(exc))
    return settings, args


def check_report_path(report: str | None) -> None:
    """Refuse a ``--report`` path that cannot be written, before any work."""
    if report is None:
        return
    path = Path(report)
    if path.is_dir():
        raise UserError(
            f"--report '{report}' is a folder: give a file path, e.g. '{path / 'report.json'}'."
        )
    if not path.parent.is_dir():
        raise UserError(
            f"--report '{report}': the folder '{path.parent}' does not exist; create it first."
        )


def check_dataset(dataset: PackedMixedDomainDataset, pad_token_id: int | None) -> str:
    """Check block shapes, absence of padding and the collate function; return a summary."""
    size = dataset.block_size
    for domain in dataset.domains:
        blocks = dataset.domain_blocks(domain)
        expected = dataset.token_counts[domain] // size
        if blocks.shape != (expected, size):
            raise AssertionError(f"{domain}: blocks {blocks.shape} != ({expected}, {size})")
        if pad_token_id is not None and np.any(blocks == pad_token_id):
            raise AssertionError(f"{domain}: padding token {pad_token_id} found in a block")
    batch = collate_packed([dataset[i] for i in range(min(8, len(dataset)))])
    if tuple(batch["input_ids"].shape) != (len(batch["domains"]), size):
        raise AssertionError(f"collate gave {tuple(batch['input_ids'].shape)}")
    return (
        f"Checks passed: {len(dataset):,} blocks of {size} tokens, no padding, "
        f"collate -> input_ids {tuple(batch['input_ids'].shape)} {batch['input_ids'].dtype}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the data CLI; returns the exit status."""
    settings, args = parse_args(argv)
    log_to_stdout()
    try:
        prepared = prepare_domains(settings, show_progress=not args.no_progress)
        log.info(report_table(prepared, settings.block_size))
        dataset = PackedMixedDomainDataset.from_token_streams(
            prepared.streams, settings.block_size, settings.balance_tokens, settings.seed
        )
    except (UserError, HubUnavailableError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    pad_id = prepared.tokenizer_info.get("pad_token_id")
    log.info(check_dataset(dataset, pad_id))
    report = build_report(prepared, dataset, settings)
    if args.report:
        log.info("Report written to %s", write_report(report, args.report))
    return 0
