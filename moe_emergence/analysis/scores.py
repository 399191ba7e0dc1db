"""Scores of how much MoE routing depends on the data domain (numpy only, all in nats).

The unit of replication inside a run is the DOCUMENT (a probe text): the tokens of one text,
and the blocks cut from it, are not independent, so every null permutes and every interval
resamples documents, and every control fitted on the probe is cross-fitted on held-out
documents. For top-k > 1 every score reads the first choice (slot 0), so NMIs share one scale.
A ``mask`` (a size-matched probe, :func:`moe_emergence.analysis.probe.size_matched`) restricts
every score to the scored tokens and the documents that keep some.

- ``nmi = I(D;E) / H(D)`` of the domain x expert table: the effect size, 0 when routing ignores
  the domain, 1 when the chosen expert determines it. Its test permutes the domain labels
  across documents (:func:`permutation_tables`) with I(D;E) as the statistic: a permutation
  moves H(D) when documents differ in size by domain, never I(D;E)'s scale; the NMI of the
  same permutations gives the chance levels on the NMI's scale.
- Held-out gains (:mod:`moe_emergence.analysis.heldout`, :func:`held_out_gains`): log-loss
  gains of predicting a held-out document's experts from its domain, from the token id, and
  from the domain beyond the token id, each with its document-level null.
- ``cond_mi = I(D;E | T)``, plug-in, over the token ids seen in >= 2 domains, reported as its
  excess over its null mean (:func:`conditional_mi_null`: labels permuted among the (id,
  document) groups of each shared id); its null is conservative under document preference.
- The cross-fitted token-id router (:func:`cross_fitted_routers`): each id sent by its expert
  distribution on the other half of the documents; its NMI stands beside the NMI.
- The probe interval of the NMI (:func:`document_bootstrap`) and of one run's change between
  two checkpoints (:func:`paired_change_interval`): studentised bootstraps over documents,
  resampled within each domain.

Shapes: D domains, E experts, k experts per token, N tokens, U documents. ``0 * log 0 = 0``;
float64 throughout.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from moe_emergence.analysis.heldout import (
    TokenDomainGroups,
    domain_gain_batch,
    fold_permutations,
    token_gain_batch,
    within_document_shuffle_batches,
)

# The probe interval of the NMI is exact enough (coverage >= 93%) on size-matched probes with at
# least this many documents per domain (benchmarks/interval_coverage.py; docs/method.md).
INTERVAL_MIN_DOCUMENTS = 18

# Told how many null draws were just scored (a progress bar's update), or None.
Advance = Callable[[int], object] | None


def _counted(batches: Iterator[np.ndarray], advance: Advance) -> Iterator[np.ndarray]:
    """``batches`` [k, M], ``advance(k)`` told after each one is used."""
    for batch in batches:
        yield batch
        if advance is not None:
            advance(batch.shape[0])


__all__ = [
    "INTERVAL_MIN_DOCUMENTS",
    "CrossFitted",
    "HeldOutGains",
    "LayerScores",
    "collapsed_expert",
    "conditional_mi",
    "conditional_mi_null",
    "contingency",
    "cross_fitted_routers",
    "document_bootstrap",
    "document_folds",
    "entropy",
    "held_out_gains",
    "interval_is_approximate",
    "mutual_information",
    "nmi",
    "null_summary",
    "paired_change_interval",
    "permutation_null",
    "permutation_p",
    "permutation_tables",
    "score_layer",
    "shares",
    "usage_entropy",
]


# ----------------------------------------------------------------------------- input checks


def _ids(values: object, n: int, name: str) -> np.ndarray:
    """``values`` as an int64 array, checked to lie in ``[0, n)``."""
    arr = np.asarray(values)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        raise ValueError(f"{name} must lie in [0, {n}), got [{arr.min()}, {arr.max()}]")
    return arr


def _assignments(experts: object, n_tokens: int, n_experts: int) -> np.ndarray:
    """``experts`` [N] or [N, k] as an int64 [N, k] array; k <= E."""
    ex = _ids(experts, n_experts, "experts")
    if ex.ndim == 1:
        ex = ex[:, None]
    if ex.ndim != 2 or ex.shape[0] != n_tokens:
        raise ValueError(f"experts must be [{n_tokens}] or [{n_tokens}, k], got {ex.shape}")
    if ex.shape[1] > n_experts:
        raise ValueError(f"k = {ex.shape[1]} experts per token exceeds n_experts = {n_experts}")
    return ex


def _counts(table: object, ndim: int | None = 2, name: str = "table") -> np.ndarray:
    """Non-negative counts as float64 (``ndim`` checked unless None)."""
    arr = np.asarray(table, dtype=np.float64)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if arr.size and (arr < 0).any():
        raise ValueError(f"{name} must be non-negative counts")
    return arr


# ----------------------------------------------------------------------------- core scores


def contingency(domain_ids, experts, n_domains: int, n_experts: int) -> np.ndarray:
    """[D, E] int64 counts of assignments: ``table[d, e]`` = number of (token, slot) pairs with
    domain d routed to expert e. domain_ids [N]; experts [N] or [N, k] (each token's domain
    counts k times). Sums to N*k."""
    dom = _ids(domain_ids, n_domains, "domain_ids")
    if dom.ndim != 1:
        raise ValueError(f"domain_ids must be 1-D, got shape {dom.shape}")
    ex = _assignments(experts, dom.shape[0], n_experts)
    key = np.repeat(dom, ex.shape[1]) * n_experts + ex.ravel()
    flat = np.bincount(key, minlength=n_domains * n_experts)
    return flat.astype(np.int64, copy=False).reshape(n_domains, n_experts)


def _entropy(counts: np.ndarray, axis: int = -1) -> np.ndarray:
    """Entropy (nats) along ``axis`` of float64 counts; 0 for all-zero slices."""
    total = counts.sum(axis=axis, keepdims=True)
    p = np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)
    logp = np.log(p, out=np.zeros_like(p), where=p > 0)
    return -(p * logp).sum(axis=axis)


def entropy(counts, axis: int = -1) -> np.ndarray | float:
    """Shannon entropy (nats) of the distribution proportional to ``counts`` along ``axis``.
    0 for an all-zero slice; a float when the result is a scalar. In [0, log(size)]."""
    h = _entropy(_counts(counts, ndim=None, name="counts"), axis=axis)
    return float(h) if h.ndim == 0 else h


def _mi_and_hd(tables: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """I(D;E) and H(D) (nats) of float64 count tables [..., D, E]; 0 for empty tables."""
    n = tables.sum(axis=(-2, -1))
    rows = tables.sum(axis=-1)
    cols = tables.sum(axis=-2)
    denom = rows[..., :, None] * cols[..., None, :]
    pos = tables > 0  # implies denom > 0
    ratio = np.divide(tables * n[..., None, None], denom, out=np.ones_like(tables), where=pos)
    terms = tables * np.log(ratio)
    mi = np.divide(terms.sum(axis=(-2, -1)), n, out=np.zeros_like(n), where=n > 0)
    return np.maximum(mi, 0.0), _entropy(rows, axis=-1)


def _nmi_batch(tables: np.ndarray) -> np.ndarray:
    """NMI ``I(D;E) / H(D)`` of tables [..., D, E], clipped to [0, 1]; 0 where H(D) == 0."""
    mi, hd = _mi_and_hd(tables)
    out = np.divide(mi, hd, out=np.zeros_like(mi), where=hd > 0)
    return np.clip(out, 0.0, 1.0)


def mutual_information(table) -> float:
    """I(D;E) in nats of a [D, E] count table: ``sum p(d,e) log(p(d,e) / (p(d) p(e)))``.
    >= 0; 0 for an empty table."""
    mi, _ = _mi_and_hd(_counts(table))
    return float(mi)


def nmi(table) -> float:
    """``I(D;E) / H(D)`` of a [D, E] count table, H(D) the entropy of the row sums; in [0, 1].
    0: routing independent of domain (or H(D) == 0); 1: the expert determines the domain."""
    return float(_nmi_batch(_counts(table)))


def usage_entropy(table) -> float:
    """H(E) (nats) of the column sums of a [D, E] table: expert-usage entropy, in [0, log E];
    log E when usage is uniform."""
    return float(_entropy(_counts(table).sum(axis=0)))


# ----------------------------------------------------------------------------- documents


def _probe(
    token_ids,
    token_docs,
    doc_domains,
    experts,
    n_domains: int,
    n_experts: int,
    mask=None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A probe checked and flattened to its scored tokens: (token ids [N], documents [N],
    document domains [U], first-choice experts [N]), all int64. token_ids, token_docs [P, T]
    (or [N]); experts [P, T, k], [P, T] or [N]; doc_domains [U] in [0, D); ``mask`` bool like
    token_ids (None: every token): the tokens scored. Documents left with no scored token are
    dropped and the rest renumbered in order, so U counts the documents the scores rest on."""
    tok = np.asarray(token_ids)
    if tok.size and not np.issubdtype(tok.dtype, np.integer):
        raise ValueError(f"token_ids must be integers, got dtype {tok.dtype}")
    shape = tok.shape
    tok = tok.astype(np.int64, copy=False).ravel()
    dom = _ids(doc_domains, n_domains, "doc_domains")
    if dom.ndim != 1:
        raise ValueError(f"doc_domains must be 1-D, got shape {dom.shape}")
    docs = _ids(token_docs, max(dom.shape[0], 1), "token_docs")
    if docs.shape != shape:
        raise ValueError(f"token_docs must be {shape} like token_ids, got {docs.shape}")
    ex = np.asarray(experts)
    if ex.shape[: len(shape)] != shape or ex.ndim > len(shape) + 1:
        raise ValueError(f"experts must be {shape} or {shape} + (k,), got {ex.shape}")
    ex = ex.reshape(tok.shape[0], -1) if tok.size else ex.reshape(0, 1)
    first = _assignments(ex, tok.shape[0], n_experts)[:, 0]
    docs = docs.ravel()
    if mask is None:
        return tok, docs, dom, first
    keep = np.asarray(mask, dtype=bool)
    if keep.shape != shape:
        raise ValueError(f"mask must be {shape} like token_ids, got {keep.shape}")
    keep = keep.ravel()
    present = np.zeros(dom.shape[0], dtype=bool)
    present[docs[keep]] = True
    renumber = np.cumsum(present) - 1
    return tok[keep], renumber[docs[keep]], dom[present], first[keep]


