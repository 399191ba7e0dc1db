"""The sweep summary rendered: the numbers of :func:`moe_emergence.analysis.summary.summarize`
(this module computes none) as text and files.

Files (:func:`write_summary`): summary.csv (``seeds``/``values`` ';'-joined, NaN as ``nan``;
other NaNs as empty cells), summary.json (NaN as null), summary.md (:func:`render_markdown`)
and the sweep figures (:mod:`moe_emergence.analysis.sweep_plots`), each written to a temp name
and renamed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from moe_emergence.analysis import sweep_plots
from moe_emergence.analysis.results import RunResult, condition_labels
from moe_emergence.analysis.summary import (
    ALPHA,
    COLUMNS,
    CONFIDENCE,
    Summary,
    SummaryRow,
    summarize,
)
from moe_emergence.analysis.tables import write_table
from moe_emergence.files import write_atomic

__all__ = ["FEW_SEEDS", "SummaryFiles", "render_markdown", "write_summary"]

FEW_SEEDS = 5  # below this many runs, summary.md shows the per-seed values beside the mean
INTERVAL_TEXT = (
    f"{CONFIDENCE:.0%} interval of the mean over a group's runs (seeds): Student's t with n - 1 "
    "df (paired differences: per shared seed, pairs - 1 df; unpaired differences: Welch's df); "
    "a single run has none. A t-interval of a non-negative score (NMI, MI) can reach below 0 "
    "with few seeds; it is not clipped."
)
P_TEXT = (
    "p: two-sided t-test against 0 (change and difference rows only). p_holm: Holm-adjusted over "
    "the family a table reads: all groups x layers of one <m>_change metric; all MoE groups x "
    "(domains, overall) of MoE - dense; all pairs x (domains, overall) of the direct loss "
    "contrasts; all MoE pairs x layers of the direct nmi_change contrasts."
)


@dataclass(frozen=True)
class SummaryFiles:
    """What :func:`write_summary` wrote (figures: those there was something to draw for) and
    the summary's warnings."""

    csv: Path
    json: Path
    markdown: Path
    figures: list[Path]
    warnings: list[str]


# ----------------------------------------------------------------------------- markdown


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _num(value: float, fmt: str) -> str:
    return "-" if math.isnan(value) else f"{value:{fmt}}"


def _interval_text(row: SummaryRow | None, fmt: str) -> str:
    """``mean [low, high]`` in ``fmt``, then ``(v1, v2, ...)`` the per-seed values when
    2 <= n < :data:`FEW_SEEDS`; ``mean (n=1)``; or ``-``."""
    if row is None or row.n == 0 or math.isnan(row.mean):
        return "-"
    if math.isnan(row.ci_low) or math.isnan(row.ci_high):
        return f"{row.mean:{fmt}} (n={row.n})"
    text = f"{row.mean:{fmt}} [{row.ci_low:{fmt}}, {row.ci_high:{fmt}}]"
    if row.n < FEW_SEEDS and row.values:
        text += " (" + ", ".join(_num(v, fmt) for v in row.values) + ")"
    return text


def _p_text(p: float) -> str:
    return "-" if math.isnan(p) else f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _p_pair(row: SummaryRow | None) -> str:
    return "-" if row is None else f"{_p_text(row.p)} / {_p_text(row.p_holm)}"


