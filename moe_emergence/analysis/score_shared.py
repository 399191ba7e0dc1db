"""``cond_mi = I(D;E | T)``, plug-in, over the token ids seen in >= 2 domains, and its null:
labels permuted among the (id, document) groups of each shared id (numpy only, nats)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from moe_emergence.analysis.heldout import shuffled_within
from moe_emergence.analysis.score_probe import ProbeArrays
from moe_emergence.analysis.score_tables import _compact


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
    def of_probe(cls, probe: ProbeArrays) -> _SharedGroups:
        """:meth:`of` a checked probe's arrays."""
        p = probe
        return cls.of(p.tok, p.docs, p.dom, p.first, p.n_domains, p.n_experts)

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


def _within_id_permutations(groups: _SharedGroups, n_permutations: int, seed: int):
    """Yield [G] group labels, each the observed labels permuted among the groups of each id
    (one ``np.random.default_rng(seed)`` stream)."""
    rng = np.random.default_rng(seed)
    by_id = np.argsort(groups.t, kind="stable")
    sorted_labels = groups.label[by_id]
    t = groups.t.astype(np.float64)
    for _ in range(n_permutations):  # one row at a time: cond_mi reads each alone
        yield shuffled_within(t, sorted_labels, 1, rng)[0]
