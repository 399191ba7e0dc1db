"""Scores of how much MoE routing depends on the data domain (numpy only, all in nats).

The unit of replication inside a run is the DOCUMENT (a probe text): the tokens of one text,
and the blocks cut from it, are not independent, so every null permutes and every interval
resamples documents, and every control fitted on the probe is cross-fitted on held-out
documents. For top-k > 1 every score reads the first choice (slot 0), so NMIs share one scale.

- ``nmi = I(D;E) / H(D)`` of the domain x expert table: 0 when routing ignores the domain, 1
  when the chosen expert determines it. Its null (:func:`permutation_null`) permutes the domain
  labels across documents: the chance level of a domain-blind router on this probe, whatever
  each document's own preferences.
- ``cond_mi = I(D;E | T)``, plug-in, over the token ids seen in >= 2 domains: domain information
  left once the token id is known. The plug-in is biased upward when ids are rare; its null
  (:func:`conditional_mi_null`) permutes the domain labels among the (id, document) groups of
  each shared id, which keeps the set of shared ids, every id's expert counts and every
  document's routing of an id: the level reached with no domain effect beyond the token.
- The cross-fitted controls (:func:`cross_fitted_routers`): a token-id router (each id sent by
  its expert distribution) and a domain-only router (each domain by its expert distribution),
  each fitted on one half of the documents and scored on the other, both ways. Their NMIs are
  beside the NMI, never turned into a "share explained".
- The probe interval of the NMI (:func:`document_bootstrap`): basic bootstrap over documents,
  resampled within each domain.

Shapes: D domains, E experts, k experts per token, N tokens, U documents. ``0 * log 0 = 0``;
float64 throughout.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

__all__ = [
    "CrossFitted",
    "LayerScores",
    "collapsed_expert",
    "conditional_mi",
    "conditional_mi_null",
    "contingency",
    "cross_fitted_routers",
    "document_bootstrap",
    "document_folds",
    "entropy",
    "mutual_information",
    "nmi",
    "null_summary",
    "permutation_null",
    "permutation_p",
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
    token_ids, token_docs, doc_domains, experts, n_domains: int, n_experts: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A probe checked and flattened: (token ids [N], documents [N], document domains [U],
    first-choice experts [N]), all int64. token_ids, token_docs [P, T] (or [N]); experts
    [P, T, k], [P, T] or [N]; doc_domains [U] in [0, D)."""
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
    return tok, docs.ravel(), dom, first


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


def permutation_null(
    unit_expert_counts,
    unit_domains,
    n_domains: int,
    n_permutations: int,
    seed: int = 0,
) -> np.ndarray:
    """[n_permutations] NMIs of the domain x expert table after permuting the domain labels
    across units (documents): the chance level with each document's routing kept whole.
    unit_expert_counts [U, E]; unit_domains [U]. Draw i uses the i-th
    ``np.random.default_rng(seed).permutation``."""
    counts = _counts(unit_expert_counts, name="unit_expert_counts")
    dom = _ids(unit_domains, n_domains, "unit_domains")
    if dom.ndim != 1 or dom.shape[0] != counts.shape[0]:
        raise ValueError(
            f"unit_domains must be [{counts.shape[0]}] to match unit_expert_counts, got {dom.shape}"
        )
    labels = _permutation_labels(dom, n_permutations, seed)
    return _nmi_batch(_labelled_tables(counts, labels, n_domains))


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
    """Domain x expert tables [D, E] (float64, fractional) of the two cross-fitted control
    routers, summed over both directions, and their NMIs."""

    token_id_table: np.ndarray
    domain_only_table: np.ndarray

    @property
    def token_id_nmi(self) -> float:
        return nmi(self.token_id_table)

    @property
    def domain_only_nmi(self) -> float:
        return nmi(self.domain_only_table)


