"""Knock-out by domain, the causal test (``analyze`` only, final checkpoint): does the expert a
domain uses most matter more for that domain than for the others, and more than an expert of
the same load that the domain does not prefer?

For each MoE layer L and domain D, on the held-out set (all held-out blocks, the set of
``analyze``'s held-out loss):

- preferred expert: the expert that D's held-out tokens choose first most often at L (ties:
  the lower index);
- control expert: among the other experts, the one whose first-choice load over all held-out
  tokens is closest to the preferred one's (ties: the one D uses least, then the lower index);
- each is removed at L alone (:func:`moe_emergence.model.moe.knocked_out`: its tokens take
  their next choice) and the held-out loss of EVERY domain D' is measured, in nats per token
  as ``analyze``'s held-out loss (next-token cross-entropy within each block, token-weighted).

Per (L, D, D'): the loss change of D' with the preferred expert removed, with the control
removed, and their difference, each with a 95% studentised bootstrap interval over D''s
held-out documents (the same resamples for all three: paired). Each prediction counts to the
document of the token it predicts.

Cost: one intact pass plus one pass per distinct (layer, expert) removed, at most
``min(2 D, E)`` per layer: ``L x min(2 D, E)`` passes of the held-out set.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from moe_emergence.analysis.probe import Probe, eval_mode
from moe_emergence.analysis.results import KnockoutEffect
from moe_emergence.model.gpt2_moe import (
    collect_aux_outputs,
    moe_layers,
    next_token_losses,
    routing_domains,
)
from moe_emergence.model.moe import knocked_out

log = logging.getLogger(__name__)

CONFIDENCE = 0.95
KNOCKOUT_FILE = "knockout.csv"  # a run's readings in analyze's runs/<run>/
COLUMNS = (
    "step",
    "layer",
    "removed",
    "measured",
    "role",
    "expert",
    "share",
    "intact",
    "change",
    "ci_low",
    "ci_high",
    "tokens",
)


# ----------------------------------------------------------------------------- forwards


@torch.no_grad()
def held_out_pass(
    model: nn.Module, probe: Probe, batch_size: int, device: torch.device
) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Route ``probe``'s blocks through ``model`` in eval mode: (float64 [U] each document's
    summed next-token loss in nats, each prediction counted to the document of the token it
    predicts; first-choice experts per MoE layer, int64 [P, T])."""
    ids = torch.from_numpy(probe.input_ids).to(device)
    domains = torch.from_numpy(probe.block_domains).to(device)
    p, t = ids.shape
    losses = np.zeros((p, t - 1))
    first = {i: np.zeros((p, t), dtype=np.int64) for i in moe_layers(model)}
    with eval_mode(model):
        for start in range(0, p, batch_size):
            chunk = ids[start : start + batch_size]
            with routing_domains(model, domains[start : start + batch_size]):
                logits = model(input_ids=chunk).logits
            losses[start : start + len(chunk)] = next_token_losses(logits, chunk).double().cpu()
            for i, (indices, _) in collect_aux_outputs(model).routing.items():
                first[i][start : start + len(chunk)] = indices[:, 0].view(len(chunk), t).cpu()
    targets = probe.token_docs[:, 1:].ravel()
    doc_loss = np.bincount(targets, weights=losses.ravel(), minlength=probe.n_docs)
    return doc_loss, first


def document_tokens(probe: Probe) -> np.ndarray:
    """int64 [U]: each document's predictions (tokens past each block's first)."""
    return np.bincount(probe.token_docs[:, 1:].ravel(), minlength=probe.n_docs)


# ----------------------------------------------------------------------------- experts


def preferred_and_control(
    first: np.ndarray, block_domains: np.ndarray, n_domains: int, n_experts: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From one layer's first choices [P, T]: (preferred [D], control [D], shares [D, E]: the
    share of each domain's tokens whose first choice is each expert). preferred[d]: the
    expert d's tokens choose most (ties: lower index); control[d]: among the others, the one
    whose load over all tokens is closest to preferred[d]'s (ties: the one d uses least, then
    the lower index). A domain without tokens gets -1 for both."""
    counts = np.zeros((n_domains, n_experts))
    np.add.at(counts, (np.repeat(block_domains, first.shape[1]), first.ravel()), 1)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    load = counts.sum(axis=0) / max(counts.sum(), 1)
    preferred = np.full(n_domains, -1)
    control = np.full(n_domains, -1)
    for d in np.flatnonzero(totals[:, 0] > 0):
        best = int(np.argmax(counts[d]))
        others = [e for e in range(n_experts) if e != best]
        preferred[d] = best
        control[d] = min(others, key=lambda e: (abs(load[e] - load[best]), counts[d, e], e))
    return preferred, control, shares


# ----------------------------------------------------------------------------- intervals


def resample_weights(n_docs: int, n_draws: int, seed: int | list[int]) -> np.ndarray:
    """[n_draws, n_docs] multiplicities of a bootstrap over ``n_docs`` documents."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_docs, np.full(n_docs, 1 / n_docs), size=n_draws).astype(np.float64)


def _ratio_se(y: np.ndarray, n: np.ndarray, weights: np.ndarray, ratio: np.ndarray) -> np.ndarray:
    """[B] linearised standard error of ``ratio`` = sum w y / sum w n over weighted documents:
    sqrt(m / (m - 1) * sum w (y - ratio n)^2) / sum w n, m = sum w."""
    m = weights.sum(axis=1)
    resid = y[None, :] - ratio[:, None] * n[None, :]
    var = m / (m - 1) * (weights * resid**2).sum(axis=1)
    return np.sqrt(np.maximum(var, 0.0)) / (weights @ n)


