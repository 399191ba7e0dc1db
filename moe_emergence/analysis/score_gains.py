"""Cross-fitted controls of one layer's routing (numpy only, nats): the token-id router fitted
on one half of the documents and scored on the other, and the held-out log-loss gains of
:mod:`moe_emergence.analysis.heldout` with their document-level nulls."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from moe_emergence.analysis.heldout import (
    TokenDomainGroups,
    domain_gain_batch,
    fold_permutations,
    token_gain_batch,
    within_document_shuffle_batches,
)
from moe_emergence.analysis.score_probe import ProbeArrays, document_folds
from moe_emergence.analysis.score_tables import _compact, _unit_counts, nmi

# Told how many null draws were just scored (a progress bar's update), or None.
Advance = Callable[[int], object] | None


def _counted(batches: Iterator[np.ndarray], advance: Advance) -> Iterator[np.ndarray]:
    """``batches`` [k, M], ``advance(k)`` told after each one is used."""
    for batch in batches:
        yield batch
        if advance is not None:
            advance(batch.shape[0])


# ----------------------------------------------------------------------------- cross-fitting


@dataclass(frozen=True)
class CrossFitted:
    """The domain x expert table [D, E] (float64, fractional) of the cross-fitted token-id
    router, summed over both directions, and its NMI."""

    token_id_table: np.ndarray

    @property
    def token_id_nmi(self) -> float:
        return nmi(self.token_id_table)


def _token_router(probe: ProbeArrays, seed: int) -> CrossFitted:
    """:func:`~moe_emergence.analysis.scores.cross_fitted_routers` of a checked probe."""
    tok, docs, dom, first = probe.tok, probe.docs, probe.dom, probe.first
    n_dom, n_exp = probe.n_domains, probe.n_experts
    token_table = np.zeros((n_dom, n_exp))
    if tok.size == 0:
        return CrossFitted(token_table)
    fold = document_folds(dom, n_dom, seed)[docs]
    t_idx, n_tok = _compact(tok)
    tok_dom = dom[docs]
    for fit in (0, 1):
        fit_m, score_m = fold == fit, fold != fit
        if not fit_m.any() or not score_m.any():
            continue
        marginal = np.bincount(first[fit_m], minlength=n_exp) / fit_m.sum()
        by_id = _unit_counts(t_idx[fit_m], first[fit_m], n_tok, n_exp)
        scored = _unit_counts(tok_dom[score_m], t_idx[score_m], n_dom, n_tok)  # [D, ids]
        token_table += scored @ _rows_or(by_id, marginal)
    return CrossFitted(token_table)


def _rows_or(counts: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Each row of ``counts`` [R, E] as a distribution; an all-zero row: ``fallback`` [E]."""
    total = counts.sum(axis=1, keepdims=True)
    rows = np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)
    rows[total[:, 0] == 0] = fallback
    return rows


# ----------------------------------------------------------------------------- held-out gains


@dataclass(frozen=True)
class HeldOutGains:
    """Cross-fitted log-loss gains (nats per scored token; :mod:`.heldout`) and their nulls
    ([K] arrays). domain: q(e | d) over q(e), null: domain labels permuted across the
    documents of each half. token: q(e | id) over q(e), null: experts shuffled among the
    tokens of each document; ref_domain / ref_token: the token gain of a simulated
    token-blind domain router (domain d -> expert d mod E) and of a pure token router (each id
    a seeded random expert) on the same tokens. domain_beyond_token: q(e | id, d) over q(e |
    id), null: domain labels permuted among the documents of each (id, half)."""

    domain: float
    domain_null: np.ndarray
    token: float
    token_null: np.ndarray
    token_ref_domain: float
    token_ref_token: float
    domain_beyond_token: float
    domain_beyond_token_null: np.ndarray


def _gains(probe: ProbeArrays, k: int, seed: int, advance: Advance = None) -> HeldOutGains:
    """The gains of :func:`~moe_emergence.analysis.scores.held_out_gains` on a checked probe;
    the two [K, N]-sized nulls are drawn and scored a batch at a time (memory O(k N) per
    batch), ``advance(rows)`` called after each batch (2 K rows in all)."""
    tok, docs, dom, first = probe.tok, probe.docs, probe.dom, probe.first
    n_dom, n_exp = probe.n_domains, probe.n_experts
    folds = document_folds(dom, n_dom, seed)
    observed_labels = np.concatenate([dom[None, :], fold_permutations(dom, folds, k, seed)])
    domain = domain_gain_batch(probe.doc_counts, observed_labels, folds, n_dom)

    t_idx, n_ids = _compact(tok)
    token_folds = folds[docs]
    reference = np.stack([dom[docs] % n_exp, _seeded_id_experts(n_ids, n_exp, seed)[t_idx]])
    shuffled = within_document_shuffle_batches(docs, first, k, seed)
    token = token_gain_batch(
        t_idx,
        n_ids,
        token_folds,
        itertools.chain([first[None, :], reference], _counted(shuffled, advance)),
        n_exp,
    )

    groups = TokenDomainGroups(t_idx, n_ids, docs, dom, folds, first, n_exp)
    permuted = groups.within_id_permutation_batches(k, seed)
    beyond = groups.gain_batch(
        itertools.chain([groups.label[None, :]], _counted(permuted, advance)), n_dom
    )
    return HeldOutGains(
        domain=float(domain[0]),
        domain_null=domain[1:],
        token=float(token[0]),
        token_null=token[3:],
        token_ref_domain=float(token[1]),
        token_ref_token=float(token[2]),
        domain_beyond_token=float(beyond[0]),
        domain_beyond_token_null=beyond[1:],
    )


def _seeded_id_experts(n_ids: int, n_experts: int, seed: int) -> np.ndarray:
    """[n_ids] a fixed random expert per (compacted) token id: the reference token router."""
    return np.random.default_rng([seed, 1]).integers(0, n_experts, n_ids)
