"""Held-out (cross-fitted) log-loss gains of routing predictors, and their nulls (numpy only).

A gain asks whether knowing X (the domain, the token id, or the domain on top of the token id)
predicts the expert a HELD-OUT document's tokens go to better than not knowing it. The
documents are split in two halves (:func:`moe_emergence.analysis.scores.document_folds`);
the predictors are fitted on one half and scored on the other, both ways:

    gain = (1 / N) sum over scored tokens i of  log q_fit(e_i | fine_i) - log q_fit(e_i | coarse_i)

in nats per token, N the probe's scored tokens (each scored once, in the half it is not fitted
on). It is near 0 or negative (over-fitting) when X carries nothing that replicates on other
documents, and positive when it does: a signal confined to the documents it was fitted on
(document preference) cannot give a held-out gain.

Smoothing (so that cells unseen in the fit half fall back to the coarser prediction):
``q(e) = (n_e + 1/2) / (n + E/2)`` (add-1/2 over experts), and a fine cell c with coarse
prediction ``q(e | coarse(c))`` gets ``q(e | c) = (n_ce + B q(e | coarse(c))) / (n_c + B)``,
``B = SMOOTHING`` pseudo-tokens (a Dirichlet prior centred on the coarser prediction). A cell
unseen in the fit half predicts exactly the coarser distribution and adds 0.

- domain gain: fine = domain, coarse = none (q(e)).
- token gain: fine = token id, coarse = none.
- domain beyond token: fine = (token id, domain), coarse = token id (itself smoothed toward
  q(e)): domain information the token id does not carry.

Every function here takes flat, checked int64 arrays (the callers in
:mod:`moe_emergence.analysis.scores` check and flatten a probe) and draws labellings in
batches of ``CHUNK`` so that memory stays bounded.
"""

from __future__ import annotations

import numpy as np

SMOOTHING = 16.0  # B: pseudo-tokens of the coarser prediction in every fine cell
CHUNK = 32  # labellings per batch, at most
CELLS_PER_BATCH = 4_000_000  # float64 cells a batch may hold (32 MB)


