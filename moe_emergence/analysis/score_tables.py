"""Domain x expert tables and their entropies (numpy only, nats), with the input checks every
score shares. Shapes: D domains, E experts, k experts per token, N tokens, U units (documents).
``0 * log 0 = 0``; float64 throughout."""

from __future__ import annotations

import numpy as np

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


# ----------------------------------------------------------------------------- units


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