def _compact(values: np.ndarray) -> tuple[np.ndarray, int]:
    """(index of each value among the distinct values, number of distinct values), int64.
    A dense lookup when the ids span a modest range, else ``np.unique``."""
    if values.size == 0:
        return values.astype(np.int64), 0
    lo, hi = int(values.min()), int(values.max())
    if hi - lo < 4 * values.size + (1 << 20):
        present = np.zeros(hi - lo + 1, dtype=bool)
        present[values - lo] = True
        remap = np.cumsum(present, dtype=np.int64) - 1
        return remap[values - lo], int(remap[-1]) + 1
    uniq, inv = np.unique(values, return_inverse=True)
    return inv.astype(np.int64, copy=False).ravel(), int(uniq.size)


def _unit_counts(units: np.ndarray, experts: np.ndarray, n_units: int, n_experts: int):
    """[U, E] float64 counts of each unit's tokens per expert."""
    flat = np.bincount(units * n_experts + experts, minlength=n_units * n_experts)
    return flat.reshape(n_units, n_experts).astype(np.float64)


def document_folds(doc_domains, n_domains: int, seed: int) -> np.ndarray:
    """[U] int64 in {0, 1}: a seeded half split of the documents, stratified by domain (each
    domain's documents in a random order, alternately to fold 0 and 1)."""
    dom = _ids(doc_domains, n_domains, "doc_domains")
    rng = np.random.default_rng(seed)
    folds = np.zeros(dom.shape[0], dtype=np.int64)
    for d in range(n_domains):
        mine = np.flatnonzero(dom == d)
        folds[rng.permutation(mine)] = np.arange(mine.size) % 2
    return folds


