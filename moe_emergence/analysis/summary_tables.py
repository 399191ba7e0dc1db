"""The tables of summary.md, one function each (a list of markdown lines, empty when there is
nothing to show): the primary contrast, the change from step 0 and its power, each run's
change, routing, held-out gains, token controls, the field's specialisation metrics, step 0,
held-out loss, MoE - dense and the direct contrasts."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

from moe_emergence.analysis.summary_cells import (
    NAN,
    cell,
    display_names,
    fold_text,
    interval_text,
    md_table,
    mean_text,
    moe_layers,
    null_text,
    num,
    p_pair,
    p_text,
    runs_above,
)
from moe_emergence.analysis.summary_rows import ALPHA, POWER, Summary, SummaryRow

METRIC_NAMES = {"nmi": "NMI", "domain_gain": "held-out domain gain (nats)"}
# one column of a per MoE group x layer table: (its header, the cell of (summary, group, layer))
Column = tuple[str, Callable[[Summary, str, int], str]]


def _of(metric: str, text: Callable[[SummaryRow | None], str]) -> Callable[..., str]:
    """The cell ``text(row)`` of the group's ``metric`` row at the layer."""
    return lambda summary, g, layer: text(summary.row(g, metric, layer))


def _interval(metric: str, fmt: str) -> Callable[..., str]:
    return _of(metric, lambda row: interval_text(row, fmt))


def _mean(metric: str, fmt: str = ".4f") -> Callable[..., str]:
    return _of(metric, lambda row: mean_text(row, fmt))


def _null(prefix: str) -> Callable[..., str]:
    return lambda summary, g, layer: null_text(summary, g, layer, prefix)


def _two(first: str, second: str, fmt: str, form: str) -> Callable[..., str]:
    """Two means in ``form`` (``"{} ({})"``: a value beside its chance level)."""
    return lambda *at: form.format(_mean(first, fmt)(*at), _mean(second, fmt)(*at))


def _beside(metric: str, chance: str) -> Callable[..., str]:
    """``value (chance)``: two means, 3 decimals."""
    return _two(metric, chance, ".3f", "{} ({})")


def _layer_table(summary: Summary, columns: Sequence[Column], needs: str = "") -> list[str]:
    """One line per MoE group x layer (with a ``needs`` row, when given): the condition, the
    layer, then ``columns``' cells. Empty without lines."""
    names, lines = display_names(summary), []
    for g, layer in moe_layers(summary):
        if not needs or summary.row(g, needs, layer) is not None:
            cells = [text(summary, g, layer) for _, text in columns]
            lines.append([cell(names[g]), str(layer), *cells])
    header = ["condition", "layer", *(name for name, _ in columns)]
    return md_table(header, lines) if lines else []


def primary_table(summary: Summary) -> list[str]:
    """top-1 - frozen router per pair x layer x metric: both levels, the difference, p."""
    names, lines = display_names(summary), []
    for label, (a, b) in summary.primary.items():
        for r in summary.rows:
            if r.group != label:
                continue
            fmt = ".4f"
            lines.append(
                [
                    cell(names[label]),
                    str(r.layer),
                    METRIC_NAMES.get(r.metric, r.metric),
                    interval_text(summary.row(a, r.metric, r.layer), fmt),
                    interval_text(summary.row(b, r.metric, r.layer), fmt),
                    interval_text(r, fmt),
                    r.method,
                    p_text(r.p),
                    p_text(r.p_holm),
                    num(r.detectable, fmt),
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
    return md_table(header, lines) if lines else []


def change_table(summary: Summary) -> list[str]:
    """Per MoE group x layer: NMI step 0, final, the raw change, the fold change test."""
    fold = "nmi_fold_change"
    detectable = _of(fold, lambda row: fold_text(row.detectable if row is not None else NAN))
    columns = [
        ("NMI step 0", _interval("nmi_step0", ".4f")),
        ("NMI final", _interval("nmi", ".4f")),
        ("change (descriptive)", _interval("nmi_change", ".4f")),
        ("fold change [95% CI]", _interval(fold, ".3g")),
        ("p / p_holm", _of(fold, p_pair)),
        (f"detectable fold ({POWER:.0%} power)", detectable),
    ]
    return _layer_table(summary, columns)


def power_line(summary: Summary) -> list[str]:
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
        f"{fold_text(family.detectable)} (two-sided one-sample t on the log-ratios, n - 1 df; "
        "power from the noncentral t). Each row's own figure, from its own SD, is in the last "
        "column.",
        "",
    ]


def primary_power_lines(summary: Summary) -> list[str]:
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
            f"power is {num(family.detectable, '.3g')} (noncentral t)."
        )
    return [*lines, ""] if lines else []


