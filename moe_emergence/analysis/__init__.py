"""Routing analysis: what the experts do, measured in eval mode on a fixed probe.

scores.py (pure functions: NMI, permutation null, token-identity control; its parts
score_tables, score_probe, score_nulls, score_shared, score_gains, score_intervals),
intervals.py (mean and interval over seeds), probe.py (the probe and routing it), callback.py
(``RoutingAnalysis``, the Lightning callback), tables.py and plots.py (its outputs under
``<run dir>/routing/``), loading.py (a checkpoint's model, rebuilt), inspect.py and
token_types.py (``python -m moe_emergence.inspect``: one text, token by token), and
``python -m moe_emergence.analyze`` over runs and sweeps: analyze.py (the CLI), evaluate.py
(a run's checkpoints routed and scored), results.py (what it measured), summary.py (numbers:
groups over seeds, intervals, tests; its parts summary_rows, summary_groups, summary_values,
summary_contrasts, summary_knockout, summary_holm), summary_files.py (summary.csv, .json, .md:
summary_cells, summary_tables, summary_markdown) and sweep_plots.py (figures);
``analyze --model``: hf_routing.py (a Hugging Face MoE's own routing, captured), external.py (the
command: model, tokenizer, probe, routing) and external_report.py (its scores and outputs).
"""

from moe_emergence.lazy import lazy_exports

# name -> the module that defines it, imported on first use (moe_emergence.lazy)
_EXPORTS = {
    "Probe": "moe_emergence.analysis.probe",
    "RoutingAnalysis": "moe_emergence.analysis.callback",
    "build_probe": "moe_emergence.analysis.probe",
    "route_blocks": "moe_emergence.analysis.probe",
    "score_probe_routing": "moe_emergence.analysis.probe",
}

__all__ = ["Probe", "RoutingAnalysis", "build_probe", "route_blocks", "score_probe_routing"]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