# ----------------------------------------------------------------------------- permutation null


def _permutation_labels(unit_domains: np.ndarray, n_permutations: int, seed: int) -> np.ndarray:
    """[K, U] int64 shuffled unit (document) domain labels: row i is the i-th
    ``np.random.default_rng(seed).permutation(unit_domains)``."""
    if n_permutations < 0:
        raise ValueError(f"n_permutations must be >= 0, got {n_permutations}")
    rng = np.random.default_rng(seed)
    labels = np.empty((n_permutations, unit_domains.shape[0]), dtype=np.int64)
    for i in range(n_permutations):
        labels[i] = rng.permutation(unit_domains)
    return labels


def _labelled_tables(counts: np.ndarray, labels: np.ndarray, n_domains: int) -> np.ndarray:
    """[K, D, E] domain x expert tables of unit counts [U, E] under unit labels [K, U]."""
    tables = np.empty((labels.shape[0], n_domains, counts.shape[1]), dtype=np.float64)
    for d in range(n_domains):
        tables[:, d, :] = (labels == d).astype(np.float64) @ counts  # exact: integer sums
    return tables


def permutation_tables(
    unit_expert_counts, unit_domains, n_domains: int, n_permutations: int, seed: int = 0
) -> np.ndarray:
    """[n_permutations, D, E] domain x expert tables after permuting the domain labels across
    units (documents), each document's routing kept whole. unit_expert_counts [U, E];
    unit_domains [U]. Draw i uses the i-th ``np.random.default_rng(seed).permutation``."""
    counts = _counts(unit_expert_counts, name="unit_expert_counts")
    dom = _ids(unit_domains, n_domains, "unit_domains")
    if dom.ndim != 1 or dom.shape[0] != counts.shape[0]:
        raise ValueError(
            f"unit_domains must be [{counts.shape[0]}] to match unit_expert_counts, got {dom.shape}"
        )
    labels = _permutation_labels(dom, n_permutations, seed)
    return _labelled_tables(counts, labels, n_domains)


def permutation_null(
    unit_expert_counts,
    unit_domains,
    n_domains: int,
    n_permutations: int,
    seed: int = 0,
    statistic: str = "nmi",
) -> np.ndarray:
    """[n_permutations] values of ``statistic`` (``"nmi"``, or ``"mi"``: I(D;E) in nats) of the
    :func:`permutation_tables`: the chance level of a domain-blind router on this probe, each
    document's routing kept whole. Test with ``"mi"``: permuting labels moves each domain's
    token total and so H(D), the NMI's denominator, when documents differ in size by domain
    (the NMI's null is then conservative or liberal); I(D;E) is not rescaled by it."""
    if statistic not in ("nmi", "mi"):
        raise ValueError(f"statistic must be 'nmi' or 'mi', got {statistic!r}")
    tables = permutation_tables(unit_expert_counts, unit_domains, n_domains, n_permutations, seed)
    return _nmi_batch(tables) if statistic == "nmi" else _mi_and_hd(tables)[0]


def null_summary(null) -> tuple[float, float]:
    """(mean, 95th percentile) of null values (NMIs or cond_mi); (nan, nan) for an empty
    null."""
    arr = np.asarray(null, dtype=np.float64).ravel()
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(np.percentile(arr, 95))


def permutation_p(null, observed: float) -> float:
    """Permutation p-value ``(1 + #{null >= observed}) / (1 + K)`` (ties count against the
    observation, to 1e-12); nan for an empty null or a nan observation."""
    arr = np.asarray(null, dtype=np.float64).ravel()
    if arr.size == 0 or np.isnan(observed):
        return float("nan")
    return float((1 + np.count_nonzero(arr >= observed - 1e-12)) / (1 + arr.size))


