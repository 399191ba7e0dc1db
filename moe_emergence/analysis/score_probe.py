"""A probe checked and flattened to its scored tokens (:class:`ProbeArrays`), and its seeded
document halves (numpy only)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from moe_emergence.analysis.score_tables import _assignments, _ids, _unit_counts


@dataclass(frozen=True, eq=False)
class ProbeArrays:
    """A probe checked and flattened to its scored tokens (built by :func:`_probe`), all int64:
    tok [N] token ids, docs [N] their documents in [0, U), dom [U] the documents' domains in
    [0, D), first [N] the first-choice experts in [0, E); n_domains D, n_experts E."""

    tok: np.ndarray
    docs: np.ndarray
    dom: np.ndarray
    first: np.ndarray
    n_domains: int
    n_experts: int

    @property
    def n_docs(self) -> int:
        """U, the documents the scores rest on."""
        return int(self.dom.shape[0])

    @functools.cached_property
    def doc_counts(self) -> np.ndarray:
        """[U, E] float64: each document's tokens per first-choice expert (read-only use)."""
        return _unit_counts(self.docs, self.first, self.n_docs, self.n_experts)


def _probe(
    token_ids, token_docs, doc_domains, experts, n_domains: int, n_experts: int, mask=None
) -> ProbeArrays:
    """A probe checked and flattened to its scored tokens (:class:`ProbeArrays`). token_ids,
    token_docs [P, T] (or [N]); experts [P, T, k], [P, T] or [N]; doc_domains [U] in [0, D);
    ``mask`` bool like token_ids (None: every token): the tokens scored. Documents left with
    no scored token are dropped and the rest renumbered in order, so U counts the documents the
    scores rest on."""
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
        return ProbeArrays(tok, docs, dom, first, n_domains, n_experts)
    keep = np.asarray(mask, dtype=bool)
    if keep.shape != shape:
        raise ValueError(f"mask must be {shape} like token_ids, got {keep.shape}")
    keep = keep.ravel()
    present = np.zeros(dom.shape[0], dtype=bool)
    present[docs[keep]] = True
    renumber = np.cumsum(present) - 1
    flat = (tok[keep], renumber[docs[keep]], dom[present], first[keep])
    return ProbeArrays(*flat, n_domains, n_experts)


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
