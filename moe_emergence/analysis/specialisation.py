"""The field's own specialisation metrics, each beside its chance level on this probe (numpy only).

The anchors (docs/method.md, "The field's specialisation metrics"):

- router saturation (OLMoE): agreement of a checkpoint's top-k with the final checkpoint's;
  chance: two independent routers with these usages (:func:`router_saturation`).
- expert co-activation (OLMoE's stated definition, every pair of a token's top-k): ``N(Ei, Ej) /
  N(Ei)``; every row of it sums to k - 1, so its mean is (k - 1) / (E - 1) for every router: the
  scalar that can move is each expert's strongest partner, beside a random router with this
  usage (:func:`coactivation`).
- consecutive-token repetition (Mixtral, Table 5): adjacent tokens of one document on the same
  first choice, and top-k sets that meet, per domain; chance from the usage and a
  within-document shuffle null (:func:`repetition`).
- vocabulary specialisation (OLMoE), cross-fitted: an id's modal expert found on one half of
  the documents, its share scored on the other, ids seen >= m times; beside a random router
  with this usage (:func:`vocabulary_specialisation`).
- relative expert load (DeepSeek-V3): load over balanced load (:func:`relative_load`).
- per-expert token lists (ST-MoE, OpenMoE): each expert's most over-represented ids found on one
  half of the documents and checked on the other (:func:`expert_token_lists`).

Inputs are a probe's arrays as :mod:`moe_emergence.analysis.scores` takes them: token_ids,
token_docs [P, T]; doc_domains [U]; experts [P, T, k] (slot 0 the first choice); ``mask`` bool
[P, T] the scored tokens (None: all). Shapes: D domains, E experts, N scored tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from moe_emergence.analysis.heldout import within_document_shuffles
from moe_emergence.analysis.score_nulls import permutation_p
from moe_emergence.analysis.score_probe import ProbeArrays, _probe, document_folds
from moe_emergence.analysis.score_tables import _compact, _ids, _unit_counts

NAN = float("nan")
CHANCE_DRAWS = 16  # simulated random routers behind a simulated chance level
SHUFFLE_CHUNK = 32  # within-document shuffles per batch
REPETITION_SHUFFLES = 199  # at most, behind a repetition p-value (descriptive: p >= 1/200)


def _scored_experts(experts, shape: tuple[int, ...], n_experts: int, mask) -> np.ndarray:
    """[N, k] int64 experts of the scored tokens (block-major order)."""
    ex = _ids(experts, n_experts, "experts")
    if ex.shape[: len(shape)] != shape:
        raise ValueError(f"experts must be {shape} + (k,), got {ex.shape}")
    ex = ex.reshape(int(np.prod(shape)), -1)
    return ex if mask is None else ex[np.asarray(mask, dtype=bool).ravel()]


def _usage(experts: np.ndarray, n_experts: int) -> np.ndarray:
    """[E] share of tokens with each expert among their k (sums to k; [N, k] input)."""
    n = max(experts.shape[0], 1)
    return np.bincount(experts.ravel(), minlength=n_experts) / n


# ----------------------------------------------------------------------------- saturation


@dataclass(frozen=True)
class Saturation:
    """Mean over scored tokens of |top-k(t) n top-k(final)| / k (``topk``) and of first choice
    equal (``top1``); chances: two independent routers with these usages,
    ``sum_e pi_t(e) pi_f(e) / k`` (pi: share of tokens with e among their k) and
    ``sum_e u_t(e) u_f(e)`` (u: first-choice usage). 1 at the final checkpoint itself."""

    topk: float
    topk_chance: float
    top1: float
    top1_chance: float


def router_saturation(experts, final_experts, n_experts: int, mask=None) -> Saturation:
    """:class:`Saturation` of ``experts`` against ``final_experts`` (both [P, T, k])."""
    shape = np.shape(experts)[:2]
    now = _scored_experts(experts, shape, n_experts, mask)
    final = _scored_experts(final_experts, shape, n_experts, mask)
    if now.shape != final.shape or now.shape[0] == 0:
        return Saturation(NAN, NAN, NAN, NAN)
    k = now.shape[1]
    shared = (now[:, :, None] == final[:, None, :]).any(axis=2).sum(axis=1)  # distinct per token
    top1_now = np.bincount(now[:, 0], minlength=n_experts) / now.shape[0]
    top1_final = np.bincount(final[:, 0], minlength=n_experts) / now.shape[0]
    return Saturation(
        topk=float(shared.mean() / k),
        topk_chance=float(_usage(now, n_experts) @ _usage(final, n_experts) / k),
        top1=float((now[:, 0] == final[:, 0]).mean()),
        top1_chance=float(top1_now @ top1_final),
    )


# ----------------------------------------------------------------------------- co-activation


def coactivation_matrix(experts: np.ndarray, n_experts: int) -> np.ndarray:
    """[E, E] float64 ``N(Ei, Ej) / N(Ei)``: of the tokens with Ei among their k, the share with
    Ej too (every pair of the token's k, not only rank-adjacent ones); NaN on the diagonal and
    in the rows of unused experts. experts [N, k]."""
    n_tok = experts.shape[0]
    onehot = np.zeros((n_tok, n_experts))
    onehot[np.arange(n_tok)[:, None], experts] = 1.0
    pairs = onehot.T @ onehot  # [E, E]: N(Ei, Ej), N(Ei) on the diagonal
    used = np.diag(pairs).copy()
    out = np.divide(pairs, used[:, None], out=np.full_like(pairs, NAN), where=used[:, None] > 0)
    np.fill_diagonal(out, NAN)
    return out


def _strongest_partner(matrix: np.ndarray) -> float:
    """Mean over used experts of their largest co-activation share."""
    rows = ~np.isnan(matrix).all(axis=1)
    return float(np.nanmax(matrix[rows], axis=1).mean()) if rows.any() else NAN


def random_top_k(weights: np.ndarray, n_tokens: int, k: int, rng: np.random.Generator):
    """[n_tokens, k] int64: k distinct experts per token drawn without replacement in
    proportion to ``weights`` [E] (Gumbel top-k), independently of everything."""
    keys = np.log(np.maximum(weights, 1e-300))[None, :] + rng.gumbel(size=(n_tokens, weights.size))
    return np.argsort(-keys, axis=1)[:, :k]


@dataclass(frozen=True)
class Coactivation:
    """matrix [E, E] (:func:`coactivation_matrix`); strongest: mean over experts of their
    strongest partner's share, strongest_chance the same of random routers with this usage
    (:data:`CHANCE_DRAWS` simulated on as many tokens); uniform: (k - 1) / (E - 1), every
    row's mean under any router (rows sum to k - 1)."""

    matrix: np.ndarray
    strongest: float
    strongest_chance: float
    uniform: float


def coactivation(experts, n_experts: int, mask=None, seed: int = 0) -> Coactivation:
    """:class:`Coactivation` of experts [P, T, k] (k >= 2; k = 1: NaN values)."""
    shape = np.shape(experts)[:2]
    ex = _scored_experts(experts, shape, n_experts, mask)
    k = ex.shape[1]
    if k < 2 or ex.shape[0] == 0 or n_experts < 2:
        return Coactivation(np.full((n_experts, n_experts), NAN), NAN, NAN, NAN)
    matrix = coactivation_matrix(ex, n_experts)
    rng = np.random.default_rng([seed, 26, 2])
    weights = _usage(ex, n_experts)
    chance = [
        _strongest_partner(
            coactivation_matrix(random_top_k(weights, ex.shape[0], k, rng), n_experts)
        )
        for _ in range(CHANCE_DRAWS)
    ]
    return Coactivation(
        matrix, _strongest_partner(matrix), float(np.mean(chance)), (k - 1) / (n_experts - 1)
    )


# ----------------------------------------------------------------------------- repetition


@dataclass(frozen=True)
class Repetition:
    """Adjacent scored tokens of one document and block (the pairs), per domain ([D] arrays,
    NaN for a domain without pairs) and pooled (the scalars).

    first: share of pairs with the same first choice; first_chance: ``sum_e u_d(e)^2``, u_d the
    domain's first-choice usage (pooled: pair-weighted); first_null_mean, first_p: a
    within-document shuffle null (the scored tokens of each document permuted, each keeping its
    whole top-k: every document keeps its expert counts, the order is broken) and its one-sided
    p (more repetition than the shuffle). topk (k >= 2; Mixtral's "first or second choice" for
    k = 2): share of pairs whose top-k sets meet, its null mean and p. pairs: [D] counts."""

    first: float
    first_chance: float
    first_null_mean: float
    first_p: float
    topk: float
    topk_null_mean: float
    topk_p: float
    by_domain: dict[str, np.ndarray]


def _adjacent_pairs(token_docs, mask) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) int64 indices into the scored tokens: b follows a in its block, same document."""
    docs = np.asarray(token_docs)
    keep = np.ones(docs.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    index = np.cumsum(keep.ravel()).reshape(docs.shape) - 1
    pair = keep[:, :-1] & keep[:, 1:] & (docs[:, :-1] == docs[:, 1:])
    return index[:, :-1][pair], index[:, 1:][pair]


def _meet(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[..., n] bool: the top-k sets a, b [..., n, k] share an expert."""
    return (a[..., :, None] == b[..., None, :]).any(axis=(-1, -2))