# ----------------------------------------------------------------------------- cond_mi


def _xlogx(x: np.ndarray) -> float:
    """sum of x log x over float64 counts (0 at 0)."""
    return float((x * np.log(x, out=np.zeros_like(x), where=x > 0)).sum())


@dataclass(frozen=True)
class _SharedGroups:
    """The first-choice assignments of the token ids seen in >= 2 domains, grouped by (id,
    document). G groups: t [G] id (compacted), doc [G], label [G] (the document's domain),
    size [G] tokens; pairs (group, expert) with counts: pair_group, pair_count, and pair_te,
    the pair's (id, expert) cell among the n_te cells seen."""

    n_ids: int
    t: np.ndarray
    doc: np.ndarray
    label: np.ndarray
    size: np.ndarray
    pair_group: np.ndarray
    pair_count: np.ndarray
    pair_te: np.ndarray
    n_te: int

    @classmethod
    def of(cls, tok, docs, doc_domains, first, n_domains: int, n_experts: int) -> _SharedGroups:
        empty = np.zeros(0, dtype=np.int64)
        if tok.size == 0:
            return cls(
                0, empty, empty, empty, empty.astype(float), empty, empty.astype(float), empty, 0
            )
        t_idx, n_tok = _compact(tok)
        dom = doc_domains[docs]
        seen = np.zeros((n_tok, n_domains), dtype=bool)
        seen[t_idx, dom] = True
        keep = seen.sum(axis=1)[t_idx] >= 2
        t_idx, n_ids = _compact(t_idx[keep]) if keep.any() else (t_idx[:0], 0)
        docs, ex = docs[keep], first[keep]
        n_docs = int(doc_domains.shape[0])
        g_key = t_idx * n_docs + docs
        g_uniq, g_of = np.unique(g_key, return_inverse=True)
        g_of = g_of.ravel()
        t, doc = np.divmod(g_uniq, n_docs)
        p_uniq, p_count = np.unique(g_of * n_experts + ex, return_counts=True)
        pair_group, pair_expert = np.divmod(p_uniq, n_experts)
        size = np.bincount(g_of, minlength=g_uniq.size).astype(np.float64)
        pair_te, n_te = _compact(t[pair_group] * n_experts + pair_expert)
        return cls(
            n_ids,
            t,
            doc,
            doc_domains[doc],
            size,
            pair_group,
            p_count.astype(np.float64),
            pair_te,
            n_te,
        )

    @functools.cached_property
    def label_free_terms(self) -> float:
        """``sum n_t log n_t - sum n_te log n_te``: the part of the bracket no labelling
        changes."""
        n_t = np.bincount(self.t, weights=self.size, minlength=self.n_ids)
        n_te = np.bincount(self.pair_te, weights=self.pair_count, minlength=self.n_te)
        return _xlogx(n_t) - _xlogx(n_te)

    def cond_mi(self, labels: np.ndarray, n_domains: int) -> float:
        """I(D;E|T) over the ids that are in >= 2 domains under these group ``labels`` [G]:
        ``(1/N) [sum n_tde log n_tde + sum n_t log n_t - sum n_td log n_td - sum n_te log
        n_te]``, N the tokens of the shared ids; an id of one domain adds 0 to the bracket, so
        it is summed over all ids."""
        if self.t.size == 0:
            return 0.0
        n_ids, n_dom = self.n_ids, n_domains
        n_td = np.bincount(self.t * n_dom + labels, weights=self.size, minlength=n_ids * n_dom)
        n_td = n_td.reshape(n_ids, n_dom)
        shared = np.count_nonzero(n_td, axis=1) >= 2
        n = float(n_td[shared].sum())
        if n <= 0:
            return 0.0
        n_tde = np.bincount(
            self.pair_te * n_dom + labels[self.pair_group],
            weights=self.pair_count,
            minlength=self.n_te * n_dom,
        )
        xlogx = self.xlogx_of_count  # counts are whole numbers: a look-up, exact
        bracket = float(xlogx[n_tde.astype(np.int64)].sum() - xlogx[n_td.astype(np.int64)].sum())
        return max((bracket + self.label_free_terms) / n, 0.0)

    def null(self, n_domains: int, n_permutations: int, seed: int) -> np.ndarray:
        """[n_permutations] cond_mi under :func:`_within_id_permutations` of the labels."""
        perms = _within_id_permutations(self, n_permutations, seed)
        return np.array([self.cond_mi(labels, n_domains) for labels in perms], dtype=float)

    @functools.cached_property
    def xlogx_of_count(self) -> np.ndarray:
        """[max count + 1] float64: ``c log c`` for every count c an (id, domain) cell can hold."""
        top = int(np.bincount(self.t, weights=self.size).max()) if self.t.size else 0
        c = np.arange(top + 1, dtype=np.float64)
        return c * np.log(c, out=np.zeros_like(c), where=c > 0)


