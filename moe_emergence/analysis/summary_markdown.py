"""summary.md (:func:`render_markdown`): the preamble (n, the unit of replication, intervals
and p-values), the tables of :mod:`moe_emergence.analysis.summary_tables` in order, the
knock-out section, the Holm families and the warnings."""

from __future__ import annotations

import math

from moe_emergence.analysis.summary_cells import (
    FEW_SEEDS,
    cell,
    display_names,
    interval_text,
    md_table,
    mean_text,
    p_pair,
    p_text,
)
from moe_emergence.analysis.summary_knockout import KNOCKOUT_FAMILY, knockout_metric
from moe_emergence.analysis.summary_rows import ALPHA, CONFIDENCE, POWER, Summary, Test
from moe_emergence.analysis.summary_tables import (
    change_table,
    contrast_tables,
    gains_table,
    loss_table,
    minus_dense_table,
    power_line,
    primary_power_lines,
    primary_table,
    routing_table,
    run_change_table,
    specialisation_table,
    step0_table,
    token_table,
)

MAX_LISTED = 24  # a Holm family of at most this many t-tests lists them in summary.md
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
    names, lines, sentences = display_names(summary), [], []
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
                    cell(names.get(group, group)),
                    str(layer),
                    f"{cell(removed)} ({mean_text(share, '.0%')} of its tokens)",
                    cell(m),
                    interval_text(rows["preferred", m], ".3f"),
                    interval_text(rows["control", m], ".3f"),
                    interval_text(rows["excess", m], ".3f"),
                    p_pair(rows["excess", m]) if m == removed else "-",
                ]
            )
        costs = [f"{m} {mean_text(rows['preferred', m], '.3f')}" for m in measured]
        control = summary.row(group, knockout_metric("control", removed, removed), layer)
        excess = summary.row(group, knockout_metric("excess", removed, removed), layer)
        sentences.append(
            f"- {cell(names.get(group, group))}: removing {removed}'s expert (layer {layer}) "
            f"costs {costs[0]} nats per token"
            + (f" and {', '.join(costs[1:])}" if len(costs) > 1 else "")
            + f"; removing a load-matched control costs {removed} "
            f"{mean_text(control, '.3f')}; preferred minus control on {removed}: "
            f"{interval_text(excess, '.3f')}."
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
    return md_table(header, lines), [note, "", *sentences]


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
    names, out = display_names(summary), []
    for f in summary.families:
        if not f.m:
            continue
        line = f"- `{f.name}` (m = {f.m}; Holm's first threshold {ALPHA}/{f.m} = {f.threshold:.3g}"
        if not math.isnan(f.resolution):
            line += f"; smallest possible permutation p 1/(1+K) = {f.resolution:.3g}"
        line += f"): {f.title}."
        if len(f.tests) <= MAX_LISTED and f.tests[0][3] is None:
            line += " Tests: " + "; ".join(cell(_test_name(t, names)) for t in f.tests) + "."
        if f.survivors:
            shown = [cell(_test_name(t, names)) for t in f.survivors]
            line += f" Pass Holm at {ALPHA} ({len(shown)}): " + "; ".join(shown) + "."
        else:
            unit = "run" if f.tests[0][3] is not None else "test"
            line += f" No {unit} passes Holm (smallest p {p_text(f.smallest_p)})."
        out.append(line)
    return out


# section -> its heading in summary.md, in the order the sections are shown
TITLES = {
    "primary": (
        "Primary: top-1 - frozen router at the final step (paired by seed; Holm over layers, "
        "one family per metric)"
    ),
    "change": (
        "Change from step 0: NMI final / NMI step 0 per seed, the primary test per condition "
        "and layer (family fold_change)"
    ),
    "run_change": (
        "Each run's change from step 0 (NMI; probe interval: the same documents resampled "
        "for both checkpoints)"
    ),
    "routing": "Routing: NMI = I(domain; expert) / H(domain), eval mode, fixed probe, final step",
    "gains": (
        "Held-out gains (nats per token; fitted on one half of the documents, scored on the "
        "other), final step"
    ),
    "token": "Token controls, final step",
    "specialisation": (
        "The field's specialisation metrics, final step (saturation: middle checkpoint), "
        "each beside its chance level (docs/method.md)"
    ),
    "step0": "Step 0, once per initial model",
    "loss": "Held-out loss (nats per token)",
    "minus_dense": "MoE - dense held-out loss (nats per token; family minus_dense)",
    "knockout": (
        "Knock-out by domain: held-out loss change (nats per token) when a domain's most "
        "used expert is removed at one layer, against a load-matched control (final step; "
        f"family {KNOCKOUT_FAMILY})"
    ),
    "loss_contrasts": (
        "Direct contrasts: held-out loss A - B (nats per token; family contrast_loss)"
    ),
    "nmi_contrasts": "Direct contrasts: NMI change from step 0, A - B (family contrast_nmi_change)",
}


def _preamble(summary: Summary) -> list[str]:
    """The first paragraph: n per group, the unit of replication, intervals, p-values."""
    names = display_names(summary)
    runs = ", ".join(f"{cell(names[g])} {len(i.runs)}" for g, i in summary.groups.items())
    return [
        f"Runs per group (n): {runs}. Values at each run's final checkpoint; step 0 where a run "
        "has a step-0 checkpoint. Unit of replication: the seed across runs (every interval and "
        "p below is over a group's runs); the document inside a run (the permutation nulls and "
        f"each run's probe intervals). Cells: mean [{CONFIDENCE:.0%} interval] "
        f"(per-seed values, seed order, when n < {FEW_SEEDS}); {INTERVAL_TEXT} {P_TEXT} "
        f"Runs > null: runs whose document-level permutation p-value is below {ALPHA} after "
        "Holm over the column's family. `(n=1)`: one run, no interval.",
        "",
    ]


def _sections(summary: Summary) -> dict[str, tuple[list[str], list[str]]]:
    """Section (a :data:`TITLES` key) -> (its table, the lines after it), in TITLES order."""
    loss_contrasts, nmi_contrasts = contrast_tables(summary)
    return {
        "primary": (primary_table(summary), primary_power_lines(summary)),
        "change": (change_table(summary), power_line(summary)),
        "run_change": (run_change_table(summary), []),
        "routing": (routing_table(summary), []),
        "gains": (gains_table(summary), []),
        "token": (token_table(summary), []),
        "specialisation": (specialisation_table(summary), []),
        "step0": (step0_table(summary), []),
        "loss": (loss_table(summary), []),
        "minus_dense": (minus_dense_table(summary), []),
        "knockout": _knockout_section(summary),
        "loss_contrasts": (loss_contrasts, []),
        "nmi_contrasts": (nmi_contrasts, []),
    }


def render_markdown(summary: Summary) -> str:
    """summary.md's text: a line on n, the unit of replication, intervals and p-values; the
    primary contrast (top-1 - frozen router) first; the change from step 0 (the primary test
    per condition and layer, with the design's power), each run's change; routing, held-out
    gains and token controls beside their nulls; step 0 once per initial model; held-out loss,
    MoE - dense, the knock-out by domain (table and one sentence per condition x layer x
    domain) and direct contrasts; the Holm families, each declared once; warnings. NMI 4
    decimals, losses 3; per-seed values in parentheses below :data:`FEW_SEEDS` runs;
    ``(n=1)`` where a single run gives no interval."""
    out = _preamble(summary)
    for name, (table, after) in _sections(summary).items():
        if table:
            out += [f"## {TITLES[name]}", "", *table, "", *after]
    families = _families_section(summary)
    if families:
        out += ["## Holm families", "", *families, ""]
    if summary.warnings:
        out += ["## Warnings", "", *[f"- {w}" for w in summary.warnings], ""]
    return "\n".join(out)
