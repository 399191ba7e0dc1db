"""The cells of summary.md: a row's mean, interval and per-seed values, p-values, run counts,
nulls and fold changes as text; a markdown table; the MoE group x layer cells; the names
groups, contrasts and initial models are shown by."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from moe_emergence.analysis.results import condition_labels
from moe_emergence.analysis.summary_rows import Summary, SummaryRow

FEW_SEEDS = 5  # below this many runs, summary.md shows the per-seed values beside the mean
NAN = float("nan")


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def num(value: float, fmt: str) -> str:
    return "-" if math.isnan(value) else f"{value:{fmt}}"


def interval_text(row: SummaryRow | None, fmt: str) -> str:
    """``mean [low, high]`` in ``fmt``, then ``(v1, v2, ...)`` the per-seed values when
    2 <= n < :data:`FEW_SEEDS`; ``mean (n=1)``; or ``-``."""
    if row is None or row.n == 0 or math.isnan(row.mean):
        return "-"
    if math.isnan(row.ci_low) or math.isnan(row.ci_high):
        return f"{row.mean:{fmt}} (n={row.n})"
    text = f"{row.mean:{fmt}} [{row.ci_low:{fmt}}, {row.ci_high:{fmt}}]"
    if row.n < FEW_SEEDS and row.values:
        text += " (" + ", ".join(num(v, fmt) for v in row.values) + ")"
    return text


def p_text(p: float) -> str:
    return "-" if math.isnan(p) else f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def p_pair(row: SummaryRow | None) -> str:
    return "-" if row is None else f"{p_text(row.p)} / {p_text(row.p_holm)}"


def md_table(header: Sequence[str], lines: Iterable[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(line) + " |" for line in lines]


def runs_above(row: SummaryRow | None) -> str:
    """``k/n`` of a count row (runs above their null after Holm), ``-`` without one."""
    return f"{round(row.mean)}/{row.n}" if row is not None and row.n else "-"


def mean_text(row: SummaryRow | None, fmt: str = ".4f") -> str:
    return "-" if row is None or row.n == 0 else num(row.mean, fmt)


def null_text(summary: Summary, group: str, layer: int, prefix: str) -> str:
    """``p95 (mean)`` of a score's null: ``<prefix>_p95`` and ``<prefix>_mean`` rows."""
    p95, mean = (
        summary.row(group, f"{prefix}_p95", layer),
        summary.row(group, f"{prefix}_mean", layer),
    )
    if p95 is None or p95.n == 0 or math.isnan(p95.mean):
        return "-"
    return f"{p95.mean:.4f} ({mean_text(mean)})"


def fold_text(value: float) -> str:
    return "-" if math.isnan(value) else f"x{value:.3g}"


def moe_layers(summary: Summary) -> list[tuple[str, int]]:
    return [
        (g, layer)
        for g, info in summary.groups.items()
        if info.moe
        for layer in sorted({r.layer for r in summary.rows if r.group == g and r.layer is not None})
    ]


def display_names(summary: Summary) -> dict[str, str]:
    """Group key -> the condition as people say it (:func:`condition_labels`); a contrast's
    key -> ``"<A> - <B>"`` in those names; an initial model's -> its groups' names joined."""
    names = condition_labels(summary.groups)
    for label, (a, b) in {**summary.contrasts, **summary.primary}.items():
        names[label] = f"{names.get(a, a)} - {names.get(b, b)}"
    for label, model in summary.initial_models.items():
        names[label] = " / ".join(names.get(g, g) for g in model.groups)
    return names
