"""The routing analysis's CSV tables: their columns, the rows of the routing tables (one builder
for the training callback and ``analyze``), and writing them whole (temp file, rename).

counts.csv              step, layer, probe, domain, expert, tokens
    eval-mode assignments of the probe's tokens (k per token for top-k), every analysis step
trajectory.csv          step, layer, probe, then the fields of
                        :class:`~moe_emergence.analysis.scores.LayerScores`
    the scores at every analysis step, step 0 (the random router's baseline) first
train_window_counts.csv step_start, step_end, layer, domain, expert, assignments
    TRAINING-TIME figures: noisy router, train mode, the training batches of the optimizer
    steps in (step_start, step_end], summed over ranks; not a measurement of the model
losses.csv              step, domain, loss, perplexity, tokens   (``analyze`` only)
    token-weighted mean next-token loss (nats) of the domain's held-out blocks, eval mode

The field's specialisation metrics (:mod:`moe_emergence.analysis.specialisation`; ``analyze``):
specialisation.csv      step, layer, probe, then :data:`SCALARS` (each metric beside its chance)
repetition.csv          step, layer, domain, pairs, first(_chance, _null_mean, _p), topk(...)
relative_load.csv       step, layer, domain, expert, relative_load (load / balanced load)
coactivation.csv        layer, expert, partner, share, uniform        (final checkpoint)
expert_tokens.csv       layer, expert, rank, token_id, token, count, lift, check_count,
                        check_lift, replicated                        (final checkpoint)

The training callback writes specialisation.csv, repetition.csv and relative_load.csv at every
analysis step (saturation NaN there: it needs the final routing), and at the end of fit:
saturation.csv           step, layer, probe, final_step, saturation_top1(_chance),
                         saturation_topk(_chance)
    router saturation of every analysis step against the last one (``final_step``; 1 there),
    the values ``analyze`` puts in specialisation.csv for checkpoints at those steps
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np

from moe_emergence.analysis.scores import LayerScores
from moe_emergence.analysis.specialisation import (
    SCALARS,
    ExpertTokens,
    LayerSpecialisation,
    Saturation,
    relative_load,
)
from moe_emergence.files import write_atomic

COUNTS = ("step", "layer", "probe", "domain", "expert", "tokens")
TRAJECTORY = ("step", "layer", "probe", *(f.name for f in fields(LayerScores)))
TRAIN_WINDOWS = ("step_start", "step_end", "layer", "domain", "expert", "assignments")
LOSSES = ("step", "domain", "loss", "perplexity", "tokens")
SPECIALISATION = ("step", "layer", "probe", *SCALARS)
REPETITION = (
    "step",
    "layer",
    "domain",
    "pairs",
    "first",
    "first_chance",
    "first_null_mean",
    "first_p",
    "topk",
    "topk_null_mean",
    "topk_p",
)
RELATIVE_LOAD = ("step", "layer", "domain", "expert", "relative_load")
# file name (without .csv) -> columns, in the order :func:`specialisation_rows` returns them
SPECIALISATION_TABLES = {
    "specialisation": SPECIALISATION,
    "repetition": REPETITION,
    "relative_load": RELATIVE_LOAD,
}
SATURATION_SCORES = (
    "saturation_top1",
    "saturation_top1_chance",
    "saturation_topk",
    "saturation_topk_chance",
)
SATURATION = ("step", "layer", "probe", "final_step", *SATURATION_SCORES)
COACTIVATION = ("layer", "expert", "partner", "share", "uniform")
EXPERT_TOKENS = (
    "layer",
    "expert",
    "rank",
    "token_id",
    "token",
    "count",
    "lift",
    "check_count",
    "check_lift",
    "replicated",
)


def _domain_expert_rows(
    where: Mapping[str, Any],
    domains: Sequence[str],
    table: np.ndarray,
    name: str,
    value: Callable[[Any], Any],
) -> list[dict[str, Any]]:
    """One row per domain x expert of ``table`` [D, E] (rows of ``domains``): ``where``'s
    keys, ``domain``, ``expert`` and ``name``: ``value(table[d, e])``."""
    return [
        {**where, "domain": domain, "expert": e, name: value(table[d, e])}
        for d, domain in enumerate(domains)
        for e in range(table.shape[1])
    ]


def routing_rows(
    step: int,
    probe_kind: str,
    domains: Sequence[str],
    counts: Mapping[int, np.ndarray],
    scores: Mapping[int, LayerScores],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The :data:`COUNTS` rows and the :data:`TRAJECTORY` rows of one routed checkpoint or
    analysis step (``probe_kind``: ``held_out`` or ``train_sample``): ``counts`` and ``scores``
    per MoE layer (as
    :func:`moe_emergence.analysis.probe.score_probe_routing` gives them; ``counts[layer]`` the
    domain x expert table int [D, E], rows of ``domains``). Layers in ``scores`` order; counts
    by layer, domain, expert."""
    count_rows, trajectory_rows = [], []
    for layer, layer_scores in scores.items():
        trajectory_rows.append(
            {"step": step, "layer": layer, "probe": probe_kind, **asdict(layer_scores)}
        )
        where = {"step": step, "layer": layer, "probe": probe_kind}
        count_rows += _domain_expert_rows(where, domains, counts[layer], "tokens", int)
    return count_rows, trajectory_rows


