"""Routing analysis: what the experts do, measured in eval mode on a fixed probe.

scores.py (pure functions: NMI, permutation null, token-identity control), intervals.py
(mean and interval over seeds), probe.py (the probe and routing it), callback.py
(``RoutingAnalysis``, the Lightning callback), tables.py and plots.py (its outputs under
``<run dir>/routing/``), inspect.py and token_types.py (``python -m moe_emergence.inspect``:
one text, token by token).
"""

from moe_emergence.analysis.callback import RoutingAnalysis, score_probe_routing
from moe_emergence.analysis.probe import Probe, build_probe, route_blocks

__all__ = ["Probe", "RoutingAnalysis", "build_probe", "route_blocks", "score_probe_routing"]