def run_change_table(summary: Summary) -> list[str]:
    """Each run's NMI change from step 0 with its document-paired probe interval."""
    names, lines = display_names(summary), []
    for g, layer in moe_layers(summary):
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
            interval = f"[{num(v['nmi_change_low'], '.4f')}, {num(v['nmi_change_high'], '.4f')}]"
            if approximate is not None and i < len(approximate.values) and approximate.values[i]:
                interval += " approx."
            lines.append(
                [
                    cell(names[g]),
                    str(seed),
                    str(layer),
                    num(v["nmi_step0"], ".4f"),
                    num(v["nmi"], ".4f"),
                    f"{num(v['nmi_change'], '.4f')} {interval}",
                ]
            )
    header = ["condition", "seed", "layer", "NMI step 0", "NMI final", "change [95% probe CI]"]
    note = (
        "approx.: an interval whose coverage may fall below 93% on this probe (not size-matched, "
        "or under 18 documents per domain; docs/method.md)."
    )
    return [*md_table(header, lines), "", note] if lines else []


def routing_table(summary: Summary) -> list[str]:
    columns = [
        ("NMI final", _interval("nmi", ".4f")),
        ("null p95 (mean): chance", _null("null")),
        ("runs > null", _of("above_null", runs_above)),
        ("token-id NMI", _interval("token_id_nmi", ".4f")),
        ("share of domain router", _interval("nmi_share_of_domain_router", ".3f")),
    ]
    return _layer_table(summary, columns)


def gains_table(summary: Summary) -> list[str]:
    columns = [
        ("domain gain", _interval("domain_gain", ".4f")),
        ("null p95 (mean): chance", _null("domain_gain_null")),
        ("runs > null", _of("domain_gain_above_null", runs_above)),
        ("share of domain router", _interval("domain_gain_share_of_domain_router", ".3f")),
        ("domain beyond token", _interval("domain_beyond_token_gain", ".4f")),
        ("null p95 (mean): chance", _null("domain_beyond_token_gain_null")),
        ("runs > null", _of("domain_beyond_token_above_null", runs_above)),
    ]
    return _layer_table(summary, columns)


def token_table(summary: Summary) -> list[str]:
    references = _two("token_gain_ref_domain", "token_gain_ref_token", ".4f", "{} / {}")
    columns = [
        ("token gain", _interval("token_gain", ".4f")),
        ("null p95 (mean): chance", _null("token_gain_null")),
        ("references: domain router / token router", references),
        ("cond. MI excess over its null mean (nats)", _interval("cond_mi_excess", ".4f")),
        ("runs > null", _of("cond_mi_above_null", runs_above)),
    ]
    return _layer_table(summary, columns)


