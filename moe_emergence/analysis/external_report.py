"""Scores and outputs of ``analyze --model``: one Hugging Face MoE's captured routing of a probe,
scored by the functions a trained run's final checkpoint is scored by, and written as that
analysis writes it where it applies (no training: no steps, no step 0, no seeds, no
saturation, no knock-out). Output folder::

    summary.md, summary.json       the model, the probe, every layer's scores beside their
                                   nulls (Holm over layers), the field's metrics, the loss
    scores.csv                     layer, probe, the LayerScores fields, each test's p_holm
    counts.csv                     layer, probe, domain, expert, tokens (every top-k slot)
    specialisation.csv, repetition.csv, relative_load.csv, coactivation.csv,
    expert_tokens.csv, expert_tokens.md
                                   the field's specialisation metrics (tables.py, no step)
    losses.csv                     domain, loss, perplexity, tokens (the probe's blocks)
    heatmap.png                    domain x expert shares per MoE layer
    token_types.txt                the probe's code tokens by Python category x expert
    inspect/<domain>.html          one probe document per domain, token by token
    probe.json, data_report.json   what the probe is; the data it came from
    routing.npz                    (--save-routing) experts_<layer>, weights_<layer>
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from moe_emergence.analysis.evaluate import block_losses, code_token_types, expert_tokens
from moe_emergence.analysis.hf_routing import HFRouting, LoadedModel, route_text
from moe_emergence.analysis.inspect import render_html
from moe_emergence.analysis.intervals import holm
from moe_emergence.analysis.plots import heatmap_figure, save_figure
from moe_emergence.analysis.probe import Probe, score_probe_routing
from moe_emergence.analysis.results import HeldOutLoss
from moe_emergence.analysis.scores import LayerScores, collapsed_expert
from moe_emergence.analysis.specialisation import (
    SCALARS,
    ExpertTokens,
    LayerSpecialisation,
    specialise_probe,
)
from moe_emergence.analysis.tables import (
    COUNTS,
    LOSSES,
    routing_rows,
    specialisation_rows,
    stepless,
    token_lists_markdown,
    write_specialisation_tables,
    write_table,
)
from moe_emergence.analysis.token_types import format_type_table
from moe_emergence.files import write_atomic
from moe_emergence.versions import library_versions

NULL_SEED = 0
VOCAB_MIN_COUNT = 10  # as callbacks.routing_analysis.vocab_min_count
INSPECT_DIR = "inspect"
# Holm families over the model's MoE layers: test -> the LayerScores p-value it adjusts.
TESTS = {
    "nmi": "null_p",
    "domain_gain": "domain_gain_p",
    "domain_beyond_token_gain": "domain_beyond_token_gain_p",
    "token_gain": "token_gain_p",
}
SCORES = (
    "layer",
    "probe",
    *(f.name for f in fields(LayerScores)),
    *(f"{p}_holm" for p in TESTS.values()),
)
STEPLESS_SCALARS = tuple(s for s in SCALARS if not s.startswith("saturation"))
SPECIALISATION = ("layer", "probe", *STEPLESS_SCALARS)


@dataclass
class ModelRun:
    """What ``analyze --model`` measured: the loaded model, the tokenizer, the domain set, the
    probe and its captured routing, the data report, the settings shown in the summary."""

    loaded: LoadedModel
    tokenizer: Any
    tokenizer_name: str
    domain_set: str
    probe: Probe
    routing: HFRouting
    data_report: dict[str, Any]
    permutations: int
    block_size: int
    max_tokens: int | None
    peak_memory: str
    save_routing: bool = False

    @property
    def n_experts(self) -> int:
        return self.loaded.layers[0].n_experts

    @property
    def top_k(self) -> int:
        return self.loaded.layers[0].top_k

    def decode(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], clean_up_tokenization_spaces=False)


@dataclass
class ModelScores:
    """Per MoE layer: the domain x expert counts [D, E] (every slot), the scores, the field's
    metrics (no saturation), the token lists; the loss per domain over the probe's blocks; the
    code token-type tables; Holm-adjusted p-values per test (:data:`TESTS`) and layer."""

    counts: dict[int, np.ndarray]
    scores: dict[int, LayerScores]
    specialisation: dict[int, LayerSpecialisation]
    expert_tokens: dict[int, ExpertTokens]
    losses: dict[str, HeldOutLoss]
    token_types: dict[int, np.ndarray]
    holm: dict[str, dict[int, float]]


def score_model(run: ModelRun) -> ModelScores:
    """Score the captured routing with the project's functions (documents as units, the
    size-matched probe's scored tokens, ``run.permutations`` draws, seed 0)."""
    probe, experts = run.probe, run.routing.experts
    tokens = probe.input_ids.size
    entropy = {layer: s / tokens for layer, s in run.routing.entropy_sum.items()}
    scored = score_probe_routing(
        probe, experts, entropy, run.n_experts, run.permutations, NULL_SEED
    )
    scores = {layer: s for layer, (_, s) in scored.items()}
    layers = sorted(scores)
    adjusted = {
        test: dict(zip(layers, holm([getattr(scores[i], p) for i in layers]), strict=True))
        for test, p in TESTS.items()
    }
    settings = {"null_seed": NULL_SEED, "vocab_min_count": VOCAB_MIN_COUNT}
    return ModelScores(
        counts={layer: table for layer, (table, _) in scored.items()},
        scores=scores,
        specialisation=specialise_probe(
            probe, experts, None, run.n_experts, run.permutations, NULL_SEED, VOCAB_MIN_COUNT
        ),
        expert_tokens=expert_tokens(probe, experts, run.n_experts, settings, run.decode),
        losses=block_losses(probe, run.routing.loss_sum),
        token_types=code_token_types(probe, experts, run.n_experts, run.decode),
        holm=adjusted,
    )