def _table(header: Sequence[str], lines: Iterable[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(line) + " |" for line in lines]


def _runs_above(row: SummaryRow | None) -> str:
    """``k/n`` of a count row (runs above their null after Holm), ``-`` without one."""
    return f"{round(row.mean)}/{row.n}" if row is not None and row.n else "-"


def _mean_text(row: SummaryRow | None) -> str:
    return "-" if row is None or row.n == 0 else _num(row.mean, ".4f")


def _moe_layers(summary: Summary) -> list[tuple[str, int]]:
    return [
        (g, layer)
        for g, info in summary.groups.items()
        if info.moe
        for layer in sorted({r.layer for r in summary.rows if r.group == g and r.layer is not None})
    ]


def _names(summary: Summary) -> dict[str, str]:
    """Group key -> the condition as people say it (:func:`condition_labels`); a contrast's
    key -> ``"<A> - <B>"`` in those names."""
    names = condition_labels(summary.groups)
    for label, (a, b) in summary.contrasts.items():
        names[label] = f"{names.get(a, a)} - {names.get(b, b)}"
    return names


def _routing_tables(summary: Summary) -> tuple[list[str], list[str]]:
    """(NMI against its null and step 0, the controls), both per MoE group x layer."""
    names = _names(summary)
    nmi, controls = [], []
    for g, layer in _moe_layers(summary):
        row = lambda metric, g=g, layer=layer: summary.row(g, metric, layer)  # noqa: E731
        nmi.append(
            [
                _cell(names[g]),
                str(layer),
                _interval_text(row("nmi_step0"), ".4f"),
                _interval_text(row("nmi"), ".4f"),
                _interval_text(row("nmi_change"), ".4f"),
                _p_pair(row("nmi_change")),
                _mean_text(row("null_p95")),
                _runs_above(row("above_null")),
                _runs_above(row("above_null_step0")),
            ]
        )
        controls.append(
            [
                _cell(names[g]),
                str(layer),
                _interval_text(row("token_id_nmi"), ".4f"),
                _interval_text(row("domain_only_nmi"), ".4f"),
                _interval_text(row("cond_mi"), ".4f"),
                _mean_text(row("cond_mi_null_p95")),
                _runs_above(row("cond_mi_above_null")),
                _runs_above(row("cond_mi_above_null_step0")),
            ]
        )
    if not nmi:
        return [], []
    return (
        _table(
            [
                "condition",
                "layer",
                "NMI step 0",
                "NMI final",
                "change [95% CI]",
                "p / p_holm",
                "null p95 (mean)",
                "runs > null (final)",
                "runs > null (step 0)",
            ],
            nmi,
        ),
        _table(
            [
                "condition",
                "layer",
                "token-id NMI",
                "domain-only NMI",
                "cond. MI (nats)",
                "cond. MI null p95 (mean)",
                "runs > null (final)",
                "runs > null (step 0)",
            ],
            controls,
        ),
    )


def _loss_domains(summary: Summary, groups: Iterable[str], suffix: str = "") -> list[str]:
    """The domains of the ``loss_<domain><suffix>`` rows of ``groups``, in row order (suffix
    "" or ``_minus_dense``; with "" the ``_minus_dense`` rows are not domains)."""
    groups = set(groups)
    seen: dict[str, None] = {}
    for r in summary.rows:
        m = r.metric
        if r.group not in groups or not m.startswith("loss_") or m == f"loss{suffix}":
            continue
        if m.endswith("_minus_dense") == (suffix == "_minus_dense"):
            seen.setdefault(m.removeprefix("loss_").removesuffix(suffix), None)
    return list(seen)


def _loss_table(summary: Summary) -> list[str]:
    groups = [g for g in summary.groups if summary.row(g, "loss")]
    domains = _loss_domains(summary, groups)
    names = _names(summary)
    lines = [
        [
            _cell(names[g]),
            *[_interval_text(summary.row(g, f"loss_{d}"), ".3f") for d in domains],
            _interval_text(summary.row(g, "loss"), ".3f"),
        ]
        for g in groups
    ]
    header = ["condition", *[_cell(d) for d in domains], "overall (token-weighted)"]
    return _table(header, lines) if lines else []


def _difference_line(label: list[str], row: SummaryRow, fmt: str) -> list[str]:
    return [*label, _interval_text(row, fmt), row.method, _p_text(row.p), _p_text(row.p_holm)]


def _minus_dense_table(summary: Summary) -> list[str]:
    lines = []
    names = _names(summary)
    for g, info in summary.groups.items():
        domains = _loss_domains(summary, [g], "_minus_dense")
        for d, metric in [
            *((d, f"loss_{d}_minus_dense") for d in domains),
            ("overall", "loss_minus_dense"),
        ]:
            if (row := summary.row(g, metric)) is not None:
                twin = info.dense_twin or ""
                label = [_cell(names[g]), _cell(names.get(twin, twin)), _cell(d)]
                lines.append(_difference_line(label, row, ".3f"))
    header = ["condition", "dense twin", "domain", "MoE - dense [95% CI]", "method", "p", "p_holm"]
    return _table(header, lines) if lines else []


def _contrast_tables(summary: Summary) -> tuple[list[str], list[str]]:
    """(held-out loss contrasts, NMI-change contrasts) of every pair of groups."""
    losses, changes = [], []
    names = _names(summary)
    for label in summary.contrasts:
        domains = _loss_domains(summary, [label])
        for d, metric in [*((d, f"loss_{d}") for d in domains), ("overall", "loss")]:
            if (row := summary.row(label, metric)) is not None:
                losses.append(_difference_line([_cell(names[label]), _cell(d)], row, ".3f"))
        for r in summary.rows:
            if r.group == label and r.metric == "nmi_change":
                changes.append(_difference_line([_cell(names[label]), str(r.layer)], r, ".4f"))
    tail = ["method", "p", "p_holm"]
    return (
        _table(["A - B", "domain", "loss A - loss B [95% CI]", *tail], losses) if losses else [],
        _table(["A - B", "layer", "NMI change A - B [95% CI]", *tail], changes) if changes else [],
    )


def render_markdown(summary: Summary) -> str:
    """summary.md's text: a line on n, the unit of replication, intervals and p-values, then
    the routing (NMI, controls), held-out loss (nats), MoE - dense and direct contrast tables
    (those that have rows). NMI 4 decimals, losses 3; per-seed values in parentheses below
    :data:`FEW_SEEDS` runs; ``(n=1)`` where a single run gives no interval."""
    names = _names(summary)
    runs = ", ".join(f"{_cell(names[g])} {len(i.runs)}" for g, i in summary.groups.items())
    out = [
        f"Runs per group (n): {runs}. Values at each run's final checkpoint; step 0 where a run "
        "has a step-0 checkpoint. Unit of replication: the seed across runs (every interval and "
        "p below is over a group's runs); the document inside a run (the permutation nulls and "
        f"each run's probe intervals). Cells: mean [{CONFIDENCE:.0%} interval] "
        f"(per-seed values, seed order, when n < {FEW_SEEDS}); {INTERVAL_TEXT} {P_TEXT} "
        f"Runs > null: runs whose document-level permutation p-value is below {ALPHA} after "
        "Holm over all groups x layers x runs of that column. `(n=1)`: one run, no interval.",
        "",
    ]
    nmi, controls = _routing_tables(summary)
    loss_contrasts, nmi_contrasts = _contrast_tables(summary)
    sections = [
        (
            "Routing: NMI = I(domain; expert) / H(domain), eval mode, fixed probe; change = final "
            "- step 0 per run, p_holm over this table",
            nmi,
        ),
        (
            "Routing controls at the final checkpoint: cross-fitted token-id and domain-only "
            "routers' NMI; I(domain; expert | token) against its null",
            controls,
        ),
        ("Held-out loss (nats per token)", _loss_table(summary)),
        (
            "MoE - dense held-out loss (nats per token; p_holm over this table)",
            _minus_dense_table(summary),
        ),
        (
            "Direct contrasts: held-out loss A - B (nats per token; p_holm over this table)",
            loss_contrasts,
        ),
        ("Direct contrasts: NMI change from step 0, A - B (p_holm over this table)", nmi_contrasts),
    ]
    for title, table in sections:
        if table:
            out += [f"## {title}", "", *table, ""]
    if summary.warnings:
        out += ["## Warnings", "", *[f"- {w}" for w in summary.warnings], ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- files


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
        "contrasts": {label: list(pair) for label, pair in summary.contrasts.items()},
        "confidence": CONFIDENCE,
        "alpha": ALPHA,
        "interval": INTERVAL_TEXT,
        "p_values": P_TEXT,
        "warnings": summary.warnings,
    }


def _write_figures(results: Sequence[RunResult], summary: Summary, out_dir: Path) -> list[Path]:
    figures = []
    if any(info.moe for info in summary.groups.values()):
        figures.append(sweep_plots.plot_sweep_emergence(results, out_dir / "emergence.png"))
        figures.append(sweep_plots.plot_sweep_heatmaps(results, out_dir / "heatmaps.png"))
    if any(r.metric == "loss" for r in summary.rows if r.group in summary.groups):
        figures.append(sweep_plots.plot_held_out_loss(results, out_dir / "held_out_loss.png"))
    return figures


def write_summary(
    results: Sequence[RunResult], out_dir: str | os.PathLike, figures: bool = True
) -> SummaryFiles:
    """Write summary.csv (NaN as empty cells; seeds and values ';'-joined, NaN as ``nan``),
    summary.json (NaN as null), summary.md and, unless ``figures`` is False, emergence.png and
    heatmaps.png (with MoE groups) and held_out_loss.png (with losses) into ``out_dir``.
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
