"""Scores of how much MoE routing depends on the data domain (numpy only, all in nats).

The NMI ``I(D;E) / H(D)`` of the domain x expert table is 0 when routing ignores the domain
and 1 when the chosen expert determines it. The permutation null (domain labels shuffled across
probe blocks) is its chance level on the same data: an NMI is only domain signal as far as it
exceeds the null. The token-identity control asks how much of that signal token identity alone
explains: ``token_id_nmi`` is the NMI a router that looks only at the token id would give, and
``cond_mi = I(D;E | T)`` is what is left once the token id is known.

``cond_mi`` is a plug-in estimate over the token ids seen in >= 2 domains, and it is strongly
biased upward when the ids have few occurrences each (random routing over 64 experts with ~80
assignments per id gives ~0.65 nats, truth 0). Its chance level is
:func:`conditional_mi_null`: ``cond_mi`` recomputed after the same block-label permutations
as :func:`permutation_null` (same seed, same draws); like the NMI, ``cond_mi`` is only
domain signal as far as it exceeds that null.

Shapes: D domains, E experts, k experts per token (top-k), N tokens, B probe blocks. Every one
of the N*k token-to-expert assignments is one sample; ``0 * log 0 = 0``; float64 throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "LayerScores",
    "TokenIdentityControl",
    "collapsed_expert",
    "conditional_mi_null",
    "contingency",
    "entropy",
    "mutual_information",
    "nmi",
    "null_summary",
    "permutation_null",
    "score_layer",
    "shares",
    "token_identity_control",
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


def _probe(
    token_ids, block_domains, experts, n_domains: int, n_experts: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A probe of P blocks of T tokens checked: (token ids [P, T] int64, block domains [P]
    int64, assignments [P*T, k] int64 in block-major token order). experts [P, T, k] or [P, T]."""
    tok = np.asarray(token_ids)
    if tok.ndim != 2 or (tok.size and not np.issubdtype(tok.dtype, np.integer)):
        raise ValueError(f"token_ids must be a [P, T] int array, got {tok.dtype} {tok.shape}")
    tok = tok.astype(np.int64, copy=False)
    n_blocks, t_len = tok.shape
    blocks = _ids(block_domains, n_domains, "block_domains")
    if blocks.shape != (n_blocks,):
        raise ValueError(f"block_domains must be [{n_blocks}], got {blocks.shape}")
    ex = np.asarray(experts)
    if ex.ndim == 2:
        ex = ex[..., None]
    if ex.ndim != 3 or ex.shape[:2] != (n_blocks, t_len):
        raise ValueError(f"experts must be [{n_blocks}, {t_len}(, k)], got {ex.shape}")
    k = ex.shape[2]
    flat_ex = _assignments(ex.reshape(n_blocks * t_len, k), n_blocks * t_len, n_experts)
    return tok, blocks, flat_ex


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


# ----------------------------------------------------------------------------- permutation null


def _permutation_labels(block_domains: np.ndarray, n_permutations: int, seed: int) -> np.ndarray:
    """[K, B] int64 shuffled block domain labels: row i is the i-th
    ``np.random.default_rng(seed).permutation(block_domains)``. The one source of the draws of
    both :func:`permutation_null` and :func:`conditional_mi_null`, so that the same seed pairs
    them permutation by permutation."""
    if n_permutations < 0:
        raise ValueError(f"n_permutations must be >= 0, got {n_permutations}")
    rng = np.random.default_rng(seed)
    labels = np.empty((n_permutations, block_domains.shape[0]), dtype=np.int64)
    for i in range(n_permutations):
        labels[i] = rng.permutation(block_domains)
    return labels