def cross_fitted_routers(
    token_ids, token_docs, doc_domains, experts, n_domains: int, n_experts: int, seed: int = 0
) -> CrossFitted:
    """Fit on one half of the documents (:func:`document_folds`), score on the other, both
    ways. Token-id router: a token is sent by its id's expert distribution in the fit half (an
    id unseen there: the fit half's expert marginal). Domain-only router: by its domain's
    expert distribution in the fit half (a domain absent there: the marginal). Each scored token
    adds its router's distribution to its domain's row. Distributions, not modal experts: a
    mode sharpens stochastic routing into domain signal that is not there (a random router's
    modal domain-only router has NMI 1)."""
    tok, docs, dom, first = _probe(
        token_ids, token_docs, doc_domains, experts, n_domains, n_experts
    )
    n_dom, n_exp = n_domains, n_experts
    token_table = np.zeros((n_dom, n_exp))
    domain_table = np.zeros((n_dom, n_exp))
    if tok.size == 0:
        return CrossFitted(token_table, domain_table)
    fold = document_folds(dom, n_dom, seed)[docs]
    t_idx, n_tok = _compact(tok)
    tok_dom = dom[docs]
    for fit in (0, 1):
        fit_m, score_m = fold == fit, fold != fit
        if not fit_m.any() or not score_m.any():
            continue
        marginal = np.bincount(first[fit_m], minlength=n_exp) / fit_m.sum()
        by_id = _unit_counts(t_idx[fit_m], first[fit_m], n_tok, n_exp)
        by_dom = _unit_counts(tok_dom[fit_m], first[fit_m], n_dom, n_exp)
        scored = _unit_counts(tok_dom[score_m], t_idx[score_m], n_dom, n_tok)  # [D, ids]
        token_table += scored @ _rows_or(by_id, marginal)
        domain_table += scored.sum(axis=1)[:, None] * _rows_or(by_dom, marginal)
    return CrossFitted(token_table, domain_table)


def _rows_or(counts: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Each row of ``counts`` [R, E] as a distribution; an all-zero row: ``fallback`` [E]."""
    total = counts.sum(axis=1, keepdims=True)
    rows = np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)
    rows[total[:, 0] == 0] = fallback
    return rows


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
) -> tuple[float, float]:
    """The probe interval of the NMI: a basic (reverse-percentile) bootstrap over ``n_draws``
    resamples of the probe's documents, with replacement within each domain; ``(2 nmi - q_hi,
    2 nmi - q_lo)``, which undoes the upward shift a plug-in NMI gets from resampled
    (duplicated) documents (a percentile interval of a near-zero NMI can exclude the NMI
    itself). Not clipped at 0. (nan, nan) without draws. The uncertainty of which documents the
    probe holds, for one run; the spread over seeds is another."""
    _, docs, dom, first = _probe(token_ids, token_docs, doc_domains, experts, n_domains, n_experts)
    doc_counts = _unit_counts(docs, first, dom.shape[0], n_experts)
    observed = nmi(contingency(dom[docs], first, n_domains, n_experts))
    return _basic_interval(doc_counts, dom, observed, n_domains, n_draws, seed, confidence)


def _basic_interval(
    doc_counts: np.ndarray,
    doc_domains: np.ndarray,
    observed: float,
    n_domains: int,
    n_draws: int,
    seed: int,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """:func:`document_bootstrap` from the documents' expert counts [U, E] and the NMI."""
    if n_draws < 1 or doc_counts.sum() == 0:
        return float("nan"), float("nan")
    weights = _bootstrap_weights(doc_domains, n_domains, n_draws, seed)
    tables = np.empty((n_draws, n_domains, doc_counts.shape[1]))
    for d in range(n_domains):
        mine = doc_domains == d
        tables[:, d, :] = weights[:, mine] @ doc_counts[mine]
    q = 100 * np.array([(1 - confidence) / 2, (1 + confidence) / 2])
    low, high = np.percentile(_nmi_batch(tables), q)
    return float(2 * observed - high), float(2 * observed - low)


# ----------------------------------------------------------------------------- one layer


