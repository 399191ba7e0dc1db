"""The sweep summary of ``python -m moe_emergence.analyze``: runs grouped over seeds, each
metric as mean and 95% interval over a group's runs at each run's final checkpoint.

Groups: the runs with equal :attr:`RunResult.group` (same overrides, seeds apart).
Rows (:data:`COLUMNS`), one per group x layer x metric:

routing, per MoE layer of MoE groups
    the :class:`LayerScores` fields of :data:`ROUTING_METRICS` (NMI beside its chance level and
    the token-identity control), ``above_null``: the share of runs whose nmi > null_p95, and
    ``cond_mi_above_null``: whose cond_mi > cond_mi_null_p95
    (method ``count``, no interval)
held-out loss (nats), every group with losses, ``layer`` empty
    ``loss_<domain>``, ``ppl_<domain>`` (mean of the per-run exp(loss)), ``loss`` (each run's
    token-weighted mean over its domains)
MoE minus dense, every MoE group with a dense twin (:func:`dense_twins`)
    ``loss_<domain>_minus_dense``, ``loss_minus_dense`` (:func:`difference_interval`)

Files (:func:`write_summary`): summary.csv, summary.json, summary.md and the sweep figures
(:mod:`moe_emergence.analysis.sweep_plots`), each written to a temp name and renamed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moe_emergence.analysis import sweep_plots
from moe_emergence.analysis.intervals import (
    BOOTSTRAP_FROM,
    BOOTSTRAP_RESAMPLES,
    Interval,
    difference_interval,
    mean_interval,
)
from moe_emergence.analysis.results import RunResult, group_runs, split_override
from moe_emergence.analysis.tables import write_table

__all__ = [
    "COLUMNS",
    "CONFIDENCE",
    "ROUTING_METRICS",
    "GroupInfo",
    "Summary",
    "SummaryFiles",
    "SummaryRow",
    "dense_twins",
    "group_runs",
    "render_markdown",
    "summarize",
    "write_summary",
]

CONFIDENCE = 0.95
COLUMNS = ("group", "layer", "metric", "n", "mean", "ci_low", "ci_high", "method")
ROUTING_METRICS = (
    "nmi", "null_mean", "null_p95", "token_id_nmi", "token_id_share", "cond_mi",
    "cond_mi_null_p95", "usage_entropy", "router_entropy",
)  # fmt: skip
INTERVAL_TEXT = (
    f"{CONFIDENCE:.0%} interval of the mean over a group's runs (seeds): Student's t below "
    f"{BOOTSTRAP_FROM} runs, percentile bootstrap ({BOOTSTRAP_RESAMPLES:,} resamples) from "
    f"{BOOTSTRAP_FROM}; a single run has none."
)
TWIN_FREE_KEYS = ("condition", "model", "experiment")  # and every key under ``model.``
NAN = float("nan")


@dataclass(frozen=True)
class SummaryRow:
    """One group x layer x metric. layer: the MoE layer (routing metrics) or None (losses).
    n: runs with a value; mean, ci_low, ci_high: NaN where undefined; method: t, bootstrap,
    none (n <= 1) or count (``above_null``: mean = share of runs, no interval)."""

    group: str
    layer: int | None
    metric: str
    n: int
    mean: float
    ci_low: float
    ci_high: float
    method: str

    @classmethod
    def of(cls, group: str, layer: int | None, metric: str, interval: Interval) -> SummaryRow:
        i = interval
        return cls(group, layer, metric, i.n, i.mean, i.ci_low, i.ci_high, i.method)


@dataclass(frozen=True)
class GroupInfo:
    """One group: its runs' names, seeds and final steps (in run order), whether it is MoE,
    and its dense twin's group (None when it has none)."""

    runs: list[str]
    seeds: list[int | None]
    moe: bool
    final_steps: list[int]
    dense_twin: str | None


@dataclass(frozen=True)
class Summary:
    """The rows (group order, then layer, then metric), the groups, and the warnings (one
    sentence each: differing final steps, ambiguous dense twins)."""

    rows: list[SummaryRow]
    groups: dict[str, GroupInfo]
    warnings: list[str] = field(default_factory=list)

    def row(self, group: str, metric: str, layer: int | None = None) -> SummaryRow | None:
        """The row of ``group`` x ``layer`` x ``metric``, or None."""
        for r in self.rows:
            if (r.group, r.layer, r.metric) == (group, layer, metric):
                return r
        return None


@dataclass(frozen=True)
class SummaryFiles:
    """What :func:`write_summary` wrote (figures: those there was something to draw for) and
    the summary's warnings."""

    csv: Path
    json: Path
    markdown: Path
    figures: list[Path]
    warnings: list[str]


# ----------------------------------------------------------------------------- groups