def _permuted_tables(
    block_expert_counts, block_domains, n_domains: int, n_permutations: int, seed: int
) -> np.ndarray:
    """[K, D, E] float64 domain x expert tables after shuffling the block domain labels, one
    ``default_rng(seed).permutation`` per table, in order. Column sums (expert usage) and each
    domain's block count are those of the unshuffled data."""
    counts = _counts(block_expert_counts, name="block_expert_counts")
    dom = _ids(block_domains, n_domains, "block_domains")
    if dom.ndim != 1 or dom.shape[0] != counts.shape[0]:
        raise ValueError(
            f"block_domains must be [{counts.shape[0]}] to match block_expert_counts, "
            f"got {dom.shape}"
        )
    labels = _permutation_labels(dom, n_permutations, seed)
    tables = np.empty((n_permutations, n_domains, counts.shape[1]), dtype=np.float64)
    for d in range(n_domains):
        tables[:, d, :] = (labels == d).astype(np.float64) @ counts  # exact: integer sums < 2**53
    return tables


def permutation_null(
    block_expert_counts,
    block_domains,
    n_domains: int,
    n_permutations: int = 200,
    seed: int = 0,
) -> np.ndarray:
    """[n_permutations] NMIs of the domain x expert table after permuting the domain labels
    across blocks: the chance level (same blocks, domain block counts and expert usage, no
    domain information). block_expert_counts [B, E] assignments of each block to each expert;
    block_domains [B]. Draw i uses the i-th ``np.random.default_rng(seed).permutation``."""
    tables = _permuted_tables(block_expert_counts, block_domains, n_domains, n_permutations, seed)
    return _nmi_batch(tables)


def null_summary(null) -> tuple[float, float]:
    """(mean, 95th percentile) of null values (NMIs or cond_mi); (nan, nan) for an empty
    null."""
    arr = np.asarray(null, dtype=np.float64).ravel()
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(np.percentile(arr, 95))


# ----------------------------------------------------------------------------- token identity


@dataclass(frozen=True)
class TokenIdentityControl:
    """How much of the domain signal token identity alone explains.

    cond_mi:          I(D;E | T) in nats over the assignments of token ids seen in >= 2
                      domains (0.0 when there are none).
    token_id_nmi:     NMI of the token-id router (each id sent to its k most frequent experts)
                      over all assignments.
    token_id_share:   min(1, token_id_nmi / nmi); nan when nmi == 0.
    shared_token_ids: number of distinct token ids seen in >= 2 domains.
    """

    cond_mi: float
    token_id_nmi: float
    token_id_share: float
    shared_token_ids: int


