"""The field's specialisation metrics on simulated routers of known answer, and the anchors'
pitfalls (OLMoE's rank-adjacent co-activation count, its unfiltered in-sample vocabulary
average) shown to read wrong where ours read their chance level."""

from __future__ import annotations

import numpy as np
import pytest

from moe_emergence.analysis.specialisation import (
    REPETITION_SHUFFLES,
    coactivation,
    coactivation_matrix,
    expert_token_lists,
    random_top_k,
    relative_load,
    repetition,
    router_saturation,
    specialise_layer,
    vocabulary_specialisation,
)

P, T, D = 96, 64, 3  # blocks of T tokens, two blocks per document, domains by document


def zipf_tokens(rng, shape, vocab=2000, a=1.2):
    """Zipf-distributed token ids in [0, vocab)."""
    return np.minimum(rng.zipf(a, size=shape) - 1, vocab - 1)


@pytest.fixture(scope="module")
def probe():
    rng = np.random.default_rng(0)
    ids = zipf_tokens(rng, (P, T))
    token_docs = np.repeat(np.arange(P // 2), 2)[:, None].repeat(T, axis=1)
    doc_domains = np.arange(P // 2) % D
    return ids, token_docs, doc_domains


def random_router(rng, n_experts, k, shape=(P, T)):
    n = int(np.prod(shape))
    return random_top_k(np.ones(n_experts), n, k, rng).reshape(*shape, k)


def token_router(ids, n_experts, k):
    h = (ids * 2654435761) % 9973 % n_experts
    return np.stack([(h + j) % n_experts for j in range(k)], axis=-1)


def domain_router(token_docs, doc_domains, n_experts, k):
    d = doc_domains[token_docs]
    return np.stack([(d + j) % n_experts for j in range(k)], axis=-1)


# ----------------------------------------------------------------------------- saturation


def test_saturation_of_independent_random_routers_reads_its_chance():
    rng = np.random.default_rng(1)
    a, b = random_router(rng, 8, 2), random_router(rng, 8, 2)
    s = router_saturation(a, b, 8)
    assert s.top1 == pytest.approx(s.top1_chance, abs=0.01)
    assert s.top1_chance == pytest.approx(1 / 8, abs=0.005)
    assert s.topk == pytest.approx(s.topk_chance, abs=0.01)  # 2/8 * 2 / 2 = 1/4
    assert s.topk_chance == pytest.approx(0.25, abs=0.005)


def test_saturation_of_the_final_itself_is_one_and_a_collapsed_router_is_at_chance(probe):
    ids, _, _ = probe
    ex = token_router(ids, 8, 2)
    s = router_saturation(ex, ex, 8)
    assert (s.top1, s.topk) == (1.0, 1.0)
    assert s.top1_chance < 0.3
    collapsed = np.zeros((P, T, 1), dtype=np.int64)
    c = router_saturation(collapsed, collapsed, 4)
    assert c.top1 == c.top1_chance == 1.0  # agreement a collapsed router cannot help


# ----------------------------------------------------------------------------- co-activation


def rank_adjacent_coactivation(experts: np.ndarray, n_experts: int) -> np.ndarray:
    """The anchor script's reading: only rank-adjacent pairs (r, r + 1) of each token's list,
    both ways, over N(Ei)."""
    counts = np.zeros((n_experts, n_experts))
    for r in range(experts.shape[1] - 1):
        np.add.at(counts, (experts[:, r], experts[:, r + 1]), 1)
        np.add.at(counts, (experts[:, r + 1], experts[:, r]), 1)
    used = np.bincount(experts.ravel(), minlength=n_experts)
    out = counts / used[:, None]
    np.fill_diagonal(out, np.nan)
    return out


def test_random_top8_of_64_coactivation_reads_k_minus_1_over_e_minus_1_and_rank_adjacent_4x_low():
    rng = np.random.default_rng(2)
    ex = random_top_k(np.ones(64), 20_000, 8, rng)
    ours = np.nanmean(coactivation_matrix(ex, 64))
    anchor = np.nanmean(rank_adjacent_coactivation(ex, 64))
    assert ours == pytest.approx(7 / 63, rel=1e-9)  # 11.1%
    assert anchor == pytest.approx(2 * 7 / (8 * 63), rel=0.02)  # 2.8%
    assert ours / anchor == pytest.approx(4.0, rel=0.05)
    c = coactivation(ex.reshape(200, 100, 8), 64)
    assert c.uniform == pytest.approx(7 / 63)
    assert c.strongest == pytest.approx(c.strongest_chance, rel=0.05)


def test_coactivation_of_a_structured_router_beats_its_chance(probe):
    ids, _, _ = probe
    c = coactivation(token_router(ids, 8, 2), 8)  # expert e always pairs with e + 1
    assert c.strongest > 0.45 > c.strongest_chance
    one = coactivation(token_router(ids, 8, 1), 8)
    assert np.isnan(one.strongest) and np.isnan(one.uniform)


# ----------------------------------------------------------------------------- repetition


def test_random_router_repetition_reads_chance_and_mixtral_top2_reference(probe):
    _, token_docs, doc_domains = probe
    rng = np.random.default_rng(3)
    ex = random_router(rng, 8, 2)
    r = repetition(token_docs, doc_domains, ex, D, 8, 99, seed=0)
    assert r.first == pytest.approx(1 / 8, abs=0.01)
    assert r.first == pytest.approx(r.first_chance, abs=0.01)
    assert r.first_null_mean == pytest.approx(r.first_chance, abs=0.005)
    assert r.topk == pytest.approx(1 - 6 / 8 * 5 / 7, abs=0.015)  # Mixtral's 46%
    assert r.first_p > 0.01 and r.topk_p > 0.01
    assert r.by_domain["pairs"].sum() == P * (T - 1)  # pairs never cross blocks


def test_domain_router_repeats_no_more_than_its_usage_and_a_sticky_router_does(probe):
    _, token_docs, doc_domains = probe
    dom = repetition(
        token_docs, doc_domains, domain_router(token_docs, doc_domains, 4, 1), D, 4, 49
    )
    assert dom.first == dom.first_chance == 1.0 and dom.first_p == 1.0
    rng = np.random.default_rng(4)
    ex = rng.integers(0, 4, (P, T))
    stick = rng.random((P, T)) < 0.5
    for t in range(1, T):
        ex[:, t] = np.where(stick[:, t], ex[:, t - 1], ex[:, t])
    r = repetition(token_docs, doc_domains, ex[..., None], D, 4, 49)
    assert r.first > 0.55 > r.first_null_mean + 0.2
    assert r.first_p == pytest.approx(1 / 50)
    np.testing.assert_allclose(r.by_domain["first_p"], 1 / 50)


def test_repetition_pairs_keep_to_scored_tokens_of_one_document(probe):
    _, token_docs, doc_domains = probe
    mask = np.ones((P, T), dtype=bool)
    mask[:, 10] = False
    ex = np.zeros((P, T, 1), dtype=np.int64)
    r = repetition(token_docs, doc_domains, ex, D, 4, 0, mask=mask)
    assert r.by_domain["pairs"].sum() == P * (T - 3)
    assert np.isnan(r.first_null_mean)


# ----------------------------------------------------------------------------- vocabulary


def test_random_top1_over_64_on_zipf_unfiltered_in_sample_reads_high_ours_reads_chance():
    rng = np.random.default_rng(5)
    shape = (200, 128)
    ids = zipf_tokens(rng, shape, vocab=50_000, a=1.3)
    docs = np.arange(200)[:, None].repeat(128, axis=1)
    ex = rng.integers(0, 64, shape)
    # the anchor: every id, however rare, its in-sample modal share, averaged over ids
    _, inv = np.unique(ids, return_inverse=True)
    counts = np.zeros((inv.max() + 1, 64))
    np.add.at(counts, (inv.ravel(), ex.ravel()), 1)
    anchor = (counts.max(axis=1) / counts.sum(axis=1)).mean()
    assert anchor > 0.6  # against a uniform 1/64 = 0.016
    v = vocabulary_specialisation(ids, docs, np.zeros(200, dtype=int), ex, 1, 64, min_count=10)
    assert v.n_ids > 50
    assert v.value == pytest.approx(v.chance, abs=0.01)
    assert v.value < 0.05


def test_vocabulary_specialisation_of_token_and_collapsed_routers(probe):
    ids, token_docs, doc_domains = probe
    t = vocabulary_specialisation(ids, token_docs, doc_domains, token_router(ids, 8, 1), D, 8)
    assert t.value == 1.0 and t.chance < 0.3
    zero = np.zeros((P, T, 1), dtype=np.int64)
    c = vocabulary_specialisation(ids, token_docs, doc_domains, zero, D, 8)
    assert c.value == c.chance == 1.0


# ----------------------------------------------------------------------------- load, lists


def test_relative_load():
    table = np.array([[10, 0, 0, 0], [5, 5, 5, 5], [0, 0, 0, 0]])
    out = relative_load(table)
    np.testing.assert_allclose(out[0], [4, 0, 0, 0])
    np.testing.assert_allclose(out[1], [1, 1, 1, 1])
    assert np.isnan(out[2]).all()


def test_token_lists_replicate_for_a_token_router_and_not_for_a_random_one(probe):
    ids, token_docs, doc_domains = probe
    lists = expert_token_lists(ids, token_docs, doc_domains, token_router(ids, 8, 1), D, 8)
    assert lists.expert.size > 0 and lists.replicated_share > 0.9
    rng = np.random.default_rng(6)
    noise = expert_token_lists(ids, token_docs, doc_domains, random_router(rng, 8, 1), D, 8)
    assert noise.expert.size > 0 and noise.replicated_share < 0.2
    assert np.isin(lists.token_id, ids).all()


def test_random_top8_of_64_sets_meet_at_their_chance(probe):
    """More than 62 experts: the top-k sets compared as lists, not bit masks."""
    _, token_docs, doc_domains = probe
    rng = np.random.default_rng(7)
    r = repetition(token_docs, doc_domains, random_router(rng, 64, 8), D, 64, 19)
    disjoint = np.prod([(56 - i) / (64 - i) for i in range(8)])  # C(56, 8) / C(64, 8)
    assert r.topk == pytest.approx(1 - disjoint, abs=0.02)
    assert r.topk_null_mean == pytest.approx(1 - disjoint, abs=0.01)


def test_one_layer_holds_every_metric_and_caps_the_repetition_shuffles(probe):
    ids, token_docs, doc_domains = probe
    ex = token_router(ids, 8, 2)
    ex[:, 1:] = ex[:, :1]  # every token repeats its block's first expert set
    m = specialise_layer(ids, token_docs, doc_domains, ex, ex, D, 8, n_permutations=999)
    assert m.repetition_p == pytest.approx(1 / (REPETITION_SHUFFLES + 1))
    assert m.saturation_top1 == m.saturation_topk == 1.0
    assert m.coactivation_uniform == pytest.approx(1 / 7)
    assert set(m.scalars()) >= {"vocab_spec", "vocab_spec_chance", "repetition_chance"}
    assert m.repetition_by_domain["first"].shape == (D,)
    none = specialise_layer(ids, token_docs, doc_domains, ex, None, D, 8, n_permutations=9)
    assert np.isnan(none.saturation_top1)
