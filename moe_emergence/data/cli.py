"""The data CLI: ``python -m moe_emergence.data --size-mb 1 --block-size 256 ...``.

Loads every domain, tokenizes and packs, prints the per-domain report (and the imbalance
warning / balance line), checks the blocks and the collate function, and writes a JSON report.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moe_emergence.data.dataset import PackedMixedDomainDataset, collate_packed
from moe_emergence.data.prepare import prepare_domains
from moe_emergence.data.report import build_report, report_table, write_report
from moe_emergence.data.settings import DataSettings, cli_flag, kind, naming_options
from moe_emergence.errors import UserError, report_user_errors

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


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`DataSettings` field (``size_mb`` -> ``--size-mb``), its type, default,
    choices and help taken from the field; a bool is a switch."""
    defaults = DataSettings()
    for field in dataclasses.fields(DataSettings):
        flag, kind_name = cli_flag(field.name), kind(field)[0]
        default, help_text = getattr(defaults, field.name), field.metadata["help"]
        if kind_name == "bool":
            action = "store_true" if not default else argparse.BooleanOptionalAction
            parser.add_argument(flag, action=action, default=default, help=help_text)
            continue
        if field.default not in (None, dataclasses.MISSING):
            help_text += " (default %(default)s)"
        parser.add_argument(
            flag,
            type=DataSettings.KINDS[kind_name][2],
            default=default,
            help=help_text,
            choices=field.metadata.get("choices"),
        )


def parse_args(argv: Sequence[str] | None = None) -> tuple[DataSettings, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="python -m moe_emergence.data",
        description="Prepare the packed multi-domain dataset (by default code, math, prose) and "
        "report its token counts.",
    )
    add_setting_flags(parser)
    parser.add_argument("--report", default=None, help="write the JSON report to this file")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    names = [f.name for f in dataclasses.fields(DataSettings)]
    settings = DataSettings(**{name: getattr(args, name) for name in names})
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


def run(settings: DataSettings, args: argparse.Namespace) -> None:
    """Prepare, report, check and (``--report``) write the JSON report."""
    with naming_options():
        prepared = prepare_domains(settings, show_progress=not args.no_progress)
        log.info(report_table(prepared, settings.block_size))
        dataset = PackedMixedDomainDataset.from_token_streams(
            prepared.streams, settings.block_size, settings.balance_tokens, settings.seed
        )
    pad_id = prepared.tokenizer_info.get("pad_token_id")
    log.info(check_dataset(dataset, pad_id))
    report = build_report(prepared, dataset, settings)
    if args.report:
        log.info("Report written to %s", write_report(report, args.report))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the data CLI; returns the exit status (:func:`report_user_errors`)."""
    settings, args = parse_args(argv)
    log_to_stdout()
    return report_user_errors(lambda: run(settings, args))