def _group_starts(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(group id per element, start index per group) of a sorted 1-D array."""
    change = np.empty(sorted_keys.shape[0], dtype=bool)
    change[:1] = True
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=change[1:])
    return np.cumsum(change) - 1, np.flatnonzero(change)


def _compact(values: np.ndarray) -> tuple[np.ndarray, int]:
    """(index of each value among the distinct values, number of distinct values), int64.
    A dense lookup when the ids span a modest range, else ``np.unique``."""
    lo, hi = int(values.min()), int(values.max())
    if hi - lo < 4 * values.size + (1 << 20):
        present = np.zeros(hi - lo + 1, dtype=bool)
        present[values - lo] = True
        remap = np.cumsum(present, dtype=np.int64) - 1
        return remap[values - lo], int(remap[-1]) + 1
    uniq, inv = np.unique(values, return_inverse=True)
    return inv.astype(np.int64, copy=False).ravel(), int(uniq.size)


def _top_k_experts(
    te_t: np.ndarray, te_e: np.ndarray, te_count: np.ndarray, n_tok: int, k: int, n_exp: int
) -> np.ndarray:
    """[n_tok, k] the k experts each token goes to most often, ties -> lower expert index
    (unseen experts count 0). Input: the seen (token, expert) pairs sorted by (token, expert),
    every token in [0, n_tok) present, with their counts."""
    n_pairs = te_t.shape[0]
    _, starts = _group_starts(te_t)  # one group per token; group id == token
    avail = te_count.astype(np.float64, copy=True)
    idx = np.arange(n_pairs)
    pred = np.full((n_tok, k), -1, dtype=np.int64)
    for j in range(k):  # slot j: the best pair not taken yet, lowest expert among equals
        best = np.maximum.reduceat(avail, starts)
        cand = (avail == best[te_t]) & (avail >= 0)
        first = np.minimum.reduceat(np.where(cand, idx, n_pairs), starts)
        ok = first < n_pairs
        pred[ok, j] = te_e[first[ok]]
        avail[first[ok]] = -1.0
    short = np.flatnonzero(pred[:, -1] < 0)  # fewer than k distinct experts seen
    if short.size:
        seen = np.zeros((n_tok, n_exp), dtype=bool)
        seen[te_t, te_e] = True
        seen = seen[short]
        unseen_first = np.argsort(seen, axis=1, kind="stable")  # unseen experts, by index
        n_seen = seen.sum(axis=1)
        rows = np.arange(short.size)
        for j in range(k):
            fill = unseen_first[rows, np.maximum(j - n_seen, 0)]
            pred[short, j] = np.where(j < n_seen, pred[short, j], fill)
    return pred


def token_identity_control(
    token_ids, domain_ids, experts, n_domains: int, n_experts: int
) -> TokenIdentityControl:
    """Token-identity control of one layer's routing. token_ids [N] (any ints), domain_ids [N],
    experts [N] or [N, k].

    ``cond_mi = sum_t p(t) I(D;E | T=t)`` with p over the assignments of token ids seen in >= 2
    domains. The token-id router sends every token to the k experts its id most often goes to
    here (ties -> lower index); its [D, E] table counts each token's domain against those k
    experts, and ``token_id_nmi`` is its NMI."""
    tok = np.asarray(token_ids)
    if tok.ndim != 1 or (tok.size and not np.issubdtype(tok.dtype, np.integer)):
        raise ValueError(f"token_ids must be a 1-D int array, got {tok.dtype} {tok.shape}")
    dom = _ids(domain_ids, n_domains, "domain_ids")
    if dom.shape != tok.shape:
        raise ValueError(f"domain_ids must be {tok.shape} like token_ids, got {dom.shape}")
    ex = _assignments(experts, tok.shape[0], n_experts)
    n_dom, n_exp, k = n_domains, n_experts, ex.shape[1]
    base = nmi(contingency(dom, ex, n_dom, n_exp))
    if tok.size == 0 or k == 0:
        return TokenIdentityControl(0.0, 0.0, float("nan"), 0)

    t_idx, n_tok = _compact(tok.astype(np.int64, copy=False))
    # One sort of the assignments keyed (t, e, d): (t, e) and t groups are contiguous.
    key = (np.repeat(t_idx, k) * n_exp + ex.ravel()) * n_dom + np.repeat(dom, k)
    ukey, ucount = np.unique(key, return_counts=True)
    cnt = ucount.astype(np.float64)
    u_te, u_d = np.divmod(ukey, n_dom)
    u_t, u_e = np.divmod(u_te, n_exp)

    te_gid, te_starts = _group_starts(u_te)
    n_te = np.add.reduceat(cnt, te_starts)
    n_td = np.bincount(u_t * n_dom + u_d, weights=cnt, minlength=n_tok * n_dom)
    n_td = n_td.reshape(n_tok, n_dom)
    n_t = n_td.sum(axis=1)
    shared = (n_td > 0).sum(axis=1) >= 2

    cond = 0.0
    n_shared = float(n_t[shared].sum())
    if n_shared > 0:
        m = shared[u_t]
        c, t, d = cnt[m], u_t[m], u_d[m]
        ratio = c * n_t[t] / (n_td[t, d] * n_te[te_gid[m]])
        cond = max(float((c * np.log(ratio)).sum() / n_shared), 0.0)

    pred = _top_k_experts(u_t[te_starts], u_e[te_starts], n_te, n_tok, k, n_exp)  # [n_tok, k]
    # Token-id router table: each token's domain against its id's k predicted experts.
    tokens_td = n_td / k  # tokens (not assignments) per (t, d); exact, each token has k
    router_key = np.arange(n_dom)[None, :, None] * n_exp + pred[:, None, :]  # [n_tok, D, k]
    weights = np.broadcast_to(tokens_td[:, :, None], router_key.shape)
    router = np.bincount(router_key.ravel(), weights=weights.ravel(), minlength=n_dom * n_exp)
    token_nmi = nmi(router.reshape(n_dom, n_exp))
    share = float("nan") if base == 0 else min(1.0, token_nmi / base)
    return TokenIdentityControl(cond, token_nmi, share, int(shared.sum()))


# ----------------------------------------------------------------------------- cond_mi null


def _spans_blocks(group: np.ndarray, block: np.ndarray, n_groups: int) -> np.ndarray:
    """[n_groups] bool: whether the elements of a group lie in >= 2 distinct blocks."""
    lo = np.full(n_groups, np.iinfo(np.int64).max, dtype=np.int64)
    hi = np.full(n_groups, -1, dtype=np.int64)
    np.minimum.at(lo, group, block)
    np.maximum.at(hi, group, block)
    return hi > lo


def _xlogx_table(n_max: int, scale: int = 1) -> np.ndarray:
    """[n_max + 1] float64: ``(scale * c) log(scale * c)`` for c = 0 .. n_max (0 at c = 0)."""
    x = scale * np.arange(n_max + 1, dtype=np.float64)
    return x * np.log(x, out=np.zeros_like(x), where=x > 0)


def conditional_mi_null(
    token_ids,
    block_domains,
    experts,
    n_domains: int,
    n_experts: int,
    n_permutations: int = 200,
    seed: int = 0,
) -> np.ndarray:
    """[n_permutations] ``cond_mi = I(D;E | T)`` (nats) of the probe after permuting the domain
    labels across blocks: the chance level of :func:`token_identity_control`'s ``cond_mi``,
    whose plug-in estimate is far above 0 for domain-blind routing when ids are rare. Draw i
    uses the i-th ``np.random.default_rng(seed).permutation`` of block_domains, the draws of
    :func:`permutation_null` for the same seed. token_ids [P, T], block_domains [P], experts
    [P, T, k] or [P, T].

    Each draw is cond_mi's definition on the relabelled probe, the shared set (token ids seen
    in >= 2 domains) recomputed: with ``n_x`` the assignment count of x over the shared set and
    N its size, ``I(D;E|T) = (1/N) [sum n_tde log n_tde + sum n_t log n_t - sum n_td log n_td
    - sum n_te log n_te]`` (0.0 when the shared set is empty). The bracket is 0 for an id of
    one domain, so it is summed over all ids and only N needs the shared set. Ids in a single
    block never become shared and are dropped; a (t, e) pair of a single block adds the
    constant ``n_te log n_te`` to the n_tde sum. Each draw is then two ``np.bincount`` over
    the remaining assignments (keys (t, e, d) and (t, d)) and table look-ups of ``c log c``."""
    tok, blocks, ex = _probe(token_ids, block_domains, experts, n_domains, n_experts)
    labels = _permutation_labels(blocks, n_permutations, seed)
    out = np.zeros(n_permutations, dtype=np.float64)
    n_blocks, t_len = tok.shape
    k, n_dom = ex.shape[1], n_domains
    if tok.size == 0 or k == 0 or n_permutations == 0:
        return out

    # Tokens (block-major) whose id lies in >= 2 blocks; the others never count.
    t_idx, n_tok = _compact(tok.ravel())
    tok_block = np.repeat(np.arange(n_blocks, dtype=np.int64), t_len)
    keep = _spans_blocks(t_idx, tok_block, n_tok)[t_idx]
    if not keep.any():
        return out
    t_idx, n_tok = _compact(t_idx[keep])
    tok_block, ex = tok_block[keep], ex[keep]
    n_t_tok = np.bincount(t_idx, minlength=n_tok)  # tokens per id; assignments: k times
    n_t = k * n_t_tok.astype(np.float64)

    # (t, e) pairs; the n_tde of a pair of one block is n_te whatever the labels.
    pair, n_pairs = _compact(np.repeat(t_idx, k) * n_experts + ex.ravel())
    pair_block = np.repeat(tok_block, k)
    n_te = np.bincount(pair, minlength=n_pairs)
    multi = _spans_blocks(pair, pair_block, n_pairs)
    # Constant part of the bracket: sum n_t log n_t - sum over multi-block pairs n_te log n_te.
    tab_te, tab_td = _xlogx_table(int(n_te.max())), _xlogx_table(int(n_t_tok.max()), k)
    const = float(tab_td[n_t_tok].sum() - tab_te[n_te[multi]].sum())
    sel = multi[pair]
    if sel.any():
        tde_pair, n_multi = _compact(pair[sel])
    else:
        tde_pair, n_multi = np.zeros(0, dtype=np.int64), 0
    # Keys without the domain, sorted (np.bincount then walks memory in order), and the block
    # of each key, whose permuted label completes it.
    tde_order = np.argsort(tde_pair, kind="stable")
    tde_base, tde_block = tde_pair[tde_order] * n_dom, pair_block[sel][tde_order]
    td_order = np.argsort(t_idx, kind="stable")
    td_base, td_block = t_idx[td_order] * n_dom, tok_block[td_order]

    for i, perm in enumerate(labels):
        n_tde = np.bincount(tde_base + np.take(perm, tde_block), minlength=n_multi * n_dom)
        n_td = np.bincount(td_base + np.take(perm, td_block), minlength=n_tok * n_dom)
        shared = np.count_nonzero(n_td.reshape(n_tok, n_dom), axis=1) >= 2
        n_shared = float(n_t[shared].sum())
        if n_shared > 0:
            bracket = float(np.take(tab_te, n_tde).sum()) - float(np.take(tab_td, n_td).sum())
            out[i] = max((bracket + const) / n_shared, 0.0)
    return out


# ----------------------------------------------------------------------------- one layer


@dataclass(frozen=True)
class LayerScores:
    """All scores of one MoE layer on the probe (nats for entropies and cond_mi).

    nmi, null_mean, null_p95: NMI of the domain x expert table and its permutation null.
    cond_mi, token_id_nmi, token_id_share: the token-identity control.
    cond_mi_null_mean, cond_mi_null_p95: the chance level of cond_mi (conditional_mi_null, the
        same permutations as the NMI null); cond_mi is domain signal only above it.
    usage_entropy: H(E) of expert usage, in [0, log E].
    router_entropy: passed through from the caller (measured on router logits).
    """

    nmi: float
    null_mean: float
    null_p95: float
    cond_mi: float
    cond_mi_null_mean: float
    cond_mi_null_p95: float
    token_id_nmi: float
    token_id_share: float
    usage_entropy: float
    router_entropy: float


def score_layer(
    token_ids,
    block_domains,
    experts,
    n_domains: int,
    n_experts: int,
    n_permutations: int = 200,
    seed: int = 0,
    router_entropy: float = float("nan"),
) -> LayerScores:
    """Score one MoE layer on a probe of P blocks of T tokens, each block of one domain.
    token_ids [P, T], block_domains [P], experts [P, T, k] or [P, T]. Both nulls (NMI and
    cond_mi) use the same ``n_permutations`` draws of ``seed``."""
    tok, blocks, flat_ex = _probe(token_ids, block_domains, experts, n_domains, n_experts)
    n_blocks, t_len = tok.shape
    k = flat_ex.shape[1]
    dom = np.repeat(blocks, t_len)

    table = contingency(dom, flat_ex, n_domains, n_experts)
    block_key = np.repeat(np.arange(n_blocks, dtype=np.int64), t_len * k) * n_experts
    block_counts = np.bincount(block_key + flat_ex.ravel(), minlength=n_blocks * n_experts)
    null = permutation_null(
        block_counts.reshape(n_blocks, n_experts), blocks, n_domains, n_permutations, seed
    )
    null_mean, null_p95 = null_summary(null)
    tic = token_identity_control(tok.ravel(), dom, flat_ex, n_domains, n_experts)
    ex = flat_ex.reshape(n_blocks, t_len, k)
    cond_null = conditional_mi_null(tok, blocks, ex, n_domains, n_experts, n_permutations, seed)
    cond_null_mean, cond_null_p95 = null_summary(cond_null)
    return LayerScores(
        nmi=nmi(table),
        null_mean=null_mean,
        null_p95=null_p95,
        cond_mi=tic.cond_mi,
        cond_mi_null_mean=cond_null_mean,
        cond_mi_null_p95=cond_null_p95,
        token_id_nmi=tic.token_id_nmi,
        token_id_share=tic.token_id_share,
        usage_entropy=usage_entropy(table),
        router_entropy=float(router_entropy),
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