def specialisation_rows(
    step: int,
    probe_kind: str,
    domains: Sequence[str],
    counts: Mapping[int, np.ndarray],
    metrics: Mapping[int, LayerSpecialisation],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """The :data:`SPECIALISATION`, :data:`REPETITION` and :data:`RELATIVE_LOAD` rows of one
    checkpoint (``counts[layer]`` the domain x expert table [D, E], rows of ``domains``); plain
    Python values (the callback's checkpoint state loads with ``weights_only``)."""
    scalars, repeats, loads = [], [], []
    for layer, m in metrics.items():
        scalars.append({"step": step, "layer": layer, "probe": probe_kind, **m.scalars()})
        by_domain = m.repetition_by_domain
        for d, domain in enumerate(domains):
            row = {key: float(by_domain[key][d]) for key in REPETITION[3:]}
            repeats.append({"step": step, "layer": layer, "domain": domain, **row})
    for layer, table in counts.items():
        where = {"step": step, "layer": layer}
        loads += _domain_expert_rows(where, domains, relative_load(table), "relative_load", float)
    return scalars, repeats, loads


def saturation_rows(
    step: int, probe_kind: str, final_step: int, saturation: Mapping[int, Saturation]
) -> list[dict[str, Any]]:
    """The :data:`SATURATION` rows of one analysis step (per MoE layer, ``saturation`` order):
    its routing against the routing at ``final_step``."""
    return [
        {
            "step": step,
            "layer": layer,
            "probe": probe_kind,
            "final_step": final_step,
            "saturation_top1": s.top1,
            "saturation_top1_chance": s.top1_chance,
            "saturation_topk": s.topk,
            "saturation_topk_chance": s.topk_chance,
        }
        for layer, s in saturation.items()
    ]


def coactivation_rows(metrics: Mapping[int, LayerSpecialisation]) -> list[dict[str, Any]]:
    """The :data:`COACTIVATION` rows (off-diagonal pairs of each layer's [E, E] matrix); none
    for a top-1 layer."""
    rows = []
    for layer, m in metrics.items():
        if math.isnan(m.coactivation_uniform):
            continue
        matrix = m.coactivation
        for i in range(matrix.shape[0]):
            for j in range(matrix.shape[1]):
                if i != j:
                    rows.append(
                        {
                            "layer": layer,
                            "expert": i,
                            "partner": j,
                            "share": float(matrix[i, j]),
                            "uniform": m.coactivation_uniform,
                        }
                    )
    return rows


def expert_token_rows(lists: Mapping[int, ExpertTokens]) -> list[dict[str, Any]]:
    """The :data:`EXPERT_TOKENS` rows, by layer, expert and rank (1 first)."""
    rows = []
    for layer, t in lists.items():
        rank = 0
        for r in range(t.expert.size):
            rank = 1 if r == 0 or t.expert[r] != t.expert[r - 1] else rank + 1
            rows.append(
                {
                    "layer": layer,
                    "expert": int(t.expert[r]),
                    "rank": rank,
                    "token_id": int(t.token_id[r]),
                    "token": t.text[r] if t.text else "",
                    "count": int(t.count[r]),
                    "lift": float(t.lift[r]),
                    "check_count": int(t.check_count[r]),
                    "check_lift": float(t.check_lift[r]),
                    "replicated": bool(t.replicated[r]),
                }
            )
    return rows


CONFIRMED = " \u2713"  # an expert's listed token that the other half of the documents confirms


def token_lists_markdown(
    title: str, layers: Sequence[int], n_experts: int, rows: Sequence[dict]
) -> str:
    """``expert_tokens.md``: under ``title``, one table per layer of each expert's
    over-represented tokens (:func:`expert_token_rows`; found on one half of the probe's
    documents, a check mark where the other half confirms it)."""
    lines = [
        title,
        "",
        "Ids over-represented on an expert's first-choice tokens (lift = p(id | expert) / p(id))"
        " on one half of the probe's documents; \u2713: confirmed on the other half (z > 1.645;"
        " about 5% of a random router's listed ids confirm).",
    ]
    for layer in layers:
        mine = [r for r in rows if r["layer"] == layer]
        lines += [
            "",
            f"## layer {layer}",
            "",
            "| expert | confirmed | tokens (lift) |",
            "|---|---|---|",
        ]
        for e in range(n_experts):
            listed = [r for r in mine if r["expert"] == e]
            confirmed = sum(r["replicated"] for r in listed)
            cells = ", ".join(
                f"`{r['token']!r}` {r['lift']:.1f}{CONFIRMED if r['replicated'] else ''}".replace(
                    "|", "\\|"
                )
                for r in listed
            )
            lines.append(f"| {e} | {confirmed}/{len(listed)} | {cells or '-'} |")
    return "\n".join(lines) + "\n"


def write_table(path: str | os.PathLike, columns: Sequence[str], rows: Iterable[dict]) -> Path:
    """Write ``rows`` (dicts keyed by ``columns``) as CSV; readers never see half a file."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(columns))
    writer.writeheader()
    writer.writerows(rows)  # floats as repr: full precision, they read back equal
    return write_atomic(path, text.getvalue())


def stepless(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` without their ``step`` key (tables of one model, not of a run's steps)."""
    return [{k: v for k, v in row.items() if k != "step"} for row in rows]


def write_specialisation_tables(
    folder: Path,
    repeats: list[dict[str, Any]],
    loads: list[dict[str, Any]],
    final: Mapping[int, LayerSpecialisation],
    tokens: Mapping[int, ExpertTokens],
    step: bool = True,
) -> list[dict[str, Any]]:
    """repetition.csv and relative_load.csv of ``repeats`` and ``loads`` (rows of
    :func:`specialisation_rows`; ``step`` False: without their step column), coactivation.csv of
    ``final`` and expert_tokens.csv of ``tokens`` into ``folder`` (specialisation.csv is the
    caller's: its columns differ). Returns the token rows (for the token lists' markdown)."""
    first = 0 if step else 1  # REPETITION and RELATIVE_LOAD begin with the step
    if not step:
        repeats, loads = stepless(repeats), stepless(loads)
    write_table(folder / "repetition.csv", REPETITION[first:], repeats)
    write_table(folder / "relative_load.csv", RELATIVE_LOAD[first:], loads)
    write_table(folder / "coactivation.csv", COACTIVATION, coactivation_rows(final))
    token_rows = expert_token_rows(tokens)
    write_table(folder / "expert_tokens.csv", EXPERT_TOKENS, token_rows)
    return token_rows


def read_table(path: str | os.PathLike) -> list[dict[str, str]]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))