def _parse_overrides(overrides: Sequence[str]) -> dict[str, str]:
    """``key=value`` strings as a dict of bare keys (:func:`split_override`)."""
    return dict(split_override(item) for item in overrides)


def _twin_free(key: str) -> bool:
    return key in TWIN_FREE_KEYS or key.startswith("model.")


def _differing_keys(a: Mapping[str, str], b: Mapping[str, str]) -> set[str] | None:
    """The keys on which two overrides differ (missing on one side counts), or None when one
    of them is not allowed to differ between an MoE group and its dense twin."""
    keys = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k) or (k in a) != (k in b)}
    return keys if all(_twin_free(k) for k in keys) else None


def dense_twins(
    groups: Mapping[str, Sequence[RunResult]],
) -> tuple[dict[str, str | None], list[str]]:
    """(MoE group -> its dense twin or None, warnings). A twin is a non-MoE group whose
    overrides differ only in ``condition``, ``model``, ``experiment`` or ``model.*`` keys; of
    several, the one with fewest differing keys; a tie: none, and a warning naming them."""
    overrides = {g: _parse_overrides(runs[0].overrides) for g, runs in groups.items()}
    dense = [g for g, runs in groups.items() if not _is_moe(runs)]
    twins: dict[str, str | None] = {}
    warnings: list[str] = []
    for g, runs in groups.items():
        if not _is_moe(runs):
            continue
        found = {d: _differing_keys(overrides[g], overrides[d]) for d in dense}
        found = {d: len(keys) for d, keys in found.items() if keys is not None}
        fewest = min(found.values(), default=None)
        best = [d for d, n in found.items() if n == fewest]
        twins[g] = best[0] if len(best) == 1 else None
        if len(best) > 1:
            warnings.append(
                f"group {g!r}: several dense twins equally close ({', '.join(map(repr, best))});"
                " no MoE - dense rows for it"
            )
    return twins, warnings


def _is_moe(runs: Sequence[RunResult]) -> bool:
    return any(run.moe for run in runs)


def _step_warnings(groups: Mapping[str, Sequence[RunResult]]) -> list[str]:
    out = []
    for g, runs in groups.items():
        steps = sorted({run.final.step for run in runs})
        if len(steps) > 1:
            out.append(
                f"group {g!r}: runs end at different steps {steps}; values are taken at each "
                "run's final checkpoint anyway"
            )
    return out


# ----------------------------------------------------------------------------- per-run values


def _layers(runs: Sequence[RunResult]) -> list[int]:
    return sorted({layer for run in runs for layer in run.layers})


def _domains(runs: Iterable[RunResult]) -> list[str]:
    """The domains with a final held-out loss in any run, in the runs' domain order."""
    seen: dict[str, None] = {}
    for run in runs:
        losses = run.final.losses
        for d in [*run.domains, *losses]:
            if d in losses:
                seen.setdefault(d, None)
    return list(seen)


def _score(run: RunResult, layer: int, metric: str) -> float:
    scores = run.final.scores.get(layer)
    return NAN if scores is None else float(getattr(scores, metric))


def _loss(run: RunResult, domain: str) -> float:
    held = run.final.losses.get(domain)
    return NAN if held is None else held.loss


def _overall_loss(run: RunResult) -> float:
    """sum(loss * tokens) / sum(tokens) over the run's final held-out domains; NaN if none."""
    losses = run.final.losses.values()
    tokens = sum(h.tokens for h in losses)
    return sum(h.loss * h.tokens for h in losses) / tokens if tokens > 0 else NAN


def _mean(values: Sequence[float]) -> Interval:
    return mean_interval(values, confidence=CONFIDENCE, seed=0)


# ----------------------------------------------------------------------------- rows


# count metric -> (score, its chance level): the share of runs whose score beats the level
ABOVE_NULL = {"above_null": ("nmi", "null_p95"),
              "cond_mi_above_null": ("cond_mi", "cond_mi_null_p95")}  # fmt: skip


def _above_null(group: str, layer: int, runs: Sequence[RunResult], metric: str) -> SummaryRow:
    score, null = ABOVE_NULL[metric]
    pairs = [(_score(r, layer, score), _score(r, layer, null)) for r in runs]
    pairs = [(a, b) for a, b in pairs if not (math.isnan(a) or math.isnan(b))]
    share = sum(a > b for a, b in pairs) / len(pairs) if pairs else NAN
    return SummaryRow(group, layer, metric, len(pairs), share, NAN, NAN, "count")


def _routing_rows(group: str, runs: Sequence[RunResult]) -> list[SummaryRow]:
    rows = []
    for layer in _layers(runs):
        for metric in ROUTING_METRICS:
            values = [_score(r, layer, metric) for r in runs]
            rows.append(SummaryRow.of(group, layer, metric, _mean(values)))
        rows += [_above_null(group, layer, runs, metric) for metric in ABOVE_NULL]
    return rows


