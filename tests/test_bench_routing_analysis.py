"""Smoke test of ``benchmarks/bench_routing_analysis.py`` on a tiny probe and model: every stage
runs and the JSON line holds finite figures. No timing or memory figure is asserted."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = [
    *("--blocks-per-domain", "3", "--block-size", "32", "--permutations", "19"),
    *("--vocab-size", "64", "--layers", "2", "--experts", "4"),
    *("--route", "--n-layer", "3", "--n-embd", "16", "--n-head", "2", "--batch-size", "4"),
]


def test_every_stage_runs_and_reports(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # its `from machine import ...`
    path = BENCHMARKS / "bench_routing_analysis.py"
    spec = importlib.util.spec_from_file_location("bench_routing_analysis", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    assert bench.main(TINY) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [s["stage"] for s in line["stages"]] == [
        "route",
        "score",
        "score_one_array",
        "specialise",
    ]
    for stage in line["stages"]:
        for key in ("seconds", "traced_mib", "resident_mib"):
            assert math.isfinite(stage[key]) and stage[key] >= 0, stage
    assert line["shape"]["blocks"] == 9 and line["shape"]["documents"] >= 3
    assert bench.heldout.CELLS_PER_BATCH == 4_000_000  # the reference's setting put back
