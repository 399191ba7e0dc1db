"""The sweep summary's contrasts between groups: the primary pairs (top-1 minus its frozen
router, per layer), held-out loss differences (MoE - dense, and every other pair) and the
NMI-change contrasts of learned-router MoE groups."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

from moe_emergence.analysis.results import RunResult
from moe_emergence.analysis.summary_groups import is_moe, is_reference
from moe_emergence.analysis.summary_rows import PRIMARY_METRICS, SummaryRow
from moe_emergence.analysis.summary_values import (
    change_value,
    difference_row,
    domains_of,
    final_value,
    layers_of,
    loss_value,
    overall_loss,
)


def loss_differences(
    label: str, a: Sequence[RunResult], b: Sequence[RunResult], suffix: str, family: str
) -> list[SummaryRow]:
    """``loss_<domain><suffix>`` per domain both have, then ``loss<suffix>``: a minus b."""
    b_domains = set(domains_of(b))
    rows = [
        difference_row(label, None, f"loss_{d}{suffix}", a, b, loss_value(d), family)
        for d in domains_of(a)
        if d in b_domains
    ]
    if rows:
        rows.append(difference_row(label, None, f"loss{suffix}", a, b, overall_loss, family))
    return rows


def primary_rows(
    groups: Mapping[str, Sequence[RunResult]], pairs: Mapping[str, tuple[str, str]]
) -> list[SummaryRow]:
    rows = []
    for label, (a, b) in pairs.items():
        shared = sorted(set(layers_of(groups[a])) & set(layers_of(groups[b])))
        for metric in PRIMARY_METRICS:
            family = f"primary_{metric}"
            get = lambda layer, metric=metric: final_value(layer, metric)  # noqa: E731
            rows += [
                difference_row(label, layer, metric, groups[a], groups[b], get(layer), family)
                for layer in shared
            ]
    return rows


def _routing_contrast(a: str, b: str, groups: Mapping[str, Sequence[RunResult]]) -> bool:
    """Whether the NMI-change contrast of a and b is a test of its own: both MoE, neither a
    reference router."""
    return all(is_moe(groups[g]) and not is_reference(groups[g]) for g in (a, b))


def contrast_rows(
    groups: Mapping[str, Sequence[RunResult]],
    twins: Mapping[str, str | None],
    primary: Mapping[str, tuple[str, str]],
) -> tuple[list[SummaryRow], dict[str, tuple[str, str]]]:
    rows, contrasts = [], {}
    primary_pairs = {frozenset(pair) for pair in primary.values()}
    for a, b in itertools.combinations(sorted(groups), 2):
        label = f"{a} - {b}"
        mine = []
        if twins.get(a) != b and twins.get(b) != a:  # else: the MoE - dense row
            mine += loss_differences(label, groups[a], groups[b], "", "contrast_loss")
        if _routing_contrast(a, b, groups) and frozenset((a, b)) not in primary_pairs:
            shared = sorted(set(layers_of(groups[a])) & set(layers_of(groups[b])))
            mine += [
                difference_row(
                    label,
                    layer,
                    "nmi_change",
                    groups[a],
                    groups[b],
                    change_value(layer, "nmi"),
                    "contrast_nmi_change",
                )
                for layer in shared
            ]
        if mine:
            rows += mine
            contrasts[label] = (a, b)
    return rows, contrasts