def _set_codes(experts: np.ndarray, n_experts: int) -> np.ndarray:
    """[N] each token's top-k set as a bit mask (int64; E <= 62), else [N, k] the experts."""
    return (np.int64(1) << experts).sum(axis=1) if n_experts <= 62 else experts


def _codes_meet(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[K, n] bool: the shuffled sets coded by :func:`_set_codes` meet (bit masks [K, n], or
    expert lists [K, n, k])."""
    return (a & b) != 0 if a.ndim == 2 else _meet(a, b)


def repetition(
    token_docs,
    doc_domains,
    experts,
    n_domains: int,
    n_experts: int,
    n_permutations: int,
    seed: int = 0,
    mask=None,
) -> Repetition:
    """:class:`Repetition` of the probe's routing (``n_permutations`` within-document shuffles
    drawn from ``seed``, in batches)."""
    shape = np.shape(token_docs)
    ex = _scored_experts(experts, shape, n_experts, mask)
    dom = _ids(doc_domains, n_domains, "doc_domains")
    docs = np.asarray(token_docs, dtype=np.int64).ravel()
    docs = docs if mask is None else docs[np.asarray(mask, dtype=bool).ravel()]
    a, b = _adjacent_pairs(token_docs, mask)
    pair_dom = dom[docs[a]] if a.size else a
    n_pairs = np.bincount(pair_dom, minlength=n_domains).astype(np.float64)
    k = ex.shape[1]

    def per_domain(values: np.ndarray) -> np.ndarray:  # [..., pairs] -> [..., D + 1]
        sums = np.stack([values[..., pair_dom == d].sum(axis=-1) for d in range(n_domains)], -1)
        sums = np.concatenate([sums, values.sum(axis=-1, keepdims=True)], axis=-1)
        total = np.append(n_pairs, n_pairs.sum())
        return np.divide(sums, total, out=np.full(sums.shape, NAN), where=total > 0)

    first = per_domain((ex[a, 0] == ex[b, 0]).astype(np.float64))
    topk = (
        per_domain(_meet(ex[a], ex[b]).astype(np.float64)) if k >= 2 else np.full_like(first, NAN)
    )
    null_first, null_topk = [], []
    sets = _set_codes(ex, n_experts)
    for start in range(0, n_permutations, SHUFFLE_CHUNK):
        size = min(SHUFFLE_CHUNK, n_permutations - start)
        order = within_document_shuffles(docs, np.arange(docs.size), size, [seed, 26, start])
        first_s = ex[:, 0][order]  # [K, N]
        null_first.append(per_domain((first_s[:, a] == first_s[:, b]).astype(float)))
        if k >= 2:
            sets_s = sets[order]
            null_topk.append(per_domain(_codes_meet(sets_s[:, a], sets_s[:, b]).astype(float)))
    nf = np.concatenate(null_first) if null_first else np.zeros((0, n_domains + 1))
    nk = np.concatenate(null_topk) if null_topk else np.zeros((0, n_domains + 1))
    chance = _repetition_chance(ex[:, 0], dom[docs], n_domains, n_experts, n_pairs)

    def p_values(null: np.ndarray, observed: np.ndarray) -> np.ndarray:
        return np.array([permutation_p(null[:, j], observed[j]) for j in range(observed.size)])

    def null_mean(null: np.ndarray) -> np.ndarray:
        return null.mean(axis=0) if null.shape[0] else np.full(n_domains + 1, NAN)

    columns = {
        "pairs": n_pairs,
        "first": first[:-1],
        "first_chance": chance[:-1],
        "first_null_mean": null_mean(nf)[:-1],
        "first_p": p_values(nf, first)[:-1],
        "topk": topk[:-1],
        "topk_null_mean": null_mean(nk)[:-1],
        "topk_p": p_values(nk, topk)[:-1] if k >= 2 else np.full(n_domains, NAN),
    }
    return Repetition(
        first=float(first[-1]),
        first_chance=float(chance[-1]),
        first_null_mean=float(null_mean(nf)[-1]),
        first_p=float(p_values(nf, first)[-1]),
        topk=float(topk[-1]),
        topk_null_mean=float(null_mean(nk)[-1]) if k >= 2 else NAN,
        topk_p=float(p_values(nk, topk)[-1]) if k >= 2 else NAN,
        by_domain=columns,
    )


def _repetition_chance(first, token_domains, n_domains: int, n_experts: int, n_pairs):
    """[D + 1] ``sum_e u_d(e)^2`` per domain (u_d: first-choice usage of its scored tokens),
    then their pair-weighted mean."""
    counts = _unit_counts(token_domains, first, n_domains, n_experts)
    total = counts.sum(axis=1, keepdims=True)
    u = np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)
    chance = np.where(total[:, 0] > 0, (u**2).sum(axis=1), NAN)
    pooled = float(np.nansum(chance * n_pairs) / n_pairs.sum()) if n_pairs.sum() else NAN
    return np.append(chance, pooled)


# ----------------------------------------------------------------------------- vocabulary


@dataclass(frozen=True)
class VocabularySpecialisation:
    """value: mean over (id, direction) of the share of an id's held-out occurrences on the
    expert its occurrences in the other half of the documents chose most (first choice), over
    the ids seen >= min_count times on the scored tokens and in both halves; chance: the same
    of random routers with this first-choice usage on these tokens (:data:`CHANCE_DRAWS`);
    n_ids: the ids it averages over."""

    value: float
    chance: float
    n_ids: int


def _held_out_mode_share(t_idx, n_ids, folds, experts, n_experts: int, keep) -> np.ndarray:
    """[R] per (kept id, direction): held-out share on the fit half's modal expert; experts
    [R?]: one assignment [N]. ``keep`` [n_ids] bool."""
    shares = []
    for fit in (0, 1):
        fit_m = folds == fit
        fit_c = _unit_counts(t_idx[fit_m], experts[fit_m], n_ids, n_experts)
        score_c = _unit_counts(t_idx[~fit_m], experts[~fit_m], n_ids, n_experts)
        mode = np.argmax(fit_c, axis=1)
        rows = keep & (fit_c.sum(axis=1) > 0) & (score_c.sum(axis=1) > 0)
        shares.append(score_c[rows, mode[rows]] / score_c[rows].sum(axis=1))
    return np.concatenate(shares)


def _id_halves(probe: ProbeArrays, seed: int) -> tuple[np.ndarray, int, np.ndarray]:
    """(compacted token ids [N], number of distinct ids, each token's document half [N] in
    {0, 1} from :func:`document_folds` of ``seed``) of a checked probe."""
    t_idx, n_ids = _compact(probe.tok)
    if probe.tok.size == 0:
        return t_idx, n_ids, probe.tok
    return t_idx, n_ids, document_folds(probe.dom, probe.n_domains, seed)[probe.docs]


def vocabulary_specialisation(
    token_ids,
    token_docs,
    doc_domains,
    experts,
    n_domains: int,
    n_experts: int,
    min_count: int = 10,
    seed: int = 0,
    mask=None,
) -> VocabularySpecialisation:
    """:class:`VocabularySpecialisation` on :func:`document_folds` of ``seed``."""
    probe = _probe(token_ids, token_docs, doc_domains, experts, n_domains, n_experts, mask)
    if probe.tok.size == 0:
        return VocabularySpecialisation(NAN, NAN, 0)
    t_idx, n_ids, folds = _id_halves(probe, seed)
    first = probe.first
    keep = np.bincount(t_idx, minlength=n_ids) >= min_count
    observed = _held_out_mode_share(t_idx, n_ids, folds, first, n_experts, keep)
    if observed.size == 0:
        return VocabularySpecialisation(NAN, NAN, 0)
    rng = np.random.default_rng([seed, 26, 4])
    usage = np.bincount(first, minlength=n_experts) / first.size
    chance = [
        _held_out_mode_share(
            t_idx, n_ids, folds, rng.choice(n_experts, size=first.size, p=usage), n_experts, keep
        ).mean()
        for _ in range(CHANCE_DRAWS)
    ]
    return VocabularySpecialisation(float(observed.mean()), float(np.mean(chance)), int(keep.sum()))


# ----------------------------------------------------------------------------- relative load


def relative_load(table) -> np.ndarray:
    """[D, E] a domain x expert assignment table [D, E] over its balanced load: ``E * n_de /
    sum_e n_de`` (1: the expert takes its even share of the domain's tokens; a domain with no
    tokens: NaN)."""
    arr = np.asarray(table, dtype=np.float64)
    total = arr.sum(axis=1, keepdims=True)
    return np.divide(arr * arr.shape[1], total, out=np.full_like(arr, NAN), where=total > 0)


# ----------------------------------------------------------------------------- token lists


@dataclass(frozen=True)
class ExpertTokens:
    """Per expert, its most over-represented ids on fold 0 of the documents (first choice),
    checked on fold 1; flat arrays [R], rows by expert then rank.

    lift = p(id | e) / p(id) = n_ie N / (n_i n_e) on that half. replicated: on fold 1 the id's
    count on the expert exceeds its expectation ``n_i n_e / N`` by more than z = 1.645 binomial
    standard deviations (one-sided 5%: about 5% of the listed ids replicate under a random
    router); an id absent from fold 1 does not. text: each id decoded (empty: not decoded)."""

    expert: np.ndarray
    token_id: np.ndarray
    count: np.ndarray
    lift: np.ndarray
    check_count: np.ndarray
    check_lift: np.ndarray
    replicated: np.ndarray
    text: tuple[str, ...] = ()

    @property
    def replicated_share(self) -> float:
        return float(self.replicated.mean()) if self.replicated.size else NAN


REPLICATION_Z = 1.645


def _half_counts(t_idx, experts, n_ids, n_experts):
    counts = _unit_counts(t_idx, experts, n_ids, n_experts)  # [ids, E]
    n = counts.sum()
    expected = np.outer(counts.sum(axis=1), counts.sum(axis=0)) / max(n, 1.0)
    lift = np.divide(counts, expected, out=np.zeros_like(counts), where=expected > 0)
    return counts, expected, lift


def expert_token_lists(
    token_ids,
    token_docs,
    doc_domains,
    experts,
    n_domains: int,
    n_experts: int,
    top: int = 10,
    min_count: int = 10,
    seed: int = 0,
    mask=None,
) -> ExpertTokens:
    """:class:`ExpertTokens`: up to ``top`` ids per expert with lift > 1, at least ``min_count``
    occurrences on fold 0 and 3 on the expert, by lift (ties: count)."""
    probe = _probe(token_ids, token_docs, doc_domains, experts, n_domains, n_experts, mask)
    t_idx, n_ids, folds = _id_halves(probe, seed)
    uniq, first = np.unique(probe.tok), probe.first
    fit, check = folds == 0, folds == 1
    counts, _, lift = _half_counts(t_idx[fit], first[fit], n_ids, n_experts)
    c_counts, c_expected, c_lift = _half_counts(t_idx[check], first[check], n_ids, n_experts)
    c_share = c_counts.sum(axis=0) / max(c_counts.sum(), 1.0)
    sd = np.sqrt(c_expected * (1 - c_share[None, :]))
    z = np.divide(c_counts - c_expected, sd, out=np.zeros_like(sd), where=sd > 0)
    eligible = (counts.sum(axis=1) >= min_count)[:, None] & (counts >= 3) & (lift > 1)
    rows: list[tuple[int, int]] = []
    for e in range(n_experts):
        ids = np.flatnonzero(eligible[:, e])
        order = np.lexsort((-counts[ids, e], -lift[ids, e]))[:top]
        rows += [(e, int(i)) for i in ids[order]]
    ex = np.array([r[0] for r in rows], dtype=np.int64)
    ix = np.array([r[1] for r in rows], dtype=np.int64)
    return ExpertTokens(
        expert=ex,
        token_id=uniq[ix] if ix.size else ix,
        count=counts[ix, ex].astype(np.int64),
        lift=lift[ix, ex],
        check_count=c_counts[ix, ex].astype(np.int64),
        check_lift=c_lift[ix, ex],
        replicated=(z[ix, ex] > REPLICATION_Z) & (c_counts[ix].sum(axis=1) > 0),
    )


# ----------------------------------------------------------------------------- one layer


@dataclass(frozen=True)
class LayerSpecialisation:
    """The metrics of one MoE layer at one checkpoint, each beside its chance level (the
    scalars: :data:`SCALARS`), with the co-activation matrix [E, E] and the repetition per
    domain (:attr:`Repetition.by_domain`). Saturation reads against the run's final
    checkpoint (NaN where there is none)."""

    saturation_top1: float
    saturation_top1_chance: float
    saturation_topk: float
    saturation_topk_chance: float
    coactivation_strongest: float
    coactivation_strongest_chance: float
    coactivation_uniform: float
    repetition: float
    repetition_chance: float
    repetition_null_mean: float
    repetition_p: float
    repetition_topk: float
    repetition_topk_null_mean: float
    repetition_topk_p: float
    vocab_spec: float
    vocab_spec_chance: float
    vocab_spec_ids: int
    coactivation: np.ndarray
    repetition_by_domain: dict[str, np.ndarray]

    def scalars(self) -> dict[str, float]:
        """The :data:`SCALARS` as plain Python numbers."""
        return {
            name: (int if name == "vocab_spec_ids" else float)(getattr(self, name))
            for name in SCALARS
        }


SCALARS = tuple(
    f
    for f in LayerSpecialisation.__dataclass_fields__
    if f
    not in (
        "coactivation",
        "repetition_by_domain",
    )
)


def specialise_layer(
    token_ids,
    token_docs,
    doc_domains,
    experts,
    final_experts,
    n_domains: int,
    n_experts: int,
    n_permutations: int,
    seed: int = 0,
    min_count: int = 10,
    mask=None,
) -> LayerSpecialisation:
    """Every metric of one layer's routing ``experts`` [P, T, k] (``final_experts``: the run's
    final routing, for saturation; None: NaN); min(``n_permutations``,
    :data:`REPETITION_SHUFFLES`) within-document shuffles for the repetition null."""
    if final_experts is None:
        sat = Saturation(NAN, NAN, NAN, NAN)
    else:
        sat = router_saturation(experts, final_experts, n_experts, mask)
    co = coactivation(experts, n_experts, mask, seed)
    shuffles = min(n_permutations, REPETITION_SHUFFLES)
    rep = repetition(token_docs, doc_domains, experts, n_domains, n_experts, shuffles, seed, mask)
    voc = vocabulary_specialisation(
        token_ids, token_docs, doc_domains, experts, n_domains, n_experts, min_count, seed, mask
    )
    return LayerSpecialisation(
        saturation_top1=sat.top1,
        saturation_top1_chance=sat.top1_chance,
        saturation_topk=sat.topk,
        saturation_topk_chance=sat.topk_chance,
        coactivation_strongest=co.strongest,
        coactivation_strongest_chance=co.strongest_chance,
        coactivation_uniform=co.uniform,
        repetition=rep.first,
        repetition_chance=rep.first_chance,
        repetition_null_mean=rep.first_null_mean,
        repetition_p=rep.first_p,
        repetition_topk=rep.topk,
        repetition_topk_null_mean=rep.topk_null_mean,
        repetition_topk_p=rep.topk_p,
        vocab_spec=voc.value,
        vocab_spec_chance=voc.chance,
        vocab_spec_ids=voc.n_ids,
        coactivation=co.matrix,
        repetition_by_domain=rep.by_domain,
    )


def specialise_probe(
    probe: Any,
    experts: Mapping[int, np.ndarray],
    final: Mapping[int, np.ndarray] | None,
    n_experts: int,
    n_permutations: int,
    seed: int = 0,
    min_count: int = 10,
) -> dict[int, LayerSpecialisation]:
    """Per MoE layer (sorted), :func:`specialise_layer` of ``experts[layer]`` (int [P, T, k])
    on a probe (:class:`~moe_emergence.analysis.probe.Probe`: its input_ids, token_docs,
    doc_domains, domains and token_mask), saturation against ``final[layer]`` (None: NaN)."""
    return {
        layer: specialise_layer(
            probe.input_ids,
            probe.token_docs,
            probe.doc_domains,
            chosen,
            None if final is None else final.get(layer),
            len(probe.domains),
            n_experts,
            n_permutations=n_permutations,
            seed=seed,
            min_count=min_count,
            mask=probe.token_mask,
        )
        for layer, chosen in sorted(experts.items())
    }
