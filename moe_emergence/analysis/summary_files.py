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
    KNOCKOUT_FAMILY,
    POWER,
    Summary,
    SummaryRow,
    Test,
    knockout_metric,
    summarize,
)
from moe_emergence.analysis.tables import write_table
from moe_emergence.files import write_atomic

__all__ = ["FEW_SEEDS", "SummaryFiles", "render_markdown", "write_summary"]

FEW_SEEDS = 5  # below this many runs, summary.md shows the per-seed values beside the mean
MAX_LISTED = 24  # a Holm family of at most this many t-tests lists them in summary.md
NAN = float("nan")
METRIC_NAMES = {"nmi": "NMI", "domain_gain": "held-out domain gain (nats)"}
INTERVAL_TEXT = (
    f"{CONFIDENCE:.0%} interval of the mean over a group's runs (seeds): Student's t with n - 1 "
    "df (paired differences: per shared seed, pairs - 1 df; unpaired differences: Welch's df; "
    "fold changes: the t-interval of the per-seed log-ratios, back-transformed); a single run "
    "has none. A t-interval of a non-negative score (NMI, MI) can reach below 0 with few "
    "seeds; it is not clipped."
)
P_TEXT = (
    "p: two-sided t-test (fold change: of the log-ratios against 0, i.e. no change); each test "
    "belongs to exactly one Holm family, declared in the Holm families section, and appears in "
    "one table, so it has one p_holm. detectable: the smallest effect the test detects with "
    f"{POWER:.0%} power at {ALPHA} / m (Holm's first threshold in its family of m tests), given "
    "the observed seed-to-seed SD of its per-seed values (noncentral t)."
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


def _mean_text(row: SummaryRow | None, fmt: str = ".4f") -> str:
    return "-" if row is None or row.n == 0 else _num(row.mean, fmt)


def _null_text(summary: Summary, group: str, layer: int, prefix: str) -> str:
    """``p95 (mean)`` of a score's null: ``<prefix>_p95`` and ``<prefix>_mean`` rows."""
    p95, mean = (
        summary.row(group, f"{prefix}_p95", layer),
        summary.row(group, f"{prefix}_mean", layer),
    )
    if p95 is None or p95.n == 0 or math.isnan(p95.mean):
        return "-"
    return f"{p95.mean:.4f} ({_mean_text(mean)})"


def _fold_text(value: float) -> str:
    return "-" if math.isnan(value) else f"x{value:.3g}"


def _moe_layers(summary: Summary) -> list[tuple[str, int]]:
    return [
        (g, layer)
        for g, info in summary.groups.items()
        if info.moe
        for layer in sorted({r.layer for r in summary.rows if r.group == g and r.layer is not None})
    ]


def _names(summary: Summary) -> dict[str, str]:
    """Group key -> the condition as people say it (:func:`condition_labels`); a contrast's
    key -> ``"<A> - <B>"`` in those names; an initial model's -> its groups' names joined."""
    names = condition_labels(summary.groups)
    for label, (a, b) in {**summary.contrasts, **summary.primary}.items():
        names[label] = f"{names.get(a, a)} - {names.get(b, b)}"
    for label, model in summary.initial_models.items():
        names[label] = " / ".join(names.get(g, g) for g in model.groups)
    return names


def _primary_table(summary: Summary) -> list[str]:
    """top-1 - frozen router per pair x layer x metric: both levels, the difference, p."""
    names, lines = _names(summary), []
    for label, (a, b) in summary.primary.items():
        for r in summary.rows:
            if r.group != label:
                continue
            fmt = ".4f"
            lines.append(
                [
                    _cell(names[label]),
                    str(r.layer),
                    METRIC_NAMES.get(r.metric, r.metric),
                    _interval_text(summary.row(a, r.metric, r.layer), fmt),
                    _interval_text(summary.row(b, r.metric, r.layer), fmt),
                    _interval_text(r, fmt),
                    r.method,
                    _p_text(r.p),
                    _p_text(r.p_holm),
                    _num(r.detectable, fmt),
                ]
            )
    header = [
        "A - B",
        "layer",
        "metric",
        "A (final)",
        "B (final)",
        "A - B [95% CI]",
        "method",
        "p",
        "p_holm",
        f"detectable ({POWER:.0%} power)",
    ]
    return _table(header, lines) if lines else []


def _change_table(summary: Summary) -> list[str]:
    """Per MoE group x layer: NMI step 0, final, the raw change, the fold change test."""
    names, lines = _names(summary), []
    for g, layer in _moe_layers(summary):
        fold = summary.row(g, "nmi_fold_change", layer)
        lines.append(
            [
                _cell(names[g]),
                str(layer),
                _interval_text(summary.row(g, "nmi_step0", layer), ".4f"),
                _interval_text(summary.row(g, "nmi", layer), ".4f"),
                _interval_text(summary.row(g, "nmi_change", layer), ".4f"),
                _interval_text(fold, ".3g"),
                _p_pair(fold),
                _fold_text(fold.detectable if fold is not None else NAN),
            ]
        )
    header = [
        "condition",
        "layer",
        "NMI step 0",
        "NMI final",
        "change (descriptive)",
        "fold change [95% CI]",
        "p / p_holm",
        f"detectable fold ({POWER:.0%} power)",
    ]
    return _table(header, lines) if lines else []


def _power_line(summary: Summary) -> list[str]:
    """The design's power for the primary test of change from step 0."""
    family = summary.family("fold_change")
    if family is None or not family.m or family.n_seeds < 2:
        return []
    return [
        f"Power of the primary test: {family.m} fold-change tests in one Holm family, so a "
        f"single true change must reach p < {ALPHA}/{family.m} = {family.threshold:.3g}. With "
        f"n = {family.n_seeds} seeds and the observed seed-to-seed SD of the log-ratios, pooled "
        f"over the family (root mean square of each test's SD) = {family.pooled_sd:.3g}, the "
        f"smallest fold change detected with {POWER:.0%} power is "
        f"{_fold_text(family.detectable)} (two-sided one-sample t on the log-ratios, n - 1 df; "
        "power from the noncentral t). Each row's own figure, from its own SD, is in the last "
        "column.",
        "",
    ]


def _primary_power_lines(summary: Summary) -> list[str]:
    """The same for each primary-contrast family: the smallest difference it detects."""
    lines = []
    for name, what in (("primary_nmi", "NMI"), ("primary_domain_gain", "domain gain (nats)")):
        family = summary.family(name)
        if family is None or not family.m or family.n_seeds < 2:
            continue
        lines.append(
            f"Power of `{name}`: {family.m} tests (layers), Holm's first threshold "
            f"{ALPHA}/{family.m} = {family.threshold:.3g}; at n = {family.n_seeds} seed pairs and "
            f"the observed SD of the paired differences (pooled over the family) "
            f"{family.pooled_sd:.3g}, the smallest {what} difference detected with {POWER:.0%} "
            f"power is {_num(family.detectable, '.3g')} (noncentral t)."
        )
    return [*lines, ""] if lines else []


def _run_change_table(summary: Summary) -> list[str]:
    """Each run's NMI change from step 0 with its document-paired probe interval."""
    names, lines = _names(summary), []
    for g, layer in _moe_layers(summary):
        rows = {
            m: summary.row(g, m, layer)
            for m in ("nmi_step0", "nmi", "nmi_change", "nmi_change_low", "nmi_change_high")
        }
        if any(r is None for r in rows.values()):
            continue
        approximate = summary.row(g, "nmi_interval_approximate", layer)
        for i, seed in enumerate(rows["nmi"].seeds):
            v = {m: r.values[i] if i < len(r.values) else NAN for m, r in rows.items()}
            if math.isnan(v["nmi_step0"]):
                continue
            interval = f"[{_num(v['nmi_change_low'], '.4f')}, {_num(v['nmi_change_high'], '.4f')}]"
            if approximate is not None and i < len(approximate.values) and approximate.values[i]:
                interval += " approx."
            lines.append(
                [
                    _cell(names[g]),
                    str(seed),
                    str(layer),
                    _num(v["nmi_step0"], ".4f"),
                    _num(v["nmi"], ".4f"),
                    f"{_num(v['nmi_change'], '.4f')} {interval}",
                ]
            )
    header = ["condition", "seed", "layer", "NMI step 0", "NMI final", "change [95% probe CI]"]
    note = (
        "approx.: an interval whose coverage may fall below 93% on this probe (not size-matched, "
        "or under 18 documents per domain; docs/method.md)."
    )
    return [*_table(header, lines), "", note] if lines else []


def _routing_table(summary: Summary) -> list[str]:
    names, lines = _names(summary), []
    for g, layer in _moe_layers(summary):
        lines.append(
            [
                _cell(names[g]),
                str(layer),
                _interval_text(summary.row(g, "nmi", layer), ".4f"),
                _null_text(summary, g, layer, "null"),
                _runs_above(summary.row(g, "above_null", layer)),
                _interval_text(summary.row(g, "token_id_nmi", layer), ".4f"),
                _interval_text(summary.row(g, "nmi_share_of_domain_router", layer), ".3f"),
            ]
        )
    header = [
        "condition",
        "layer",
        "NMI final",
        "null p95 (mean): chance",
        "runs > null",
        "token-id NMI",
        "share of domain router",
    ]
    return _table(header, lines) if lines else []


def _gains_table(summary: Summary) -> list[str]:
    names, lines = _names(summary), []
    for g, layer in _moe_layers(summary):
        row = lambda metric, g=g, layer=layer: summary.row(g, metric, layer)  # noqa: E731
        lines.append(
            [
                _cell(names[g]),
                str(layer),
                _interval_text(row("domain_gain"), ".4f"),
                _null_text(summary, g, layer, "domain_gain_null"),
                _runs_above(row("domain_gain_above_null")),
                _interval_text(row("domain_gain_share_of_domain_router"), ".3f"),
                _interval_text(row("domain_beyond_token_gain"), ".4f"),
                _null_text(summary, g, layer, "domain_beyond_token_gain_null"),
                _runs_above(row("domain_beyond_token_above_null")),
            ]
        )
    header = [
        "condition",
        "layer",
        "domain gain",
        "null p95 (mean): chance",
        "runs > null",
        "share of domain router",
        "domain beyond token",
        "null p95 (mean): chance",
        "runs > null",
    ]
    return _table(header, lines) if lines else []


def _token_table(summary: Summary) -> list[str]:
    names, lines = _names(summary), []
    for g, layer in _moe_layers(summary):
        row = lambda metric, g=g, layer=layer: summary.row(g, metric, layer)  # noqa: E731
        lines.append(
            [
                _cell(names[g]),
                str(layer),
                _interval_text(row("token_gain"), ".4f"),
                _null_text(summary, g, layer, "token_gain_null"),
                f"{_mean_text(row('token_gain_ref_domain'))} / "
                f"{_mean_text(row('token_gain_ref_token'))}",
                _interval_text(row("cond_mi_excess"), ".4f"),
                _runs_above(row("cond_mi_above_null")),
            ]
        )
    header = [
        "condition",
        "layer",
        "token gain",
        "null p95 (mean): chance",
        "references: domain router / token router",
        "cond. MI excess over its null mean (nats)",
        "runs > null",
    ]
    return _table(header, lines) if lines else []


def _specialisation_table(summary: Summary) -> list[str]:
    """The field's metrics beside their chance levels (rows of summary.SPECIALISATION_METRICS)."""
    names, lines = _names(summary), []
    for g, layer in _moe_layers(summary):
        row = lambda metric, g=g, layer=layer: summary.row(g, metric, layer)  # noqa: E731
        if row("repetition") is None:
            continue
        pairs = [
            ("saturation_top1_mid", "saturation_top1_chance_mid"),
            ("coactivation_strongest", "coactivation_strongest_chance"),
            ("repetition", "repetition_chance"),
            ("repetition_topk", "repetition_topk_null_mean"),
            ("vocab_spec", "vocab_spec_chance"),
        ]
        cells = [f"{_mean_text(row(a), '.3f')} ({_mean_text(row(b), '.3f')})" for a, b in pairs]
        lines.append(
            [
                _cell(names[g]),
                str(layer),
                *cells,
                _mean_text(row("expert_tokens_replicated"), ".2f"),
            ]
        )
    header = [
        "condition",
        "layer",
        "saturation top-1, mid (chance)",
        "strongest co-activation (chance)",
        "repetition (chance)",
        "top-k sets meet (shuffle)",
        "vocabulary spec. (chance)",
        "token lists confirmed",
    ]
    return _table(header, lines) if lines else []


def _step0_table(summary: Summary) -> list[str]:
    names, lines = _names(summary), []
    for label, model in summary.initial_models.items():
        layers = sorted({r.layer for r in summary.rows if r.group == label and r.layer is not None})
        for layer in layers:
            row = lambda metric, label=label, layer=layer: summary.row(label, metric, layer)  # noqa: E731
            lines.append(
                [
                    _cell(names[label]),
                    ", ".join(map(str, model.seeds)),
                    str(layer),
                    _interval_text(row("nmi"), ".4f"),
                    _runs_above(row("above_null")),
                    _interval_text(row("domain_gain"), ".4f"),
                    _runs_above(row("domain_gain_above_null")),
                    _runs_above(row("domain_beyond_token_above_null")),
                    _interval_text(row("token_id_nmi"), ".4f"),
                    _runs_above(row("cond_mi_above_null")),
                ]
            )
    header = [
        "initial model of",
        "seeds",
        "layer",
        "NMI step 0",
        "runs > null",
        "domain gain",
        "runs > null",
        "domain beyond token: runs > null",
        "token-id NMI",
        "cond. MI: runs > null",
    ]
    return _table(header, lines) if lines else []


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
    """(held-out loss contrasts, NMI-change contrasts) of the pairs of groups."""
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


def _knockout_cells(summary: Summary) -> list[tuple[str, int, str, list[str]]]:
    """(group, layer, removed domain D, measured domains: D first, then the others in row
    order) of the knock-out rows."""
    share = knockout_metric("share", "", "")
    cells = []
    for r in summary.rows:
        if r.metric.startswith(share) and r.layer is not None:
            removed = r.metric.removeprefix(share)
            prefix = knockout_metric("preferred", removed, "")
            measured = [
                q.metric.removeprefix(prefix)
                for q in summary.rows
                if (q.group, q.layer) == (r.group, r.layer) and q.metric.startswith(prefix)
            ]
            measured.sort(key=lambda m: m != removed)
            cells.append((r.group, r.layer, removed, measured))
    return cells


def _knockout_section(summary: Summary) -> tuple[list[str], list[str]]:
    """(the table: per condition, layer, removed domain and measured domain, the loss change
    with the domain's preferred expert removed, with a control removed, and their difference,
    with p on the domain's own; one sentence per condition x layer x removed domain)."""
    names, lines, sentences = _names(summary), [], []
    for group, layer, removed, measured in _knockout_cells(summary):
        share = summary.row(group, knockout_metric("share", removed, ""), layer)
        rows = {
            (kind, m): summary.row(group, knockout_metric(kind, removed, m), layer)
            for m in measured
            for kind in ("preferred", "control", "excess")
        }
        for m in measured:
            lines.append(
                [
                    _cell(names.get(group, group)),
                    str(layer),
                    f"{_cell(removed)} ({_mean_text(share, '.0%')} of its tokens)",
                    _cell(m),
                    _interval_text(rows["preferred", m], ".3f"),
                    _interval_text(rows["control", m], ".3f"),
                    _interval_text(rows["excess", m], ".3f"),
                    _p_pair(rows["excess", m]) if m == removed else "-",
                ]
            )
        costs = [f"{m} {_mean_text(rows['preferred', m], '.3f')}" for m in measured]
        control = summary.row(group, knockout_metric("control", removed, removed), layer)
        excess = summary.row(group, knockout_metric("excess", removed, removed), layer)
        sentences.append(
            f"- {_cell(names.get(group, group))}: removing {removed}'s expert (layer {layer}) "
            f"costs {costs[0]} nats per token"
            + (f" and {', '.join(costs[1:])}" if len(costs) > 1 else "")
            + f"; removing a load-matched control costs {removed} "
            f"{_mean_text(control, '.3f')}; preferred minus control on {removed}: "
            f"{_interval_text(excess, '.3f')}."
        )
    header = [
        "condition",
        "layer",
        "expert of (its share)",
        "measured",
        "removing it",
        "removing a control",
        "preferred - control [95% CI]",
        "p / p_holm",
    ]
    if not lines:
        return [], []
    note = (
        "Each run removes its own domain's expert (expert numbers are arbitrary per run); the "
        "control is the expert, among those the domain does not prefer, whose load on the "
        "held-out set is closest. p: one-sample t over seeds of preferred - control on the "
        "domain's own loss. Each run's document intervals: runs/<run>/knockout.csv."
    )
    return _table(header, lines), [note, "", *sentences]


def _test_name(test: Test, names: dict[str, str]) -> str:
    """``<condition> layer <L> [<metric>] [seed <s>]`` of one test of a family."""
    group, layer, metric, seed = test
    text = names.get(group, group)
    text += f" layer {layer}" if layer is not None else f" {metric}"
    if layer is not None and metric.startswith(knockout_metric("excess", "", "")):
        text += f" {metric}"  # several domains per layer
    return text + (f" seed {seed}" if seed is not None else "")


def _families_section(summary: Summary) -> list[str]:
    """Each Holm family once: name, m, Holm's first threshold, what it holds, its tests (when
    they are few), its survivors, or that none passes."""
    names, out = _names(summary), []
    for f in summary.families:
        if not f.m:
            continue
        line = f"- `{f.name}` (m = {f.m}; Holm's first threshold {ALPHA}/{f.m} = {f.threshold:.3g}"
        if not math.isnan(f.resolution):
            line += f"; smallest possible permutation p 1/(1+K) = {f.resolution:.3g}"
        line += f"): {f.title}."
        if len(f.tests) <= MAX_LISTED and f.tests[0][3] is None:
            line += " Tests: " + "; ".join(_cell(_test_name(t, names)) for t in f.tests) + "."
        if f.survivors:
            shown = [_cell(_test_name(t, names)) for t in f.survivors]
            line += f" Pass Holm at {ALPHA} ({len(shown)}): " + "; ".join(shown) + "."
        else:
            unit = "run" if f.tests[0][3] is not None else "test"
            line += f" No {unit} passes Holm (smallest p {_p_text(f.smallest_p)})."
        out.append(line)
    return out


def render_markdown(summary: Summary) -> str:
    """summary.md's text: a line on n, the unit of replication, intervals and p-values; the
    primary contrast (top-1 - frozen router) first; the change from step 0 (the primary test
    per condition and layer, with the design's power), each run's change; routing, held-out
    gains and token controls beside their nulls; step 0 once per initial model; held-out loss,
    MoE - dense, the knock-out by domain (table and one sentence per condition x layer x
    domain) and direct contrasts; the Holm families, each declared once; warnings. NMI 4
    decimals, losses 3; per-seed values in parentheses below :data:`FEW_SEEDS` runs;
    ``(n=1)`` where a single run gives no interval."""
    names = _names(summary)
    runs = ", ".join(f"{_cell(names[g])} {len(i.runs)}" for g, i in summary.groups.items())
    out = [
        f"Runs per group (n): {runs}. Values at each run's final checkpoint; step 0 where a run "
        "has a step-0 checkpoint. Unit of replication: the seed across runs (every interval and "
        "p below is over a group's runs); the document inside a run (the permutation nulls and "
        f"each run's probe intervals). Cells: mean [{CONFIDENCE:.0%} interval] "
        f"(per-seed values, seed order, when n < {FEW_SEEDS}); {INTERVAL_TEXT} {P_TEXT} "
        f"Runs > null: runs whose document-level permutation p-value is below {ALPHA} after "
        "Holm over the column's family. `(n=1)`: one run, no interval.",
        "",
    ]
    loss_contrasts, nmi_contrasts = _contrast_tables(summary)
    knockout_table, knockout_sentences = _knockout_section(summary)
    sections = [
        (
            "Primary: top-1 - frozen router at the final step (paired by seed; Holm over layers, "
            "one family per metric)",
            _primary_table(summary),
            _primary_power_lines(summary),
        ),
        (
            "Change from step 0: NMI final / NMI step 0 per seed, the primary test per condition "
            "and layer (family fold_change)",
            _change_table(summary),
            _power_line(summary),
        ),
        (
            "Each run's change from step 0 (NMI; probe interval: the same documents resampled "
            "for both checkpoints)",
            _run_change_table(summary),
            [],
        ),
        (
            "Routing: NMI = I(domain; expert) / H(domain), eval mode, fixed probe, final step",
            _routing_table(summary),
            [],
        ),
        (
            "Held-out gains (nats per token; fitted on one half of the documents, scored on the "
            "other), final step",
            _gains_table(summary),
            [],
        ),
        ("Token controls, final step", _token_table(summary), []),
        (
            "The field's specialisation metrics, final step (saturation: middle checkpoint), "
            "each beside its chance level (docs/method.md)",
            _specialisation_table(summary),
            [],
        ),
        ("Step 0, once per initial model", _step0_table(summary), []),
        ("Held-out loss (nats per token)", _loss_table(summary), []),
        (
            "MoE - dense held-out loss (nats per token; family minus_dense)",
            _minus_dense_table(summary),
            [],
        ),
        (
            "Knock-out by domain: held-out loss change (nats per token) when a domain's most "
            "used expert is removed at one layer, against a load-matched control (final step; "
            f"family {KNOCKOUT_FAMILY})",
            knockout_table,
            knockout_sentences,
        ),
        (
            "Direct contrasts: held-out loss A - B (nats per token; family contrast_loss)",
            loss_contrasts,
            [],
        ),
        (
            "Direct contrasts: NMI change from step 0, A - B (family contrast_nmi_change)",
            nmi_contrasts,
            [],
        ),
    ]
    for title, table, after in sections:
        if table:
            out += [f"## {title}", "", *table, "", *after]
    families = _families_section(summary)
    if families:
        out += ["## Holm families", "", *families, ""]
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
        "names": _names(summary),  # group, contrast or initial model key -> as summary.md names it
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