# ---------------------------------------------------------------------- tables and figures


def write_tables(run: ModelRun, result: ModelScores, out: Path) -> None:
    """The per-layer tables of a trained run's analysis, without its step column."""
    kind, domains = run.probe.kind, run.probe.domains
    counts, score_rows = routing_rows(0, kind, domains, result.counts, result.scores)
    for row in score_rows:
        for test, p in TESTS.items():
            row[f"{p}_holm"] = result.holm[test][row["layer"]]
    write_table(out / "scores.csv", SCORES, stepless(score_rows))
    write_table(out / "counts.csv", COUNTS[1:], stepless(counts))
    scalars, repeats, loads = specialisation_rows(
        0, kind, domains, result.counts, result.specialisation
    )
    scalars = [{k: row[k] for k in SPECIALISATION} for row in scalars]
    write_table(out / "specialisation.csv", SPECIALISATION, scalars)
    token_rows = write_specialisation_tables(
        out, repeats, loads, result.specialisation, result.expert_tokens, step=False
    )
    title = f"# Per-expert token lists ({run.loaded.name})"
    text = token_lists_markdown(title, sorted(result.scores), run.n_experts, token_rows)
    write_atomic(out / "expert_tokens.md", text)
    losses = [
        {"domain": d, "loss": v.loss, "perplexity": v.perplexity, "tokens": v.tokens}
        for d, v in result.losses.items()
    ]
    write_table(out / "losses.csv", LOSSES[1:], losses)
    if result.token_types:
        text = [f"Code tokens of the probe by Python token type x expert ({run.loaded.name})"]
        text += [
            format_type_table(table, f"\nlayer {layer}:")
            for layer, table in result.token_types.items()
        ]
        write_atomic(out / "token_types.txt", "\n".join(text) + "\n")


def write_heatmap(run: ModelRun, result: ModelScores, out: Path) -> Path:
    title = (
        f"{run.loaded.name}: routing of the {run.probe.kind} probe ({run.loaded.family.name}, "
        f"{run.n_experts} experts, top-{run.top_k})"
    )
    fig = heatmap_figure(result.counts, result.scores, run.probe.domains, title=title)
    return save_figure(fig, out / "heatmap.png")