@dataclass(frozen=True)
class LayerScores:
    """All scores of one MoE layer on the probe, at the unit of replication inside a run: the
    document (a probe text; blocks of one text are not independent). For top-k > 1 every score
    reads the first choice (slot 0, the highest router logit), so that NMIs share one scale.

    nmi, nmi_low, nmi_high: NMI of the domain x expert table, and its 95% probe interval
        (basic bootstrap over documents, resampled within each domain: not clipped at 0).
    null_mean, null_p95, null_p: the document-level permutation null of the NMI (domain labels
        permuted across documents): its mean, 95th percentile, and the permutation p-value
        ``(1 + #{null >= nmi}) / (1 + K)``.
    cond_mi: I(D;E | T) (nats, plug-in, biased upward: read it only against its null) over
        the token ids seen in >= 2 domains.
    cond_mi_null_mean, cond_mi_null_p95, cond_mi_null_p: its null, domain labels permuted among
        the (id, document) groups of each shared id (the shared set kept); cond_mi is domain
        signal beyond the token only above it.
    token_id_nmi: NMI of the cross-fitted token-id router (each token sent by its id's expert
        distribution on the other half of the documents; ids unseen there by that half's
        expert marginal): the domain signal that token identity alone would carry.
    domain_only_nmi: NMI of the cross-fitted domain-only router (each token sent by its
        domain's expert distribution on the other half): the domain signal that replicates on
        held-out documents.
    usage_entropy: H(E) of expert usage, in [0, log E].
    router_entropy: passed through from the caller (measured on router logits).
    n_documents: probe documents the scores rest on.
    """

    nmi: float
    nmi_low: float
    nmi_high: float
    null_mean: float
    null_p95: float
    null_p: float
    cond_mi: float
    cond_mi_null_mean: float
    cond_mi_null_p95: float
    cond_mi_null_p: float
    token_id_nmi: float
    domain_only_nmi: float
    usage_entropy: float
    router_entropy: float
    n_documents: int


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
) -> LayerScores:
    """Score one MoE layer on a probe: token_ids, token_docs [P, T]; doc_domains [U]; experts
    [P, T, k] or [P, T] (first choice read). The NMI null, the cond_mi null, the document folds
    and the bootstrap each draw from ``seed`` (``n_permutations`` draws each)."""
    tok, docs, dom, first = _probe(
        token_ids, token_docs, doc_domains, experts, n_domains, n_experts
    )
    n_docs = int(dom.shape[0])
    doc_counts = _unit_counts(docs, first, n_docs, n_experts)
    table = contingency(dom[docs], first, n_domains, n_experts)
    observed = nmi(table)
    null = permutation_null(doc_counts, dom, n_domains, n_permutations, seed)
    null_mean, null_p95 = null_summary(null)
    groups = _SharedGroups.of(tok, docs, dom, first, n_domains, n_experts)
    cond = groups.cond_mi(groups.label, n_domains)
    cond_null = groups.null(n_domains, n_permutations, seed)
    cond_null_mean, cond_null_p95 = null_summary(cond_null)
    routers = cross_fitted_routers(tok, docs, dom, first, n_domains, n_experts, seed)
    nmi_low, nmi_high = _basic_interval(doc_counts, dom, observed, n_domains, n_permutations, seed)
    return LayerScores(
        nmi=observed,
        nmi_low=nmi_low,
        nmi_high=nmi_high,
        null_mean=null_mean,
        null_p95=null_p95,
        null_p=permutation_p(null, observed),
        cond_mi=cond,
        cond_mi_null_mean=cond_null_mean,
        cond_mi_null_p95=cond_null_p95,
        cond_mi_null_p=permutation_p(cond_null, cond),
        token_id_nmi=routers.token_id_nmi,
        domain_only_nmi=routers.domain_only_nmi,
        usage_entropy=usage_entropy(table),
        router_entropy=float(router_entropy),
        n_documents=n_docs,
    )


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