def ratio_interval(
    y: np.ndarray, n: np.ndarray, weights: np.ndarray, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """Studentised (bootstrap-t) interval of sum(y) / sum(n), y [U] a per-document sum (loss
    change, nats) and n [U] its predictions, over the document resamples ``weights`` [B, U]:
    t* = (R* - R) / se*, se the linearised SE (:func:`_ratio_se`); (R - t*_hi se, R - t*_lo se).
    (nan, nan) with fewer than 2 documents or no predictions."""
    if y.size < 2 or n.sum() <= 0:
        return float("nan"), float("nan")
    ratio = np.array([y.sum() / n.sum()])
    se = float(_ratio_se(y, n, np.ones((1, y.size)), ratio)[0])
    drawn_n = weights @ n
    ok = drawn_n > 0
    drawn = (weights[ok] @ y) / drawn_n[ok]
    se_b = _ratio_se(y, n, weights[ok], drawn)
    ok_b = se_b > 0
    if se <= 0 or not ok_b.any():
        return float(ratio[0]), float(ratio[0])
    t = (drawn[ok_b] - ratio[0]) / se_b[ok_b]
    low, high = np.percentile(t, 100 * np.array([(1 - confidence) / 2, (1 + confidence) / 2]))
    return float(ratio[0] - high * se), float(ratio[0] - low * se)


# ----------------------------------------------------------------------------- the readings


def knockout_effects(
    model: nn.Module,
    held_out: Probe,
    batch_size: int,
    device: torch.device,
    n_draws: int = 999,
    seed: int = 0,
) -> list[KnockoutEffect]:
    """Every (MoE layer, removed domain, measured domain) reading of ``model`` on the held-out
    set ``held_out`` (module docstring); intervals from ``n_draws`` document resamples per
    measured domain, seeded by ``seed``. Layers that use every expert (top_k = E) have nothing
    to knock out and are left out. Empty for a dense model."""
    layers = {i: m for i, m in moe_layers(model).items() if m.top_k < m.n_experts}
    if not layers:
        return []
    model = model.to(device)
    intact, first = held_out_pass(model, held_out, batch_size, device)
    tokens = document_tokens(held_out)
    domains, doc_domains = held_out.domains, held_out.doc_domains
    weights = {
        m: resample_weights(int((doc_domains == m).sum()), n_draws, [seed, m])
        for m in range(len(domains))
        if (doc_domains == m).sum() >= 2
    }
    removed_loss: dict[tuple[int, int], np.ndarray] = {}
    out = []
    for layer, moe in layers.items():
        preferred, control, shares = preferred_and_control(
            first[layer], held_out.block_domains, len(domains), moe.n_experts
        )
        for expert in sorted({int(e) for e in (*preferred, *control) if e >= 0}):
            with knocked_out(moe, expert):
                removed_loss[layer, expert] = held_out_pass(model, held_out, batch_size, device)[0]
        for r, removed in enumerate(domains):
            if preferred[r] < 0:
                continue
            lost_p = removed_loss[layer, int(preferred[r])] - intact
            lost_c = removed_loss[layer, int(control[r])] - intact
            for m, measured in enumerate(domains):
                docs = doc_domains == m
                n = tokens[docs].astype(np.float64)
                if n.sum() <= 0:
                    continue
                y_p, y_c = lost_p[docs], lost_c[docs]
                draws = weights.get(m, np.ones((0, int(docs.sum()))))
                out.append(
                    KnockoutEffect(
                        layer=layer,
                        removed=removed,
                        measured=measured,
                        preferred=int(preferred[r]),
                        control=int(control[r]),
                        preferred_share=float(shares[r, preferred[r]]),
                        control_share=float(shares[r, control[r]]),
                        intact=float(intact[docs].sum() / n.sum()),
                        preferred_change=float(y_p.sum() / n.sum()),
                        control_change=float(y_c.sum() / n.sum()),
                        difference=float((y_p - y_c).sum() / n.sum()),
                        preferred_interval=ratio_interval(y_p, n, draws),
                        control_interval=ratio_interval(y_c, n, draws),
                        difference_interval=ratio_interval(y_p - y_c, n, draws),
                        tokens=int(n.sum()),
                    )
                )
    return out


def knockout_rows(step: int, effects: list[KnockoutEffect]) -> list[dict[str, Any]]:
    """The :data:`COLUMNS` rows of one run's readings: per (layer, removed, measured) the roles
    ``preferred`` and ``control`` (their expert, its share of the removed domain's tokens, the
    measured domain's intact loss and its change) and ``difference`` (preferred - control)."""
    rows = []
    for e in effects:
        for role, expert, share, change, (low, high) in (
            ("preferred", e.preferred, e.preferred_share, e.preferred_change, e.preferred_interval),
            ("control", e.control, e.control_share, e.control_change, e.control_interval),
            ("difference", "", "", e.difference, e.difference_interval),
        ):
            rows.append(
                {
                    "step": step,
                    "layer": e.layer,
                    "removed": e.removed,
                    "measured": e.measured,
                    "role": role,
                    "expert": expert,
                    "share": share,
                    "intact": e.intact,
                    "change": change,
                    "ci_low": low,
                    "ci_high": high,
                    "tokens": e.tokens,
                }
            )
    return rows
