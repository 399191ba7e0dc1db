"""The sweep summary's knock-out rows (:mod:`moe_emergence.analysis.knockout`'s readings over
seeds) and their row names; the excess on a domain's own loss is family ``knockout_own``."""

from __future__ import annotations

from collections.abc import Sequence

from moe_emergence.analysis.intervals import mean_interval
from moe_emergence.analysis.results import RunResult
from moe_emergence.analysis.summary_groups import is_reference
from moe_emergence.analysis.summary_rows import CONFIDENCE, NAN, SummaryRow
from moe_emergence.analysis.summary_values import RunValue, level_row

KNOCKOUT_FAMILY = "knockout_own"


def knockout_metric(kind: str, removed: str, measured: str) -> str:
    """The row name of a knock-out reading: ``kind`` ``preferred`` -> ``knockout_<removed>_on_
    <measured>`` (the change of ``measured``'s held-out loss when ``removed``'s preferred
    expert is removed), ``control`` -> ``knockout_control_...``, ``excess`` ->
    ``knockout_excess_...`` (preferred minus control), ``share`` -> ``knockout_share_<removed>``
    (the preferred expert's share of ``removed``'s first choices)."""
    if kind == "share":
        return f"knockout_share_{removed}"
    prefix = "knockout" if kind == "preferred" else f"knockout_{kind}"
    return f"{prefix}_{removed}_on_{measured}"


def _knockout_value(layer: int, removed: str, measured: str, name: str) -> RunValue:
    """The run's final knock-out reading field ``name`` (NaN without it)."""

    def get(run: RunResult) -> float:
        for e in run.knockout:
            if (e.layer, e.removed, e.measured) == (layer, removed, measured):
                return float(getattr(e, name))
        return NAN

    return get


def knockout_summary_rows(group: str, runs: Sequence[RunResult]) -> list[SummaryRow]:
    """Per layer and removed domain D (where a run has knock-out readings): the preferred
    expert's share of D's tokens, then per measured domain D' the change of D''s loss with D's
    preferred expert removed, with the control removed, and their difference (mean and
    t-interval over seeds); the difference on D' = D is tested (family ``knockout_own``; a
    reference router's is descriptive)."""
    cells: dict[tuple[int, str], list[str]] = {}  # (layer, D) -> measured domains
    for run in runs:
        for e in run.knockout:
            measured = cells.setdefault((e.layer, e.removed), [])
            if e.measured not in measured:
                measured.append(e.measured)
    family = "" if is_reference(runs) else KNOCKOUT_FAMILY
    seeds = [r.seed for r in runs]
    rows = []
    for (layer, removed), measured_domains in sorted(cells.items(), key=lambda c: c[0][0]):
        share = _knockout_value(layer, removed, removed, "preferred_share")
        rows.append(level_row(group, layer, knockout_metric("share", removed, ""), runs, share))
        for measured in measured_domains:
            for kind, name in (
                ("preferred", "preferred_change"),
                ("control", "control_change"),
                ("excess", "difference"),
            ):
                values = [_knockout_value(layer, removed, measured, name)(r) for r in runs]
                tested = family if kind == "excess" and measured == removed else ""
                i = mean_interval(values, confidence=CONFIDENCE)
                metric = knockout_metric(kind, removed, measured)
                rows.append(SummaryRow.of(group, layer, metric, i, seeds, values, family=tested))
    return rows