def _loss_rows(group: str, runs: Sequence[RunResult]) -> list[SummaryRow]:
    rows = []
    for d in _domains(runs):
        losses = [_loss(r, d) for r in runs]
        rows.append(SummaryRow.of(group, None, f"loss_{d}", _mean(losses)))
        rows.append(SummaryRow.of(group, None, f"ppl_{d}", _mean([math.exp(x) for x in losses])))
    if rows:
        rows.append(SummaryRow.of(group, None, "loss", _mean([_overall_loss(r) for r in runs])))
    return rows


def _difference_rows(
    group: str, runs: Sequence[RunResult], dense: Sequence[RunResult]
) -> list[SummaryRow]:
    rows = []
    dense_domains = set(_domains(dense))
    for d in [d for d in _domains(runs) if d in dense_domains]:
        diff = difference_interval([_loss(r, d) for r in runs], [_loss(r, d) for r in dense],
                                   confidence=CONFIDENCE, seed=0)  # fmt: skip
        rows.append(SummaryRow.of(group, None, f"loss_{d}_minus_dense", diff))
    if rows:
        diff = difference_interval([_overall_loss(r) for r in runs],
                                   [_overall_loss(r) for r in dense], confidence=CONFIDENCE,
                                   seed=0)  # fmt: skip
        rows.append(SummaryRow.of(group, None, "loss_minus_dense", diff))
    return rows


def summarize(results: Sequence[RunResult]) -> Summary:
    """The summary rows, groups and warnings of ``results`` (each run with >= 1 checkpoint;
    values at each run's final checkpoint). Raises ValueError for no runs."""
    if not results:
        raise ValueError("no runs to summarise: results is empty")
    groups = group_runs(results)
    twins, warnings = dense_twins(groups)
    warnings = _step_warnings(groups) + warnings
    rows: list[SummaryRow] = []
    for g, runs in groups.items():
        if _is_moe(runs):
            rows += _routing_rows(g, runs)
        rows += _loss_rows(g, runs)
        if twins.get(g) is not None:
            rows += _difference_rows(g, runs, groups[twins[g]])
    info = {
        g: GroupInfo(
            runs=[r.name for r in runs],
            seeds=[r.seed for r in runs],
            moe=_is_moe(runs),
            final_steps=[r.final.step for r in runs],
            dense_twin=twins.get(g),
        )
        for g, runs in groups.items()
    }
    return Summary(rows, info, warnings)


# ----------------------------------------------------------------------------- markdown


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _interval_text(row: SummaryRow | None, fmt: str, scale: float = 1.0, unit: str = "") -> str:
    """``mean [low, high]`` in ``fmt`` (values times ``scale``), ``mean (n=1)``, or ``-``."""
    if row is None or row.n == 0 or math.isnan(row.mean):
        return "-"
    mean = f"{row.mean * scale:{fmt}}{unit}"
    if math.isnan(row.ci_low) or math.isnan(row.ci_high):
        return f"{mean} (n={row.n})"
    return f"{mean} [{row.ci_low * scale:{fmt}}{unit}, {row.ci_high * scale:{fmt}}{unit}]"