def conditional_mi(
    token_ids, token_docs, doc_domains, experts, n_domains: int, n_experts: int
) -> float:
    """``I(D;E | T) = sum_t p(t) I(D;E | T=t)`` (nats, plug-in) of the first-choice routing, p
    over the tokens whose id is seen in >= 2 domains; 0.0 when there are none."""
    tok, docs, dom, first = _probe(
        token_ids, token_docs, doc_domains, experts, n_domains, n_experts
    )
    groups = _SharedGroups.of(tok, docs, dom, first, n_domains, n_experts)
    return groups.cond_mi(groups.label, n_domains)


def _within_id_permutations(groups: _SharedGroups, n_permutations: int, seed: int):
    """Yield [G] group labels, each the observed labels permuted among the groups of each id
    (one ``np.random.default_rng(seed)`` stream)."""
    rng = np.random.default_rng(seed)
    by_id = np.argsort(groups.t, kind="stable")
    sorted_labels = groups.label[by_id]
    t = groups.t.astype(np.float64)  # + U[0, 0.5): shuffles within each id, never across
    for _ in range(n_permutations):
        order = np.argsort(t + 0.5 * rng.random(t.size))
        labels = np.empty_like(groups.label)
        labels[order] = sorted_labels
        yield labels


def conditional_mi_null(
    token_ids,
    token_docs,
    doc_domains,
    experts,
    n_domains: int,
    n_experts: int,
    n_permutations: int,
    seed: int = 0,
) -> np.ndarray:
    """[n_permutations] cond_mi after permuting the domain labels among the (id, document)
    groups of each id seen in >= 2 domains: no domain effect beyond the token, the shared ids,
    their expert counts and every document's routing of each id kept."""
    if n_permutations < 0:
        raise ValueError(f"n_permutations must be >= 0, got {n_permutations}")
    tok, docs, dom, first = _probe(
        token_ids, token_docs, doc_domains, experts, n_domains, n_experts
    )
    groups = _SharedGroups.of(tok, docs, dom, first, n_domains, n_experts)
    return groups.null(n_domains, n_permutations, seed)


# ----------------------------------------------------------------------------- cross-fitting


@dataclass(frozen=True)
class CrossFitted:
    """The domain x expert table [D, E] (float64, fractional) of the cross-fitted token-id
    router, summed over both directions, and its NMI."""

    token_id_table: np.ndarray

    @property
    def token_id_nmi(self) -> float:
        return nmi(self.token_id_table)


def cross_fitted_routers(
    token_ids,
    token_docs,
    doc_domains,
    experts,
    n_domains: int,
    n_experts: int,
    seed: int = 0,
    mask=None,
) -> CrossFitted:
    """Fit on one half of the documents (:func:`document_folds`), score on the other, both
    ways. Token-id router: a token is sent by its id's expert distribution in the fit half (an
    id unseen there: the fit half's expert marginal); each scored token adds its router's
    distribution to its domain's row. Distributions, not modal experts: a mode sharpens
    stochastic routing into domain signal that is not there."""
    tok, docs, dom, first = _probe(
        token_ids, token_docs, doc_domains, experts, n_domains, n_experts, mask
    )
    return _token_router(tok, docs, dom, first, n_domains, n_experts, seed)


def _token_router(tok, docs, dom, first, n_dom: int, n_exp: int, seed: int) -> CrossFitted:
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


def held_out_gains(
    token_ids,
    token_docs,
    doc_domains,
    experts,
    n_domains: int,
    n_experts: int,
    n_permutations: int,
    seed: int = 0,
    mask=None,
) -> HeldOutGains:
    """The three held-out gains of the first-choice routing and their ``n_permutations``-draw
    nulls; the halves are :func:`document_folds` of ``seed``, the nulls draw from ``seed``."""
    if n_permutations < 0:
        raise ValueError(f"n_permutations must be >= 0, got {n_permutations}")
    flat = _probe(token_ids, token_docs, doc_domains, experts, n_domains, n_experts, mask)
    return _gains(*flat, n_domains, n_experts, n_permutations, seed)


def _gains(
    tok, docs, dom, first, n_dom: int, n_exp: int, k: int, seed: int, advance: Advance = None
) -> HeldOutGains:
    """The gains of :func:`held_out_gains` on flat checked arrays; the two [K, N]-sized nulls
    are drawn and scored a batch at a time (memory O(k N) per batch), ``advance(rows)`` called
    after each batch (2 K rows in all)."""
    folds = document_folds(dom, n_dom, seed)
    doc_counts = _unit_counts(docs, first, dom.shape[0], n_exp)
    observed_labels = np.concatenate([dom[None, :], fold_permutations(dom, folds, k, seed)])
    domain = domain_gain_batch(doc_counts, observed_labels, folds, n_dom)

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


# ----------------------------------------------------------------------------- probe intervals


def _bootstrap_weights(doc_domains: np.ndarray, n_domains: int, n_draws: int, seed: int):
    """[n_draws, U] float64 multiplicities of a bootstrap over documents, within each domain
    (each domain keeps its document count)."""
    rng = np.random.default_rng(seed)
    weights = np.zeros((n_draws, doc_domains.shape[0]))
    for d in range(n_domains):
        mine = np.flatnonzero(doc_domains == d)
        if mine.size:
            weights[:, mine] = rng.multinomial(
                mine.size, np.full(mine.size, 1 / mine.size), size=n_draws
            )
    return weights


