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
batches (``CHUNK`` labellings, :func:`rows_per_batch` for the [K, N] draws) so that memory stays
bounded whatever the number of permutations.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

SMOOTHING = 16.0  # B: pseudo-tokens of the coarser prediction in every fine cell
CHUNK = 32  # labellings per batch, at most
CELLS_PER_BATCH = 4_000_000  # float64 cells a batch may hold (32 MB)


def _chunk(cells: int) -> int:
    """Labellings per batch when each needs ``cells`` float64 cells."""
    return max(1, min(CHUNK, CELLS_PER_BATCH // max(cells, 1)))


# Labellings as one array [K, M] or as its rows in order, in batches [k, M] (a generator:
# memory of one batch at a time, whatever K).
Rows = np.ndarray | Iterable[np.ndarray]


def _rebatch(rows: Rows, step: int) -> Iterator[np.ndarray]:
    """The rows of ``rows`` in batches of exactly ``step`` (the last may be shorter): each
    batch holds the same rows whether they came as one array or in batches of any size."""
    if isinstance(rows, np.ndarray):
        for start in range(0, rows.shape[0], step):
            yield rows[start : start + step]
        return
    held: list[np.ndarray] = []
    count = 0
    for batch in rows:
        held.append(batch)
        count += batch.shape[0]
        while count >= step:
            joined = np.concatenate(held) if len(held) > 1 else held[0]
            yield joined[:step]
            held, count = [joined[step:]], count - step
    if count:
        yield np.concatenate(held) if len(held) > 1 else held[0]


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
    by_fold = np.argsort(folds, kind="stable")
    return shuffled_within(folds.astype(np.float64), labels[by_fold], n_permutations, rng)


def shuffled_within(
    groups: np.ndarray, sorted_values: np.ndarray, rows: int, rng: np.random.Generator
) -> np.ndarray:
    """[rows, M] int64: each row the values ``sorted_values`` [M] (ordered by group, stably)
    put back with each group's values shuffled among its positions; ``groups`` float64 [M]
    holds whole numbers (a uniform in [0, 0.5) added to each keeps every group apart). Draws
    ``rows`` x M uniforms from ``rng``, in row order."""
    keys = groups[None, :] + 0.5 * rng.random((rows, groups.size))
    order = np.argsort(keys, axis=1)  # each row: group 0's positions shuffled, then group 1's...
    out = np.empty((rows, groups.size), dtype=np.int64)
    np.put_along_axis(out, order, np.broadcast_to(sorted_values, out.shape), axis=1)
    return out


# ----------------------------------------------------------------------------- token gain


def token_gain_batch(
    token_idx: np.ndarray,
    n_ids: int,
    token_folds: np.ndarray,
    experts: Rows,
    n_experts: int,
) -> np.ndarray:
    """[K] held-out gain (nats per token) of q(e | id) over q(e) for K expert assignments
    ``experts`` [K, N] of the tokens, or their rows in batches [k, N] (see :data:`Rows`);
    compacted ids ``token_idx`` [N] in [0, n_ids), each token's fold ``token_folds`` [N]."""
    n_tok = token_idx.size
    cells = n_ids * n_experts
    halves = []
    for fit in (0, 1):
        fit_m, score_m = token_folds == fit, token_folds != fit
        if not fit_m.any() or not score_m.any():
            continue
        n_t = np.bincount(token_idx[fit_m], minlength=n_ids).astype(np.float64)  # label-free
        score_t = token_idx[score_m]
        halves.append((fit_m, score_m, score_t, np.log(n_t[score_t] + SMOOTHING)[None, :]))
    parts = []
    for ex in _rebatch(experts, _chunk(cells)):
        k = ex.shape[0]
        part = np.zeros(k)
        rows = np.arange(k)[:, None]
        for fit_m, score_m, score_t, denominator in halves:
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
            part += (fine - coarse).sum(axis=1)
        parts.append(part)
    out = np.concatenate(parts) if parts else np.zeros(0)
    return out / n_tok if n_tok else out


def within_document_shuffles(
    token_docs: np.ndarray, experts: np.ndarray, n_permutations: int, seed: int
) -> np.ndarray:
    """[K, N] experts, each the observed ``experts`` [N] shuffled among the tokens of each
    document: every document keeps its expert counts (its domain's and its own preferences);
    what the token id alone predicts is broken. The rows of
    :func:`within_document_shuffle_batches`, joined."""
    batches = list(within_document_shuffle_batches(token_docs, experts, n_permutations, seed))
    return np.concatenate(batches) if batches else np.empty((0, token_docs.size), np.int64)


def within_document_shuffle_batches(
    token_docs: np.ndarray, experts: np.ndarray, n_permutations: int, seed: int
) -> Iterator[np.ndarray]:
    """The rows of :func:`within_document_shuffles` in batches [k, N] of at most
    :func:`rows_per_batch` rows: one ``np.random.default_rng(seed)`` stream, drawn in row
    order, so the rows are the same whatever the batch size (memory: O(k N), not O(K N))."""
    rng = np.random.default_rng(seed)
    by_doc = np.argsort(token_docs, kind="stable")
    sizes = np.bincount(token_docs)
    sizes = sizes[sizes > 0]
    equal = bool(sizes.size and (sizes == sizes[0]).all())  # size-matched: shuffle in place
    docs = token_docs.astype(np.float64)
    step = rows_per_batch(token_docs.size)
    for start in range(0, n_permutations, step):
        k = min(step, n_permutations - start)
        if not equal:
            yield shuffled_within(docs, experts[by_doc], k, rng)
            continue
        out = np.empty((k, token_docs.size), dtype=np.int64)
        grouped = np.broadcast_to(
            experts[by_doc].reshape(sizes.size, -1), (k, sizes.size, sizes[0])
        )
        out[:, by_doc] = rng.permuted(grouped, axis=2).reshape(k, -1)
        yield out


def rows_per_batch(n_columns: int) -> int:
    """Rows of a batch of labellings [k, n_columns] within :data:`CELLS_PER_BATCH` cells (at
    least 1)."""
    return max(1, CELLS_PER_BATCH // max(n_columns, 1))


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
        depend on it: without the size classes the null runs liberal under token routing).
        The rows of :meth:`within_id_permutation_batches`, joined."""
        batches = list(self.within_id_permutation_batches(n_permutations, seed, by_size))
        return np.concatenate(batches) if batches else np.empty((0, self.t.size), np.int64)

    def within_id_permutation_batches(
        self, n_permutations: int, seed: int, by_size: bool = True
    ) -> Iterator[np.ndarray]:
        """The rows of :meth:`within_id_permutations` in batches [k, G] of at most
        :func:`rows_per_batch` rows (one ``np.random.default_rng(seed)`` stream in row order:
        the same rows whatever the batch size)."""
        rng = np.random.default_rng(seed)
        stratum = self.t * 2 + self.fold
        if by_size:
            size_class = np.floor(np.log2(self.size)).astype(np.int64)  # 1, 2-3, 4-7, ...
            stratum = stratum * (int(size_class.max(initial=0)) + 1) + size_class
        stratum = _compact_sorted(stratum).astype(np.float64)
        sorted_labels = self.label[np.argsort(stratum, kind="stable")]
        step = rows_per_batch(stratum.size)
        for start in range(0, n_permutations, step):
            yield shuffled_within(stratum, sorted_labels, min(step, n_permutations - start), rng)

    def gain_batch(self, labels: Rows, n_domains: int) -> np.ndarray:
        """[K] held-out gain (nats per token) of q(e | id, d) over q(e | id) under group
        labels [K, G], or their rows in batches [k, G] (see :data:`Rows`)."""
        n_ids, n_exp = self.n_ids, self.n_experts
        halves = []
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
            coarse = log_t[pair_t[score_p], self.pair_expert[score_p]][None, :]  # label-free
            halves.append((fit_p, score_p, coarse))
        parts = []
        for lab in _rebatch(labels, _chunk(n_ids * n_domains * n_exp)):
            part = np.zeros(lab.shape[0])
            for fit_p, score_p, coarse in halves if self.n_tokens else ():
                part += self._half_gain(lab, n_domains, fit_p, score_p, coarse)
            parts.append(part)
        out = np.concatenate(parts) if parts else np.zeros(0)
        return out / self.n_tokens if self.n_tokens else out

    def _half_gain(
        self,
        lab: np.ndarray,
        n_domains: int,
        fit_p: np.ndarray,
        score_p: np.ndarray,
        coarse: np.ndarray,
    ) -> np.ndarray:
        """[k] summed log-gains of the pairs ``score_p`` under q(e | id, d) fitted on the pairs
        ``fit_p``, for group labels ``lab`` [k, G]; ``coarse`` [1, n]: their log q(e | id)."""
        n_ids, n_exp = self.n_ids, self.n_experts
        pair_t = self.t[self.pair_group]
        s_t, s_e = pair_t[score_p], self.pair_expert[score_p]
        f_group, f_t = self.pair_group[fit_p], pair_t[fit_p]
        f_e, f_count = self.pair_expert[fit_p], self.pair_count[fit_p]
        k = lab.shape[0]
        rows = np.arange(k)[:, None]
        cells = n_ids * n_domains * n_exp
        td_keys = rows * (n_ids * n_domains) + f_t * n_domains + lab[:, f_group]
        w = np.broadcast_to(f_count, td_keys.shape).ravel()
        tde = np.bincount((td_keys * n_exp + f_e).ravel(), weights=w, minlength=k * cells)
        td = np.bincount(td_keys.ravel(), weights=w, minlength=k * n_ids * n_domains)
        s_td = rows * (n_ids * n_domains) + s_t * n_domains + lab[:, self.pair_group[score_p]]
        fine = np.log(tde[s_td * n_exp + s_e] + SMOOTHING * np.exp(coarse)) - np.log(
            td[s_td] + SMOOTHING
        )
        return ((fine - coarse) * self.pair_count[score_p][None, :]).sum(axis=1)


def _compact_sorted(values: np.ndarray) -> np.ndarray:
    """Each value's index among the sorted distinct values (int64)."""
    return np.unique(values, return_inverse=True)[1].astype(np.int64).ravel()