def _chunk(cells: int) -> int:
    """Labellings per batch when each needs ``cells`` float64 cells."""
    return max(1, min(CHUNK, CELLS_PER_BATCH // max(cells, 1)))


def _log_marginal(counts: np.ndarray) -> np.ndarray:
    """log q(e) of expert counts [..., E], add-1/2 smoothed."""
    n_exp = counts.shape[-1]
    return np.log((counts + 0.5) / (counts.sum(axis=-1, keepdims=True) + n_exp / 2))


def _log_fine(fit: np.ndarray, coarse_prob: np.ndarray) -> np.ndarray:
    """log q(e | cell) of fit counts [..., C, E] smoothed toward ``coarse_prob`` (broadcast to
    [..., C, E]) with :data:`SMOOTHING` pseudo-tokens."""
    total = fit.sum(axis=-1, keepdims=True)
    return np.log((fit + SMOOTHING * coarse_prob) / (total + SMOOTHING))


# ----------------------------------------------------------------------------- domain gain


def domain_gain_batch(
    doc_counts: np.ndarray, labels: np.ndarray, folds: np.ndarray, n_domains: int
) -> np.ndarray:
    """[K] held-out gain (nats per token) of q(e | d) over q(e), for K document labellings
    ``labels`` [K, U] of the documents' expert counts ``doc_counts`` [U, E] (float64), folds
    [U] in {0, 1}. Exact sums: the tables are matrix products of one-hot labels and counts."""
    n = doc_counts.sum()
    out = np.zeros(labels.shape[0])
    if n <= 0:
        return out
    for fit in (0, 1):
        fit_docs, score_docs = folds == fit, folds != fit
        if not fit_docs.any() or not score_docs.any():
            continue
        log_q = _log_marginal(doc_counts[fit_docs].sum(axis=0))  # [E]
        fit_t = _tables(doc_counts[fit_docs], labels[:, fit_docs], n_domains)  # [K, D, E]
        score_t = _tables(doc_counts[score_docs], labels[:, score_docs], n_domains)
        log_fine = _log_fine(fit_t, np.exp(log_q))
        out += (score_t * (log_fine - log_q)).sum(axis=(1, 2))
    return out / n


def _tables(counts: np.ndarray, labels: np.ndarray, n_domains: int) -> np.ndarray:
    """[K, D, E] domain x expert tables of unit counts [U, E] under unit labels [K, U]."""
    out = np.empty((labels.shape[0], n_domains, counts.shape[1]))
    for d in range(n_domains):
        out[:, d, :] = (labels == d).astype(np.float64) @ counts
    return out


def fold_permutations(
    labels: np.ndarray, folds: np.ndarray, n_permutations: int, seed: int
) -> np.ndarray:
    """[K, U] labels, each the observed ``labels`` [U] permuted among the documents of each
    fold (the folds' domain make-up kept: each half keeps its documents per domain)."""
    rng = np.random.default_rng(seed)
    keys = folds.astype(np.float64)[None, :] + 0.5 * rng.random((n_permutations, folds.size))
    order = np.argsort(keys, axis=1)  # each row: fold 0's documents shuffled, then fold 1's
    by_fold = np.argsort(folds, kind="stable")
    out = np.empty((n_permutations, folds.size), dtype=np.int64)
    np.put_along_axis(out, order, np.broadcast_to(labels[by_fold], out.shape), axis=1)
    return out


# ----------------------------------------------------------------------------- token gain


def token_gain_batch(
    token_idx: np.ndarray,
    n_ids: int,
    token_folds: np.ndarray,
    experts: np.ndarray,
    n_experts: int,
) -> np.ndarray:
    """[K] held-out gain (nats per token) of q(e | id) over q(e) for K expert assignments
    ``experts`` [K, N] of the tokens (compacted ids ``token_idx`` [N] in [0, n_ids), each
    token's fold ``token_folds`` [N])."""
    n_tok = token_idx.size
    k_all = experts.shape[0]
    out = np.zeros(k_all)
    if n_tok == 0:
        return out
    cells = n_ids * n_experts
    for fit in (0, 1):
        fit_m, score_m = token_folds == fit, token_folds != fit
        if not fit_m.any() or not score_m.any():
            continue
        n_t = np.bincount(token_idx[fit_m], minlength=n_ids).astype(np.float64)  # label-free
        score_t = token_idx[score_m]
        denominator = np.log(n_t[score_t] + SMOOTHING)[None, :]
        step = _chunk(cells)
        for start in range(0, k_all, step):
            ex = experts[start : start + step]
            k = ex.shape[0]
            rows = np.arange(k)[:, None]
            fit_keys = rows * cells + token_idx[fit_m] * n_experts + ex[:, fit_m]
            fit_te = np.bincount(fit_keys.ravel(), minlength=k * cells)
            marginal = np.bincount(
                (rows * n_experts + ex[:, fit_m]).ravel(), minlength=k * n_experts
            )
            log_q = _log_marginal(marginal.reshape(k, n_experts).astype(np.float64))  # [k, E]
            score_ex = ex[:, score_m]
            coarse = np.take_along_axis(log_q, score_ex, axis=1)  # [k, n]
            counts = fit_te[rows * cells + score_t[None, :] * n_experts + score_ex]
            fine = np.log(counts + SMOOTHING * np.exp(coarse)) - denominator
            out[start : start + k] += (fine - coarse).sum(axis=1)
    return out / n_tok


def within_document_shuffles(
    token_docs: np.ndarray, experts: np.ndarray, n_permutations: int, seed: int
) -> np.ndarray:
    """[K, N] experts, each the observed ``experts`` [N] shuffled among the tokens of each
    document: every document keeps its expert counts (its domain's and its own preferences);
    what the token id alone predicts is broken."""
    rng = np.random.default_rng(seed)
    by_doc = np.argsort(token_docs, kind="stable")
    sizes = np.bincount(token_docs)
    sizes = sizes[sizes > 0]
    out = np.empty((n_permutations, token_docs.size), dtype=np.int64)
    if sizes.size and (sizes == sizes[0]).all():  # equal documents (size-matched): in place
        grouped = np.broadcast_to(
            experts[by_doc].reshape(sizes.size, -1), (n_permutations, sizes.size, sizes[0])
        )
        out[:, by_doc] = rng.permuted(grouped, axis=2).reshape(n_permutations, -1)
        return out
    keys = token_docs.astype(np.float64)[None, :] + 0.5 * rng.random(
        (n_permutations, token_docs.size)
    )
    order = np.argsort(keys, axis=1)  # each row: the tokens by document, shuffled within
    np.put_along_axis(out, order, np.broadcast_to(experts[by_doc], out.shape), axis=1)
    return out


# ----------------------------------------------------------------------------- domain beyond token


class TokenDomainGroups:
    """The scored tokens grouped by (token id, document): G groups with id ``t`` [G], fold
    [G], document label ``label`` [G]; (group, expert) pairs with counts."""

    def __init__(
        self,
        token_idx: np.ndarray,
        n_ids: int,
        token_docs: np.ndarray,
        doc_domains: np.ndarray,
        doc_folds: np.ndarray,
        experts: np.ndarray,
        n_experts: int,
    ) -> None:
        n_docs = doc_domains.shape[0]
        group_key = token_idx * n_docs + token_docs
        groups, group_of = np.unique(group_key, return_inverse=True)
        pairs, pair_count = np.unique(group_of * n_experts + experts, return_counts=True)
        self.n_ids, self.n_experts = n_ids, n_experts
        self.t, doc = np.divmod(groups, n_docs)
        self.doc = doc
        self.fold = doc_folds[doc]
        self.label = doc_domains[doc]
        self.pair_group, self.pair_expert = np.divmod(pairs, n_experts)
        self.pair_count = pair_count.astype(np.float64)
        self.size = np.bincount(group_of, minlength=groups.size)
        self.n_tokens = float(token_idx.size)

    def within_id_permutations(
        self, n_permutations: int, seed: int, by_size: bool = True
    ) -> np.ndarray:
        """[K, G] labels, each the observed group labels permuted among the groups of each
        (id, fold) and, with ``by_size``, of each size class (1, 2-3, 4-7, ... tokens of the id
        in the document): an id's documents exchange their domains; an id seen in one domain
        only keeps it, so a token's own domain proxy is never read as domain signal; and a
        permuted (id, domain) cell keeps about its size (the smoothing makes the statistic
        depend on it: without the size classes the null runs liberal under token routing)."""
        rng = np.random.default_rng(seed)
        stratum = self.t * 2 + self.fold
        if by_size:
            size_class = np.floor(np.log2(self.size)).astype(np.int64)  # 1, 2-3, 4-7, ...
            stratum = stratum * (int(size_class.max(initial=0)) + 1) + size_class
        stratum = _compact_sorted(stratum).astype(np.float64)
        by_stratum = np.argsort(stratum, kind="stable")
        keys = stratum[None, :] + 0.5 * rng.random((n_permutations, stratum.size))
        order = np.argsort(keys, axis=1)
        out = np.empty((n_permutations, stratum.size), dtype=np.int64)
        np.put_along_axis(out, order, np.broadcast_to(self.label[by_stratum], out.shape), axis=1)
        return out

    def gain_batch(self, labels: np.ndarray, n_domains: int) -> np.ndarray:
        """[K] held-out gain (nats per token) of q(e | id, d) over q(e | id) under group
        labels [K, G]."""
        n_ids, n_exp = self.n_ids, self.n_experts
        out = np.zeros(labels.shape[0])
        if self.n_tokens == 0:
            return out
        pair_fold = self.fold[self.pair_group]
        pair_t = self.t[self.pair_group]
        for fit in (0, 1):
            fit_p, score_p = pair_fold == fit, pair_fold != fit
            if not fit_p.any() or not score_p.any():
                continue
            te = np.bincount(
                pair_t[fit_p] * n_exp + self.pair_expert[fit_p],
                weights=self.pair_count[fit_p],
                minlength=n_ids * n_exp,
            ).reshape(n_ids, n_exp)
            q_e = np.exp(_log_marginal(te.sum(axis=0)))
            log_t = _log_fine(te, q_e[None, :])  # [ids, E], label-free
            s_t, s_e = pair_t[score_p], self.pair_expert[score_p]
            s_count = self.pair_count[score_p]
            coarse = log_t[s_t, s_e][None, :]  # label-free
            prior = SMOOTHING * np.exp(coarse)
            f_group, f_t = self.pair_group[fit_p], pair_t[fit_p]
            f_e, f_count = self.pair_expert[fit_p], self.pair_count[fit_p]
            cells = n_ids * n_domains * n_exp
            step = _chunk(cells)
            for start in range(0, labels.shape[0], step):
                lab = labels[start : start + step]
                k = lab.shape[0]
                rows = np.arange(k)[:, None]
                td_keys = rows * (n_ids * n_domains) + f_t * n_domains + lab[:, f_group]
                w = np.broadcast_to(f_count, td_keys.shape).ravel()
                tde = np.bincount((td_keys * n_exp + f_e).ravel(), weights=w, minlength=k * cells)
                td = np.bincount(td_keys.ravel(), weights=w, minlength=k * n_ids * n_domains)
                s_td = (
                    rows * (n_ids * n_domains) + s_t * n_domains + lab[:, self.pair_group[score_p]]
                )
                fine = np.log(tde[s_td * n_exp + s_e] + prior) - np.log(td[s_td] + SMOOTHING)
                out[start : start + k] += ((fine - coarse) * s_count[None, :]).sum(axis=1)
        return out / self.n_tokens


def _compact_sorted(values: np.ndarray) -> np.ndarray:
    """Each value's index among the sorted distinct values (int64)."""
    return np.unique(values, return_inverse=True)[1].astype(np.int64).ravel()