def _weighted_tables(weights: np.ndarray, doc_counts: np.ndarray, doc_domains, n_domains: int):
    """[B, D, E] domain x expert tables of the documents' counts [U, E] weighted [B, U]."""
    tables = np.empty((weights.shape[0], n_domains, doc_counts.shape[1]))
    for d in range(n_domains):
        mine = doc_domains == d
        tables[:, d, :] = weights[:, mine] @ doc_counts[mine]
    return tables


def _jackknife_se(
    tables: np.ndarray,
    weights: np.ndarray,
    counts: list[np.ndarray],
    doc_domains: np.ndarray,
    statistic,
) -> np.ndarray:
    """[B] jackknife standard errors of ``statistic`` over the documents of each weighted
    resample: ``tables`` [C, B, D, E] (one per checkpoint in ``counts``, each [U, E]),
    ``weights`` [B, U] the resample's multiplicities; removing one copy of document u at a
    time, ``se^2 = (n - 1) / n * sum_u w_u (theta_(u) - mean)^2`` with n = sum_u w_u."""
    n_draws, n_docs = weights.shape
    cells = n_docs * tables[0, 0].size * len(counts)
    step = max(1, 4_000_000 // max(cells, 1))
    out = np.empty(n_draws)
    for start in range(0, n_draws, step):
        stop = min(start + step, n_draws)
        per_checkpoint = []
        for table, doc_counts in zip(tables, counts, strict=True):
            loo = np.repeat(table[start:stop, None], n_docs, axis=1)  # [b, U, D, E]
            loo[:, np.arange(n_docs), doc_domains, :] -= doc_counts[None]
            per_checkpoint.append(_nmi_batch(loo))
        values = statistic(per_checkpoint)  # [b, U]
        w = weights[start:stop]
        n = w.sum(axis=1)
        mean = (w * values).sum(axis=1) / n
        var = (n - 1) / n * (w * (values - mean[:, None]) ** 2).sum(axis=1)
        out[start:stop] = np.sqrt(np.maximum(var, 0.0))
    return out


def _studentised_interval(
    counts: list[np.ndarray],
    doc_domains: np.ndarray,
    n_domains: int,
    n_draws: int,
    seed: int,
    confidence: float,
    statistic,
) -> tuple[float, float]:
    """Studentised (bootstrap-t) interval of ``statistic`` (a function of the NMIs of each
    checkpoint's table: list of arrays -> array) over a within-domain document bootstrap:
    ``t* = (theta* - theta) / se*``, se* the jackknife SE inside each resample, and ``(theta -
    t*_hi se, theta - t*_lo se)``. ``counts``: each checkpoint's document expert counts [U, E],
    the same documents and resamples for all (paired). (nan, nan) without draws or tokens."""
    if n_draws < 1 or any(c.sum() == 0 for c in counts):
        return float("nan"), float("nan")
    ones = np.ones((1, doc_domains.shape[0]))
    weights = _bootstrap_weights(doc_domains, n_domains, n_draws, seed)
    full = np.stack([_weighted_tables(ones, c, doc_domains, n_domains) for c in counts])
    drawn = np.stack([_weighted_tables(weights, c, doc_domains, n_domains) for c in counts])
    theta = float(statistic([_nmi_batch(t) for t in full])[0])
    se = float(_jackknife_se(full, ones, counts, doc_domains, statistic)[0])
    theta_b = statistic([_nmi_batch(t) for t in drawn])
    se_b = _jackknife_se(drawn, weights, counts, doc_domains, statistic)
    ok = se_b > 0
    if not ok.any() or se <= 0:
        return theta, theta
    t = (theta_b[ok] - theta) / se_b[ok]
    low, high = np.percentile(t, 100 * np.array([(1 - confidence) / 2, (1 + confidence) / 2]))
    return float(theta - high * se), float(theta - low * se)


def _nmi_of(values: list[np.ndarray]) -> np.ndarray:
    """The NMI of the one checkpoint."""
    return values[0]


def _change_of(values: list[np.ndarray]) -> np.ndarray:
    """NMI after minus NMI before."""
    return values[1] - values[0]


def document_bootstrap(
    token_ids,
    token_docs,
    doc_domains,
    experts,
    n_domains: int,
    n_experts: int,
    n_draws: int = 200,
    seed: int = 0,
    confidence: float = 0.95,
    mask=None,
) -> tuple[float, float]:
    """The probe interval of the NMI: a studentised (bootstrap-t) interval over ``n_draws``
    resamples of the probe's documents, with replacement within each domain, each resample's
    standard error from its leave-one-document-out jackknife. (nan, nan)
    without draws. The uncertainty of which documents the probe holds, for one run; the
    spread over seeds is another. Its coverage is checked on the real probe layouts
    (tests/analysis/test_calibration.py; docs/method.md): see :func:`interval_is_approximate`."""
    _, docs, dom, first = _probe(
        token_ids, token_docs, doc_domains, experts, n_domains, n_experts, mask
    )
    doc_counts = _unit_counts(docs, first, dom.shape[0], n_experts)
    return _nmi_interval(doc_counts, dom, n_domains, n_draws, seed, confidence)


def _nmi_interval(
    doc_counts: np.ndarray,
    doc_domains: np.ndarray,
    n_domains: int,
    n_draws: int,
    seed: int,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """:func:`document_bootstrap` from the documents' expert counts [U, E]."""
    return _studentised_interval(
        [doc_counts], doc_domains, n_domains, n_draws, seed, confidence, _nmi_of
    )


def paired_change_interval(
    token_ids,
    token_docs,
    doc_domains,
    experts_before,
    experts_after,
    n_domains: int,
    n_experts: int,
    n_draws: int,
    seed: int,
    confidence: float = 0.95,
    mask=None,
) -> tuple[float, float]:
    """Document-paired studentised bootstrap interval of NMI(after) - NMI(before) of one run on one
    probe (say the final checkpoint and step 0): each draw resamples the documents (within
    each domain) once and scores both checkpoints' first-choice routing on that one resample,
    so the probe's document make-up cancels in the difference. experts_before / _after: [P, T,
    k], [P, T] or [N] like ``token_ids``; (nan, nan) without draws or tokens."""
    _, docs, dom, before = _probe(
        token_ids, token_docs, doc_domains, experts_before, n_domains, n_experts, mask
    )
    _, _, _, after = _probe(
        token_ids, token_docs, doc_domains, experts_after, n_domains, n_experts, mask
    )
    if docs.size == 0:
        return float("nan"), float("nan")
    counts = [_unit_counts(docs, e, dom.shape[0], n_experts) for e in (before, after)]
    return _studentised_interval(counts, dom, n_domains, n_draws, seed, confidence, _change_of)


def interval_is_approximate(doc_domains, doc_sizes, n_domains: int) -> bool:
    """Whether the probe interval of the NMI is to be read as approximate: unless the probe is
    size-matched (as many documents in every domain, as many scored tokens in every document)
    with at least :data:`INTERVAL_MIN_DOCUMENTS` documents per domain, the layouts its coverage
    was checked on (docs/method.md: 93-96% on the matched study and hub probes; 90.5% on the
    unmatched study probe). doc_domains [U]; doc_sizes [U] scored tokens per document."""
    dom = _ids(doc_domains, n_domains, "doc_domains")
    sizes = np.asarray(doc_sizes)
    per_domain = np.bincount(dom, minlength=n_domains)
    matched = per_domain.size > 0 and (per_domain == per_domain[0]).all()
    matched = matched and sizes.size > 0 and (sizes == sizes.flat[0]).all()
    return not (matched and per_domain.min() >= INTERVAL_MIN_DOCUMENTS)


# ----------------------------------------------------------------------------- one layer


@dataclass(frozen=True)
class LayerScores:
    """All scores of one MoE layer on the probe's scored tokens (all of them, or those a
    size-matched probe keeps), at the unit of replication inside a run: the document (a probe
    text; blocks of one text are not independent). For top-k > 1 every score reads the first
    choice (slot 0, the highest router logit), so that NMIs share one scale. Nats throughout;
    p-values are permutation p-values ``(1 + #{null >= observed}) / (1 + K)``.

    mi: I(D;E) of the domain x expert table: the statistic of the NMI's test.
    nmi, nmi_low, nmi_high: the effect size I(D;E) / H(D), and its 95% probe interval
        (studentised bootstrap over documents, resampled within each domain).
    nmi_interval_approximate: the interval's coverage may be below 93% on this probe (not
        size-matched, or too few documents; :func:`interval_is_approximate`): print it as
        approximate.
    null_mean, null_p95: the NMI of the document-level permutation null (domain labels
        permuted across documents): chance levels on the NMI's scale.
    null_p: the test's p-value, computed on I(D;E) (its scale is not moved by a permutation).
    domain_gain: held-out log-loss gain (nats per token) of q(e | d) over q(e), fitted on one
        half of the documents and scored on the other, both ways: the domain signal that
        replicates on documents it was not fitted on; with its null (labels permuted across
        the documents of each half): domain_gain_null_mean, _null_p95, domain_gain_p.
    token_gain: the same of q(e | token id) over q(e); null: experts shuffled among the tokens
        of each document (a token-blind router keeps every document's expert counts):
        token_gain_null_mean, _null_p95, token_gain_p. token_gain_ref_domain,
        token_gain_ref_token: this probe's references, the token gain of a token-blind domain
        router (domain d -> expert d mod E) and of a pure token router (each id one expert).
    domain_beyond_token_gain: q(e | id, d) over q(e | id): domain signal the token id does not
        carry; null: labels permuted among the documents holding each id (within each half):
        domain_beyond_token_gain_null_mean, _null_p95, domain_beyond_token_gain_p.
    cond_mi_excess: plug-in I(D;E | T) over the ids seen in >= 2 domains minus its null's mean
        (labels permuted among each shared id's (id, document) groups): the plug-in's bias
        removed; cond_mi_null_p its p-value (conservative under document preference).
    token_id_nmi: NMI of the cross-fitted token-id router (each token sent by its id's expert
        distribution on the other half of the documents).
    usage_entropy: H(E) of expert usage, in [0, log E].
    router_entropy: passed through from the caller (measured on router logits).
    n_documents, n_tokens: documents and tokens the scores rest on.
    """

    mi: float
    nmi: float
    nmi_low: float
    nmi_high: float
    nmi_interval_approximate: bool
    null_mean: float
    null_p95: float
    null_p: float
    domain_gain: float
    domain_gain_null_mean: float
    domain_gain_null_p95: float
    domain_gain_p: float
    token_gain: float
    token_gain_null_mean: float
    token_gain_null_p95: float
    token_gain_p: float
    token_gain_ref_domain: float
    token_gain_ref_token: float
    domain_beyond_token_gain: float
    domain_beyond_token_gain_null_mean: float
    domain_beyond_token_gain_null_p95: float
    domain_beyond_token_gain_p: float
    cond_mi_excess: float
    cond_mi_null_p: float
    token_id_nmi: float
    usage_entropy: float
    router_entropy: float
    n_documents: int
    n_tokens: int

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> LayerScores:
        """The scores from a trajectory.csv row (strings as csv writes them), by field type."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            text = row[f.name]
            if f.type == "bool":
                values[f.name] = str(text).strip().lower() in ("true", "1", "1.0")
            elif f.type == "int":
                values[f.name] = int(float(text))
            else:
                values[f.name] = float(text)
        return cls(**values)


def score_layer(
    token_ids,
    token_docs,
    doc_domains,
    experts,
    n_domains: int,
    n_experts: int,
    n_permutations: int,
    seed: int = 0,
    router_entropy: float = float("nan"),
    mask=None,
    advance: Advance = None,
) -> LayerScores:
    """Score one MoE layer on a probe: token_ids, token_docs [P, T]; doc_domains [U]; experts
    [P, T, k] or [P, T] (first choice read); ``mask`` bool [P, T]: the tokens scored (None:
    all). The NMI null, the gains' nulls, the cond_mi null, the document folds and the
    bootstrap each draw from ``seed`` (``n_permutations`` draws each). ``advance(draws)``:
    told as the two costly nulls (token gain, domain beyond token) progress, 2 K draws in
    all. Memory: O(N) and batches of :func:`~moe_emergence.analysis.heldout.rows_per_batch`
    draws, never O(K N)."""
    tok, docs, dom, first = _probe(
        token_ids, token_docs, doc_domains, experts, n_domains, n_experts, mask
    )
    n_docs = int(dom.shape[0])
    doc_counts = _unit_counts(docs, first, n_docs, n_experts)
    table = contingency(dom[docs], first, n_domains, n_experts)
    null_tables = _labelled_tables(
        doc_counts, _permutation_labels(dom, n_permutations, seed), n_domains
    )
    null_mi, _ = _mi_and_hd(null_tables)
    null_mean, null_p95 = null_summary(_nmi_batch(null_tables))
    observed_mi = mutual_information(table)
    gains = _gains(tok, docs, dom, first, n_domains, n_experts, n_permutations, seed, advance)
    groups = _SharedGroups.of(tok, docs, dom, first, n_domains, n_experts)
    cond = groups.cond_mi(groups.label, n_domains)
    cond_null = groups.null(n_domains, n_permutations, seed)
    nmi_low, nmi_high = _nmi_interval(doc_counts, dom, n_domains, n_permutations, seed)
    return LayerScores(
        mi=observed_mi,
        nmi=nmi(table),
        nmi_low=nmi_low,
        nmi_high=nmi_high,
        nmi_interval_approximate=interval_is_approximate(dom, doc_counts.sum(axis=1), n_domains),
        null_mean=null_mean,
        null_p95=null_p95,
        null_p=permutation_p(null_mi, observed_mi),
        **_tested("domain_gain", gains.domain, gains.domain_null),
        **_tested("token_gain", gains.token, gains.token_null),
        token_gain_ref_domain=gains.token_ref_domain,
        token_gain_ref_token=gains.token_ref_token,
        **_tested(
            "domain_beyond_token_gain", gains.domain_beyond_token, gains.domain_beyond_token_null
        ),
        cond_mi_excess=cond - null_summary(cond_null)[0] if cond_null.size else float("nan"),
        cond_mi_null_p=permutation_p(cond_null, cond),
        token_id_nmi=_token_router(tok, docs, dom, first, n_domains, n_experts, seed).token_id_nmi,
        usage_entropy=usage_entropy(table),
        router_entropy=float(router_entropy),
        n_documents=n_docs,
        n_tokens=int(tok.size),
    )


def _tested(name: str, observed: float, null: np.ndarray) -> dict[str, float]:
    """``{name, name_null_mean, name_null_p95, name_p}`` of a statistic and its null."""
    mean, p95 = null_summary(null)
    return {
        name: observed,
        f"{name}_null_mean": mean,
        f"{name}_null_p95": p95,
        f"{name}_p": permutation_p(null, observed),
    }


# ----------------------------------------------------------------------------- table views


def collapsed_expert(table, threshold: float = 0.9) -> tuple[int, float] | None:
    """(expert, share) when one expert took more than ``threshold`` of all assignments of the
    [D, E] table, else None (also None for an empty table)."""
    arr = _counts(table)
    total = arr.sum()
    if total <= 0:
        return None
    usage = arr.sum(axis=0)
    expert = int(np.argmax(usage))
    share = float(usage[expert] / total)
    return (expert, share) if share > threshold else None


def shares(table) -> np.ndarray:
    """[D, E] float64: each row of the table divided by its total; all-zero rows stay 0."""
    arr = _counts(table)
    total = arr.sum(axis=1, keepdims=True)
    return np.divide(arr, total, out=np.zeros_like(arr), where=total > 0)
