"""The sweep summary rendered: the numbers of :func:`moe_emergence.analysis.summary.summarize`
(this module computes none) as text and files.

Files (:func:`write_summary`): summary.csv (``seeds``/``values`` ';'-joined, NaN as ``nan``;
other NaNs as empty cells), summary.json (NaN as null), summary.md (:func:`render_markdown`,
from :mod:`moe_emergence.analysis.summary_markdown`) and the sweep figures
(:mod:`moe_emergence.analysis.sweep_plots`), each written to a temp name and renamed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from moe_emergence.analysis import sweep_plots
from moe_emergence.analysis.results import RunResult
from moe_emergence.analysis.summary import (
    ALPHA,
    COLUMNS,
    CONFIDENCE,
    POWER,
    Summary,
    summarize,
)
from moe_emergence.analysis.summary_cells import FEW_SEEDS, display_names
from moe_emergence.analysis.summary_markdown import INTERVAL_TEXT, P_TEXT, render_markdown
from moe_emergence.analysis.tables import write_table
from moe_emergence.files import write_atomic

__all__ = ["FEW_SEEDS", "SummaryFiles", "render_markdown", "write_summary"]


@dataclass(frozen=True)
class SummaryFiles:
    """What :func:`write_summary` wrote (figures: those there was something to draw for) and
    the summary's warnings."""

    csv: Path
    json: Path
    markdown: Path
    figures: list[Path]
    warnings: list[str]


def _nan_to_none(value: object) -> object:
    """Non-finite floats (NaN, a diverged run's inf) as None, inside tuples too: JSON has no
    NaN."""
    if isinstance(value, tuple | list):
        return [_nan_to_none(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _csv_cell(value: object) -> object:
    if isinstance(value, tuple | list):
        return ";".join("" if v is None else repr(v) for v in value)
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _json_document(summary: Summary) -> dict:
    rows = [{k: _nan_to_none(v) for k, v in asdict(r).items()} for r in summary.rows]
    return {
        "rows": rows,
        "groups": {g: asdict(info) for g, info in summary.groups.items()},
        "names": display_names(
            summary
        ),  # group, contrast or initial model key -> as summary.md names it
        "contrasts": {label: list(pair) for label, pair in summary.contrasts.items()},
        "primary": {label: list(pair) for label, pair in summary.primary.items()},
        "initial_models": {label: asdict(m) for label, m in summary.initial_models.items()},
        "families": [{k: _nan_to_none(v) for k, v in asdict(f).items()} for f in summary.families],
        "confidence": CONFIDENCE,
        "alpha": ALPHA,
        "power": POWER,
        "interval": INTERVAL_TEXT,
        "p_values": P_TEXT,
        "warnings": summary.warnings,
    }


def _write_figures(results: Sequence[RunResult], summary: Summary, out_dir: Path) -> list[Path]:
    figures = []
    if any(info.moe for info in summary.groups.values()):
        figures.append(sweep_plots.plot_sweep_emergence(results, out_dir / "emergence.png"))
        figures.append(sweep_plots.plot_sweep_heatmaps(results, out_dir / "heatmaps.png"))
        if sweep_plots.has_saturation(results):
            figures.append(sweep_plots.plot_sweep_saturation(results, out_dir / "saturation.png"))
    if any(r.metric == "loss" for r in summary.rows if r.group in summary.groups):
        figures.append(sweep_plots.plot_held_out_loss(results, out_dir / "held_out_loss.png"))
    return figures


def write_summary(
    results: Sequence[RunResult], out_dir: str | os.PathLike, figures: bool = True
) -> SummaryFiles:
    """Write summary.csv (NaN as empty cells; seeds and values ';'-joined, NaN as ``nan``),
    summary.json (NaN as null), summary.md and, unless ``figures`` is False, emergence.png and
    heatmaps.png (with MoE groups), saturation.png (with MoE runs' specialisation metrics) and
    held_out_loss.png (with losses) into ``out_dir``.
    Returns the paths and the warnings."""
    out = Path(out_dir)
    summary = summarize(results)
    csv_rows = [{k: _csv_cell(v) for k, v in asdict(r).items()} for r in summary.rows]
    csv_path = write_table(out / "summary.csv", COLUMNS, csv_rows)
    text = json.dumps(_json_document(summary), indent=2, allow_nan=False)
    json_path = write_atomic(out / "summary.json", text + "\n")
    md_path = write_atomic(out / "summary.md", render_markdown(summary))
    pngs = _write_figures(results, summary, out) if figures else []
    return SummaryFiles(csv_path, json_path, md_path, pngs, list(summary.warnings))