def decoded_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each token's text, read off the growing decoded prefix (so spaces and multi-byte
    characters land on the token that completes them; a token that completes nothing shows
    as its own decoding)."""
    pieces, previous = [], ""
    for n in range(1, len(ids) + 1):
        text = tokenizer.decode(list(ids[:n]), clean_up_tokenization_spaces=False)
        if text.startswith(previous):
            pieces.append(text[len(previous) :])
        else:
            pieces.append(tokenizer.decode([ids[n - 1]], clean_up_tokenization_spaces=False))
        previous = text
    return pieces


def write_inspect_pages(run: ModelRun, out: Path) -> list[Path]:
    """Per domain, its first probe document (its scored tokens, routed from the start on their
    own) as the ``inspect`` page: tokens coloured by first choice, the router's distribution
    (softmax of its logits) on hover."""
    probe, loaded = run.probe, run.loaded
    written = []
    for d, domain in enumerate(probe.domains):
        scored_docs = np.unique(probe.token_docs[probe.scored])
        docs = scored_docs[probe.doc_domains[scored_docs] == d]
        if docs.size == 0:
            continue
        ids = probe.input_ids[probe.scored & (probe.token_docs == docs[0])][: run.block_size]
        routing = route_text(loaded.model, loaded.layers, loaded.family, ids.tolist())
        notes = [
            f"{loaded.name} ({loaded.family.name}): the first {domain} document of the probe, "
            f"{len(ids)} tokens, routed on its own in eval mode ({loaded.dtype}); experts as "
            f"the model ran them (captured), first choice coloured; hover: softmax of the "
            f"router logits ({loaded.family.rule})"
        ]
        page = render_html(
            decoded_pieces(run.tokenizer, ids.tolist()),
            routing,
            run.n_experts,
            f"Routing of {loaded.name}: {domain}",
            notes,
        )
        written.append(write_atomic(out / INSPECT_DIR / f"{domain}.html", page))
    return written


def write_routing(run: ModelRun, out: Path) -> Path:
    """``routing.npz``: the probe's ids and domains, and per MoE layer ``experts_<layer>``
    [P, T, k] (slot 0 the first choice) and ``weights_<layer>`` (float16)."""
    arrays = {
        "input_ids": run.probe.input_ids,
        "block_domains": run.probe.block_domains,
        "token_docs": run.probe.token_docs,
        "token_mask": run.probe.scored,
    }
    arrays |= {f"experts_{i}": e for i, e in run.routing.experts.items()}
    arrays |= {f"weights_{i}": w for i, w in run.routing.weights.items()}
    path = out / "routing.npz"
    with path.open("wb") as f:
        np.savez_compressed(f, **arrays)
    return path


# ---------------------------------------------------------------------- summary


def _p(p: float) -> str:
    return "-" if math.isnan(p) else f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(row) + " |" for row in rows]


def _routing_rows(result: ModelScores, n_experts: int) -> list[list[str]]:
    rows = []
    for layer, s in result.scores.items():
        approx = " approx." if s.nmi_interval_approximate else ""
        rows.append(
            [
                str(layer),
                f"{s.nmi:.4f} [{s.nmi_low:.4f}, {s.nmi_high:.4f}{approx}]",
                f"{s.null_p95:.4f} ({s.null_mean:.4f})",
                f"{_p(s.null_p)} / {_p(result.holm['nmi'][layer])}",
                f"{s.token_id_nmi:.4f}",
                f"{s.usage_entropy:.3f} / {math.log(n_experts):.3f}",
                f"{s.router_entropy:.3f}",
            ]
        )
    return rows


def _gain_rows(result: ModelScores) -> list[list[str]]:
    rows = []
    for layer, s in result.scores.items():
        h = result.holm
        rows.append(
            [
                str(layer),
                f"{s.domain_gain:+.4f}",
                f"{s.domain_gain_null_p95:+.4f} ({s.domain_gain_null_mean:+.4f})",
                f"{_p(s.domain_gain_p)} / {_p(h['domain_gain'][layer])}",
                f"{s.domain_beyond_token_gain:+.4f}",
                f"{s.domain_beyond_token_gain_null_p95:+.4f} "
                f"({s.domain_beyond_token_gain_null_mean:+.4f})",
                f"{_p(s.domain_beyond_token_gain_p)} / {_p(h['domain_beyond_token_gain'][layer])}",
                f"{s.token_gain:+.4f} ({_p(s.token_gain_p)} / {_p(h['token_gain'][layer])})",
                f"{s.token_gain_ref_domain:+.4f} / {s.token_gain_ref_token:+.4f}",
                f"{s.cond_mi_excess:+.4f} ({_p(s.cond_mi_null_p)})",
            ]
        )
    return rows


def _metric_rows(result: ModelScores) -> list[list[str]]:
    rows = []
    for layer, m in result.specialisation.items():
        lists = result.expert_tokens.get(layer)
        confirmed = "-" if lists is None else f"{lists.replicated_share:.2f}"
        rows.append(
            [
                str(layer),
                f"{m.coactivation_strongest:.3f} ({m.coactivation_strongest_chance:.3f})",
                f"{m.repetition:.3f} ({m.repetition_chance:.3f}; {m.repetition_null_mean:.3f},"
                f" p {_p(m.repetition_p)})",
                f"{m.repetition_topk:.3f} ({m.repetition_topk_null_mean:.3f})",
                f"{m.vocab_spec:.3f} ({m.vocab_spec_chance:.3f}; {m.vocab_spec_ids} ids)",
                confirmed,
            ]
        )
    return rows


def _passing(result: ModelScores, test: str) -> str:
    passed = [str(layer) for layer, p in result.holm[test].items() if p < 0.05]
    smallest = min(result.holm[test].values(), default=float("nan"))
    if passed:
        return f"{len(passed)} of {len(result.holm[test])} layers ({', '.join(passed)})"
    return f"none of {len(result.holm[test])} layers (smallest p_holm {_p(smallest)})"


def render_summary(run: ModelRun, result: ModelScores) -> str:
    """``summary.md``: the model and probe, then per MoE layer the routing, held-out gains and
    token controls beside their nulls (p and Holm over the model's layers), the field's
    metrics beside their chance levels, the loss per domain."""
    loaded, probe = run.loaded, run.probe
    n_min = 1.0 / (1 + run.permutations)
    lines = [
        f"# Routing of {loaded.name} on {run.domain_set}",
        "",
        f"- model: `{loaded.location}`, {loaded.family.name} (`{loaded.family.model_type}`), "
        f"{len(loaded.layers)} MoE layers ({', '.join(str(m.index) for m in loaded.layers)}),"
        f" {run.n_experts} experts, top-{run.top_k}; {loaded.dtype} on {loaded.device}"
        + "".join(f"; {note}" for note in loaded.notes),
        f"- routing rule: {loaded.family.rule}. The experts are those each MoE block handed its"
        " experts module in the model's own forward (eval mode), not recomputed from logits;"
        " first choice = the expert with the largest routing weight.",
        f"- tokenizer: `{run.tokenizer_name}` ({len(run.tokenizer):,} ids); "
        + probe.summary()
        + (f"; at most {run.max_tokens:,} tokens routed" if run.max_tokens else ""),
        f"- {run.routing.tokens_per_s:,.0f} tokens/s routed; {run.peak_memory}",
        f"- every p is a permutation p over {run.permutations} document-label permutations "
        f"(smallest possible {n_min:.4f}); p_holm: Holm over the model's "
        f"{len(result.scores)} MoE layers, one family per test",
        "",
        "Domain signal above the document-level null (MI test, p_holm < 0.05): "
        + _passing(result, "nmi")
        + ". It replicates on held-out documents (domain gain): "
        + _passing(result, "domain_gain")
        + ". It goes beyond the token id: "
        + _passing(result, "domain_beyond_token_gain")
        + ".",
        "",
        "## Routing",
        "",
        *_table(
            [
                "layer",
                "NMI [95% probe interval]",
                "null p95 (mean): chance",
                "p / p_holm",
                "token-id NMI",
                "usage entropy / log E",
                "router entropy",
            ],
            _routing_rows(result, run.n_experts),
        ),
        "",
        "## Held-out gains and token controls (nats per token)",
        "",
        *_table(
            [
                "layer",
                "domain gain",
                "null p95 (mean)",
                "p / p_holm",
                "domain beyond token",
                "null p95 (mean)",
                "p / p_holm",
                "token gain (p / p_holm)",
                "references: domain router / token router",
                "cond. MI excess (p)",
            ],
            _gain_rows(result),
        ),
        *_summary_tail(run, result),
    ]
    return "\n".join(lines) + "\n"


def _summary_tail(run: ModelRun, result: ModelScores) -> list[str]:
    lines = [
        "",
        "## The field's specialisation metrics (chance in brackets)",
        "",
        *_table(
            [
                "layer",
                "strongest co-activation (chance)",
                "repetition (chance; shuffle mean, p)",
                "top-k sets meet (shuffle mean)",
                "vocabulary spec. (chance; ids)",
                "token lists confirmed",
            ],
            _metric_rows(result),
        ),
        "",
        "## Next-token loss over the probe's blocks",
        "",
        *_table(
            ["domain", "loss (nats)", "perplexity", "predictions"],
            [
                [d, f"{v.loss:.4f}", f"{v.perplexity:.2f}", f"{v.tokens:,}"]
                for d, v in result.losses.items()
            ],
        ),
    ]
    collapsed = [
        f"layer {layer}: expert {found[0]} takes {found[1]:.0%} of the probe's assignments"
        for layer, table in result.counts.items()
        if (found := collapsed_expert(table)) is not None
    ]
    if collapsed:
        lines += ["", "Warning: " + "; ".join(collapsed) + "."]
    return lines


def summary_json(run: ModelRun, result: ModelScores) -> dict[str, Any]:
    loaded = run.loaded
    describe = {k: v for k, v in run.probe.describe().items() if k != "block_documents"}
    return {
        "model": loaded.name,
        "location": loaded.location,
        "family": loaded.family.name,
        "model_type": loaded.family.model_type,
        "dtype": str(loaded.dtype),
        "device": str(loaded.device),
        "notes": loaded.notes,
        "moe_layers": [m.index for m in loaded.layers],
        "n_experts": run.n_experts,
        "top_k": run.top_k,
        "tokenizer": run.tokenizer_name,
        "domain_set": run.domain_set,
        "probe": describe,
        "null_permutations": run.permutations,
        "scores": {str(i): asdict(s) for i, s in result.scores.items()},
        "p_holm": {t: {str(i): p for i, p in v.items()} for t, v in result.holm.items()},
        "specialisation": {
            str(i): {k: v for k, v in m.scalars().items() if k in STEPLESS_SCALARS}
            for i, m in result.specialisation.items()
        },
        "losses": {d: asdict(v) for d, v in result.losses.items()},
        "tokens_per_s": run.routing.tokens_per_s,
        "peak_memory": run.peak_memory,
        "library_versions": library_versions(),
    }


def _json_safe(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def layer_lines(result: ModelScores) -> list[str]:
    """One line per MoE layer, as the training callback logs them."""
    return [
        f"  layer {layer}: NMI {s.nmi:.4f} [{s.nmi_low:.4f}, {s.nmi_high:.4f}]; null p95 "
        f"{s.null_p95:.4f}, p = {s.null_p:.3f} (Holm {result.holm['nmi'][layer]:.3f}); domain "
        f"gain {s.domain_gain:+.4f} (p = {s.domain_gain_p:.3f}); token gain {s.token_gain:+.4f}"
        f" (p = {s.token_gain_p:.3f}); domain beyond token {s.domain_beyond_token_gain:+.4f} "
        f"(p = {s.domain_beyond_token_gain_p:.3f})"
        for layer, s in result.scores.items()
    ]


def write_model_outputs(run: ModelRun, out: Path) -> str:
    """Score ``run``, write every output into ``out``; return what to print."""
    result = score_model(run)
    write_tables(run, result, out)
    figures = [write_heatmap(run, result, out)]
    pages = write_inspect_pages(run, out)
    write_atomic(out / "probe.json", json.dumps(run.probe.describe(), indent=1) + "\n")
    write_atomic(out / "data_report.json", json.dumps(_json_safe(run.data_report), indent=1))
    summary = json.dumps(_json_safe(summary_json(run, result)), indent=1) + "\n"
    write_atomic(out / "summary.json", summary)
    write_atomic(out / "summary.md", render_summary(run, result))
    extra = [write_routing(run, out)] if run.save_routing else []
    loaded = run.loaded
    lines = [
        f"{loaded.name} ({loaded.family.name}, {run.n_experts} experts, top-{run.top_k}, "
        f"{loaded.dtype} on {loaded.device}): {run.probe.summary()}",
        f"Routed at {run.routing.tokens_per_s:,.0f} tokens/s; {run.peak_memory}",
        "Routing (eval mode, captured experts, first choice): NMI [probe 95% interval]; "
        "document-level null p95 and p (Holm over layers); held-out gains with their p",
        *layer_lines(result),
        f"Written to {out}:",
    ]
    del figures, pages, extra
    files = sorted(p for p in out.rglob("*") if p.is_file() and not p.name.startswith("."))
    lines += ["  " + ", ".join(p.relative_to(out).as_posix() for p in files)]
    return "\n".join(lines)