def _table(header: Sequence[str], lines: Iterable[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(line) + " |" for line in lines]


def _runs_above(row: SummaryRow | None) -> str:
    """``k/n`` of a count row (runs above their null), ``-`` without one."""
    return f"{round(row.mean * row.n)}/{row.n}" if row is not None and row.n else "-"


def _routing_table(summary: Summary) -> list[str]:
    lines = []
    for g, info in summary.groups.items():
        if not info.moe:
            continue
        layers = sorted({r.layer for r in summary.rows if r.group == g and r.layer is not None})
        for layer in layers:
            null = summary.row(g, "null_p95", layer)
            null_text = f"{null.mean:.4f}" if null and null.n else "-"
            lines.append([
                _cell(g), str(layer), _interval_text(summary.row(g, "nmi", layer), ".4f"),
                null_text, _interval_text(summary.row(g, "token_id_share", layer), ".0f", 100, "%"),
                _runs_above(summary.row(g, "above_null", layer)),
                _runs_above(summary.row(g, "cond_mi_above_null", layer)),
            ])  # fmt: skip
    header = ["group", "layer", "NMI mean [95% CI]", "null p95 (mean)",
              "token-id share mean [95% CI]", "runs: NMI above null",
              "runs: cond. MI above its null"]  # fmt: skip
    return _table(header, lines) if lines else []


def _loss_domains(summary: Summary, suffix: str) -> list[str]:
    """The domains of the ``loss_<domain><suffix>`` rows, in row order (suffix "" or
    ``_minus_dense``)."""
    seen: dict[str, None] = {}
    for r in summary.rows:
        m = r.metric
        diff = m.endswith("_minus_dense")
        if m.startswith("loss_") and m != "loss_minus_dense" and diff == bool(suffix):
            seen.setdefault(m.removeprefix("loss_").removesuffix(suffix), None)
    return list(seen)


def _loss_table(summary: Summary, suffix: str = "") -> list[str]:
    domains = _loss_domains(summary, suffix)
    overall = "loss" + suffix
    groups = [g for g in summary.groups if summary.row(g, overall)]
    twin = ["dense twin"] if suffix else []
    lines = [
        [_cell(g)] + [_cell(summary.groups[g].dense_twin or "")] * len(twin)
        + [_interval_text(summary.row(g, f"loss_{d}{suffix}"), ".3f") for d in domains]
        + [_interval_text(summary.row(g, overall), ".3f")]
        for g in groups
    ]  # fmt: skip
    header = ["group", *twin, *[_cell(d) for d in domains], "overall (token-weighted)"]
    return _table(header, lines) if lines else []


def render_markdown(summary: Summary) -> str:
    """summary.md's text: a line on n, intervals and checkpoints, then the routing, held-out
    loss (nats) and MoE - dense tables (those that have rows). NMI 4 decimals, shares in %,
    losses 3 decimals; ``(n=1)`` where a single run gives no interval."""
    runs = ", ".join(f"`{_cell(g)}` {len(i.runs)}" for g, i in summary.groups.items())
    out = [
        f"Runs per group (n): {runs}. Values at each run's final checkpoint. Cells: mean "
        f"[{CONFIDENCE:.0%} interval]; {INTERVAL_TEXT} `(n=1)`: one run, no interval.",
        "",
    ]
    sections = [
        ("Routing (eval mode, fixed probe; NMI = I(domain; expert) / H(domain); token-id share:"
         " the part of the NMI token identity alone explains)",
         _routing_table(summary)),
        ("Held-out loss (nats per token)", _loss_table(summary)),
        ("MoE - dense held-out loss (nats per token; Welch t / bootstrap interval)",
         _loss_table(summary, "_minus_dense")),
    ]  # fmt: skip
    for title, table in sections:
        if table:
            out += [f"## {title}", "", *table, ""]
    if summary.warnings:
        out += ["## Warnings", "", *[f"- {w}" for w in summary.warnings], ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- files


def _nan_to_none(value: object) -> object:
    """Non-finite floats (NaN, a diverged run's inf) as None: JSON has no NaN."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _csv_cell(value: object) -> object:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _json_document(summary: Summary) -> dict:
    rows = [{k: _nan_to_none(v) for k, v in asdict(r).items()} for r in summary.rows]
    return {
        "rows": rows,
        "groups": {g: asdict(info) for g, info in summary.groups.items()},
        "confidence": CONFIDENCE,
        "interval": INTERVAL_TEXT,
        "warnings": summary.warnings,
    }


def _write_text(path: Path, text: str) -> Path:
    """Write ``text`` whole: a temp file in the same folder, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _write_figures(results: Sequence[RunResult], summary: Summary, out_dir: Path) -> list[Path]:
    # Imported here: the figures need matplotlib, the rows do not.

    figures = []
    if any(info.moe for info in summary.groups.values()):
        figures.append(sweep_plots.plot_sweep_emergence(results, out_dir / "emergence.png"))
        figures.append(sweep_plots.plot_sweep_heatmaps(results, out_dir / "heatmaps.png"))
    if any(r.metric == "loss" for r in summary.rows):
        figures.append(sweep_plots.plot_held_out_loss(results, out_dir / "held_out_loss.png"))
    return figures


def write_summary(
    results: Sequence[RunResult], out_dir: str | os.PathLike, figures: bool = True
) -> SummaryFiles:
    """Write summary.csv (NaN as empty cells), summary.json (NaN as null), summary.md and,
    unless ``figures`` is False, emergence.png and heatmaps.png (with MoE groups) and
    held_out_loss.png (with losses) into ``out_dir``. Returns the paths and the warnings."""
    out = Path(out_dir)
    summary = summarize(results)
    csv_rows = [{k: _csv_cell(v) for k, v in asdict(r).items()} for r in summary.rows]
    csv_path = write_table(out / "summary.csv", COLUMNS, csv_rows)
    text = json.dumps(_json_document(summary), indent=2, allow_nan=False)
    json_path = _write_text(out / "summary.json", text + "\n")
    md_path = _write_text(out / "summary.md", render_markdown(summary))
    pngs = _write_figures(results, summary, out) if figures else []
    return SummaryFiles(csv_path, json_path, md_path, pngs, list(summary.warnings))