def specialisation_table(summary: Summary) -> list[str]:
    """The field's metrics beside their chance levels (rows of
    summary_rows.SPECIALISATION_METRICS); a group x layer without them has no line."""
    columns = [
        (
            "saturation top-1, mid (chance)",
            _beside("saturation_top1_mid", "saturation_top1_chance_mid"),
        ),
        (
            "strongest co-activation (chance)",
            _beside("coactivation_strongest", "coactivation_strongest_chance"),
        ),
        ("repetition (chance)", _beside("repetition", "repetition_chance")),
        ("top-k sets meet (shuffle)", _beside("repetition_topk", "repetition_topk_null_mean")),
        ("vocabulary spec. (chance)", _beside("vocab_spec", "vocab_spec_chance")),
        ("token lists confirmed", _mean("expert_tokens_replicated", ".2f")),
    ]
    return _layer_table(summary, columns, needs="repetition")


def step0_table(summary: Summary) -> list[str]:
    names, lines = display_names(summary), []
    for label, model in summary.initial_models.items():
        layers = sorted({r.layer for r in summary.rows if r.group == label and r.layer is not None})
        for layer in layers:
            row = lambda metric, label=label, layer=layer: summary.row(label, metric, layer)  # noqa: E731
            lines.append(
                [
                    cell(names[label]),
                    ", ".join(map(str, model.seeds)),
                    str(layer),
                    interval_text(row("nmi"), ".4f"),
                    runs_above(row("above_null")),
                    interval_text(row("domain_gain"), ".4f"),
                    runs_above(row("domain_gain_above_null")),
                    runs_above(row("domain_beyond_token_above_null")),
                    interval_text(row("token_id_nmi"), ".4f"),
                    runs_above(row("cond_mi_above_null")),
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
    return md_table(header, lines) if lines else []


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


def loss_table(summary: Summary) -> list[str]:
    groups = [g for g in summary.groups if summary.row(g, "loss")]
    domains = _loss_domains(summary, groups)
    names = display_names(summary)
    lines = [
        [
            cell(names[g]),
            *[interval_text(summary.row(g, f"loss_{d}"), ".3f") for d in domains],
            interval_text(summary.row(g, "loss"), ".3f"),
        ]
        for g in groups
    ]
    header = ["condition", *[cell(d) for d in domains], "overall (token-weighted)"]
    return md_table(header, lines) if lines else []


def _difference_line(label: list[str], row: SummaryRow, fmt: str) -> list[str]:
    return [*label, interval_text(row, fmt), row.method, p_text(row.p), p_text(row.p_holm)]


def minus_dense_table(summary: Summary) -> list[str]:
    lines = []
    names = display_names(summary)
    for g, info in summary.groups.items():
        domains = _loss_domains(summary, [g], "_minus_dense")
        for d, metric in [
            *((d, f"loss_{d}_minus_dense") for d in domains),
            ("overall", "loss_minus_dense"),
        ]:
            if (row := summary.row(g, metric)) is not None:
                twin = info.dense_twin or ""
                label = [cell(names[g]), cell(names.get(twin, twin)), cell(d)]
                lines.append(_difference_line(label, row, ".3f"))
    header = ["condition", "dense twin", "domain", "MoE - dense [95% CI]", "method", "p", "p_holm"]
    return md_table(header, lines) if lines else []


def contrast_tables(summary: Summary) -> tuple[list[str], list[str]]:
    """(held-out loss contrasts, NMI-change contrasts) of the pairs of groups."""
    losses, changes = [], []
    names = display_names(summary)
    for label in summary.contrasts:
        domains = _loss_domains(summary, [label])
        for d, metric in [*((d, f"loss_{d}") for d in domains), ("overall", "loss")]:
            if (row := summary.row(label, metric)) is not None:
                losses.append(_difference_line([cell(names[label]), cell(d)], row, ".3f"))
        for r in summary.rows:
            if r.group == label and r.metric == "nmi_change":
                changes.append(_difference_line([cell(names[label]), str(r.layer)], r, ".4f"))
    tail = ["method", "p", "p_holm"]
    return (
        md_table(["A - B", "domain", "loss A - loss B [95% CI]", *tail], losses) if losses else [],
        md_table(["A - B", "layer", "NMI change A - B [95% CI]", *tail], changes)
        if changes
        else [],
    )
