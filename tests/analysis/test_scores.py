"""Known-answer tests of the domain-specialisation scores (pure numpy, no model)."""

from __future__ import annotations

import math
from dataclasses import fields

import numpy as np
import pytest

from moe_emergence.analysis import scores
from moe_emergence.analysis.scores import (
    LayerScores,
    collapsed_expert,
    conditional_mi_null,
    contingency,
    entropy,
    mutual_information,
    nmi,
    null_summary,
    permutation_null,
    score_layer,
    shares,
    token_identity_control,
    usage_entropy,
)


def _h(*p: float) -> float:
    """Entropy (nats) of probabilities p, by hand."""
    return -sum(x * math.log(x) for x in p if x > 0)


# ----------------------------------------------------------------------------- NMI


@pytest.mark.parametrize("n_experts", [3, 7])
def test_domain_d_to_expert_d_gives_nmi_one(n_experts: int) -> None:
    domains = np.repeat(np.arange(3), [5, 9, 2])  # unequal domain sizes
    table = contingency(domains, domains, n_domains=3, n_experts=n_experts)
    assert table.shape == (3, n_experts)
    assert nmi(table) == pytest.approx(1.0, abs=1e-12)
    assert mutual_information(table) == pytest.approx(_h(5 / 16, 9 / 16, 2 / 16), abs=1e-12)


def test_mi_entropy_nmi_of_2x2_table_by_hand() -> None:
    table = np.array([[3, 1], [1, 3]])
    mi = 2 * (3 / 8) * math.log((3 / 8) / (1 / 4)) + 2 * (1 / 8) * math.log((1 / 8) / (1 / 4))
    assert mutual_information(table) == pytest.approx(mi, abs=1e-14)
    assert nmi(table) == pytest.approx(mi / math.log(2), abs=1e-14)
    assert entropy(table) == pytest.approx([_h(3 / 4, 1 / 4)] * 2, abs=1e-14)
    assert entropy(table, axis=0) == pytest.approx([_h(3 / 4, 1 / 4)] * 2, abs=1e-14)
    assert entropy([3, 1]) == pytest.approx(_h(3 / 4, 1 / 4), abs=1e-14)
    assert isinstance(entropy([3, 1]), float)


def test_degenerate_tables() -> None:
    assert entropy([0, 0, 0]) == 0.0
    assert np.array_equal(entropy(np.array([[0, 0], [2, 2]])), [0.0, math.log(2)])
    assert mutual_information(np.zeros((2, 3))) == 0.0
    assert nmi(np.zeros((2, 3))) == 0.0
    assert nmi([[4, 1, 2], [0, 0, 0]]) == 0.0  # one domain: H(D) == 0
    assert mutual_information([[2, 4], [1, 2]]) == pytest.approx(0.0, abs=1e-15)  # independent


def test_uniform_usage_has_entropy_log_e() -> None:
    table = np.array([[1, 2, 0, 4], [3, 2, 4, 0]])  # column sums all 4
    assert usage_entropy(table) == pytest.approx(math.log(4), abs=1e-14)
    assert entropy(np.full(6, 7)) == pytest.approx(math.log(6), abs=1e-14)
    assert usage_entropy([[10, 0, 0, 0]]) == 0.0


# ----------------------------------------------------------------------------- contingency


def test_contingency_counts_every_top_k_assignment() -> None:
    domains = np.array([0, 1, 1])
    experts = np.array([[0, 2], [1, 2], [2, 0]])
    table = contingency(domains, experts, n_domains=2, n_experts=3)
    assert table.dtype == np.int64
    assert np.array_equal(table, [[1, 0, 1], [1, 1, 2]])
    assert table.sum() == 2 * len(domains)
    flat = contingency(domains, np.array([0, 2, 2]), n_domains=2, n_experts=3)  # [N]: k = 1
    assert np.array_equal(flat, [[1, 0, 0], [0, 0, 2]])


@pytest.mark.parametrize(
    ("domains", "experts"),
    [([0, 2], [0, 1]), ([0, 1], [0, 3]), ([0, 1], [-1, 0]), ([0, 1], [[0], [1], [2]])],
)
def test_contingency_rejects_bad_ids(domains: list[int], experts: list[int]) -> None:
    with pytest.raises(ValueError):
        contingency(np.array(domains), np.array(experts), n_domains=2, n_experts=3)


# ----------------------------------------------------------------------------- permutation null


def _block_counts(experts: np.ndarray, n_experts: int) -> np.ndarray:
    return np.stack([np.bincount(row.ravel(), minlength=n_experts) for row in experts])


def test_random_routing_is_within_null_and_specialised_routing_far_above() -> None:
    n_blocks, length, n_dom, n_exp = 60, 64, 3, 4
    rng = np.random.default_rng(3)
    block_domains = np.arange(n_blocks) % n_dom
    token_ids = rng.integers(0, 100, (n_blocks, length))
    random_experts = rng.integers(0, n_exp, (n_blocks, length))
    chance = score_layer(token_ids, block_domains, random_experts, n_dom, n_exp)
    assert 0 < chance.null_mean < 0.05
    assert chance.null_mean <= chance.null_p95
    assert chance.nmi <= chance.null_p95

    # Specialised: 80% of tokens go to their domain's expert, the rest at random.
    own = np.broadcast_to(block_domains[:, None], (n_blocks, length))
    special_experts = np.where(rng.random((n_blocks, length)) < 0.8, own, random_experts)
    special = score_layer(token_ids, block_domains, special_experts, n_dom, n_exp)
    assert special.nmi > 0.3
    assert special.nmi > 5 * special.null_p95


def test_permutation_null_is_seeded() -> None:
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 20, (30, 5))
    block_domains = np.arange(30) % 3
    a = permutation_null(counts, block_domains, 3, n_permutations=50, seed=7)
    b = permutation_null(counts, block_domains, 3, n_permutations=50, seed=7)
    c = permutation_null(counts, block_domains, 3, n_permutations=50, seed=8)
    assert a.shape == (50,)
    assert a.dtype == np.float64
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.all((a >= 0) & (a <= 1))
    assert permutation_null(counts, block_domains, 3, n_permutations=0).shape == (0,)


def test_permuted_tables_follow_the_documented_draws_and_keep_margins() -> None:
    rng = np.random.default_rng(1)
    length, n_exp = 16, 4
    counts = rng.multinomial(length, [0.1, 0.2, 0.3, 0.4], size=12)  # every block: 16 tokens
    block_domains = np.array([0] * 6 + [1] * 4 + [2] * 2)
    original = np.stack([counts[block_domains == d].sum(axis=0) for d in range(3)])
    tables = scores._permuted_tables(counts, block_domains, 3, n_permutations=25, seed=5)
    assert tables.shape == (25, 3, n_exp)
    assert np.array_equal(tables.sum(axis=1), np.broadcast_to(original.sum(axis=0), (25, n_exp)))
    assert np.array_equal(tables.sum(axis=2), np.broadcast_to(original.sum(axis=1), (25, 3)))

    draws = np.random.default_rng(5)
    null = permutation_null(counts, block_domains, 3, n_permutations=25, seed=5)
    for i in range(25):
        labels = draws.permutation(block_domains)
        expected = np.stack([counts[labels == d].sum(axis=0) for d in range(3)])
        assert np.array_equal(tables[i], expected)
        assert null[i] == pytest.approx(nmi(expected), abs=1e-12)


def test_null_summary() -> None:
    null = np.arange(101, dtype=float) / 100
    mean, p95 = null_summary(null)
    assert mean == pytest.approx(0.5)
    assert p95 == pytest.approx(0.95)
    assert all(math.isnan(x) for x in null_summary(np.array([])))


# ----------------------------------------------------------------------------- token identity


def test_token_id_routing_of_domain_confined_tokens_is_fully_explained() -> None:
    rng = np.random.default_rng(0)
    n_dom, n_exp = 3, 5
    domains = rng.integers(0, n_dom, 400)
    token_ids = domains * 10 + rng.integers(0, 10, 400)  # ids 0-9: domain 0, 10-19: domain 1 ...
    expert_of_id = rng.integers(0, n_exp, 30)
    experts = expert_of_id[token_ids]
    control = token_identity_control(token_ids, domains, experts, n_dom, n_exp)
    assert control.shared_token_ids == 0
    assert control.cond_mi == 0.0
    assert control.token_id_nmi == nmi(contingency(domains, experts, n_dom, n_exp))
    assert control.token_id_nmi > 0.2
    assert control.token_id_share == 1.0


def test_domain_dependent_routing_of_shared_tokens_is_not_token_identity() -> None:
    n_dom = 3
    token_ids = np.tile(np.arange(20), n_dom * 2)  # every id twice in every domain
    domains = np.repeat(np.arange(n_dom), 40)
    experts = domains  # expert = domain, whatever the token
    control = token_identity_control(token_ids, domains, experts, n_dom, n_experts=4)
    assert control.shared_token_ids == 20
    assert control.cond_mi == pytest.approx(math.log(3), abs=1e-12)  # each id: I = H(D) = log 3
    assert control.token_id_nmi == 0.0  # every id predicted to expert 0 (a three-way tie)
    assert control.token_id_share == 0.0


def test_cond_mi_and_token_router_by_hand() -> None:
    token_ids = np.array([0, 0, 0, 1, 1, 2])
    domains = np.array([0, 0, 1, 0, 1, 0])
    experts = np.array([0, 0, 1, 0, 0, 1])
    control = token_identity_control(token_ids, domains, experts, n_domains=2, n_experts=2)
    # id 0: [[2, 0], [0, 1]] -> I = H(2/3, 1/3), weight 3/5; id 1: [[1, 0], [1, 0]] -> I = 0.
    assert control.cond_mi == pytest.approx(3 / 5 * _h(2 / 3, 1 / 3), abs=1e-14)
    assert control.shared_token_ids == 2
    # Router: id 0 -> expert 0 (2 of 3), id 1 -> 0, id 2 -> 1.
    router_nmi = nmi([[3, 1], [2, 0]])
    assert control.token_id_nmi == pytest.approx(router_nmi, abs=1e-14)
    assert control.token_id_share == min(1.0, router_nmi / nmi([[3, 1], [1, 1]]))


def test_token_router_ties_go_to_the_lower_expert() -> None:
    # id 5 goes once to expert 1 (domain 0) and once to expert 0 (domain 1): tie -> expert 0.
    # id 6 (domain 1 only) -> expert 0. Router table [[1, 0], [2, 0]]: NMI 0. (Tie -> 1: > 0.)
    control = token_identity_control([5, 5, 6], [0, 1, 1], [1, 0, 0], n_domains=2, n_experts=2)
    assert control.token_id_nmi == 0.0
    assert control.token_id_share == 0.0


def test_top2_token_router() -> None:
    token_ids = np.array([0, 0, 0, 1])
    domains = np.array([0, 0, 1, 1])
    experts = np.array([[2, 0], [2, 1], [2, 1], [0, 1]])
    control = token_identity_control(token_ids, domains, experts, n_domains=2, n_experts=3)
    # id 0: expert 2 x3, 1 x2, 0 x1 -> {2, 1}; id 1 -> {0, 1}.
    assert control.token_id_nmi == pytest.approx(nmi([[0, 2, 2], [1, 2, 1]]), abs=1e-14)
    # id 0 in domain 0: [[1, 1, 2]]; in domain 1: [[0, 1, 1]]; 6 assignments of shared ids.
    assert control.cond_mi == pytest.approx(mutual_information([[1, 1, 2], [0, 1, 1]]), abs=1e-14)


def test_top_k_fills_unseen_experts_by_index() -> None:
    # Sorted (token, expert) pairs: token 0 saw only expert 2; token 1 saw 3 (x1) and 1 (x4).
    pred = scores._top_k_experts(
        np.array([0, 1, 1]), np.array([2, 1, 3]), np.array([5.0, 4.0, 1.0]), 2, 2, 4
    )
    assert np.array_equal(pred, [[2, 0], [1, 3]])


def _reference_control(token_ids, domains, experts, n_dom, n_exp):
    """Loop-based reference of token_identity_control's numbers."""
    k = experts.shape[1]
    cond, n_shared, router = 0.0, 0, np.zeros((n_dom, n_exp))
    for t in np.unique(token_ids):
        at = token_ids == t
        table = contingency(domains[at], experts[at], n_dom, n_exp)
        if (table.sum(axis=1) > 0).sum() >= 2:
            cond += table.sum() * mutual_information(table)
            n_shared += table.sum()
        usage = table.sum(axis=0)
        best = sorted(range(n_exp), key=lambda e, usage=usage: (-usage[e], e))[:k]
        for d in domains[at]:
            router[d, best] += 1
    return (cond / n_shared if n_shared else 0.0), nmi(router)


@pytest.mark.parametrize("k", [1, 2])
def test_token_identity_control_matches_loop_reference(k: int) -> None:
    rng = np.random.default_rng(k)
    n, n_dom, n_exp = 500, 3, 5
    token_ids = rng.integers(0, 40, n) * 1000 + 50_000  # sparse, large ids
    domains = rng.integers(0, n_dom, n)
    experts = np.argsort(rng.random((n, n_exp)) + 0.3 * (np.arange(n_exp) == domains[:, None]))
    experts = experts[:, -k:]
    control = token_identity_control(token_ids, domains, experts, n_dom, n_exp)
    cond, router_nmi = _reference_control(token_ids, domains, experts, n_dom, n_exp)
    assert control.cond_mi == pytest.approx(cond, rel=1e-12)
    assert control.token_id_nmi == pytest.approx(router_nmi, rel=1e-12)


def test_token_identity_control_of_no_tokens() -> None:
    empty = np.array([], dtype=np.int64)
    control = token_identity_control(empty, empty, empty, n_domains=2, n_experts=3)
    assert (control.cond_mi, control.token_id_nmi, control.shared_token_ids) == (0.0, 0.0, 0)
    assert math.isnan(control.token_id_share)


# ----------------------------------------------------------------------------- cond_mi null


def _slow_cond_mi_null(token_ids, block_domains, experts, n_dom, n_exp, n_permutations, seed):
    """Direct reference: token_identity_control's cond_mi on each relabelled probe, the labels
    drawn as permutation_null documents (the i-th default_rng(seed).permutation)."""
    n_blocks, length = token_ids.shape
    flat = experts.reshape(n_blocks * length, -1)
    draws = np.random.default_rng(seed)
    out = []
    for _ in range(n_permutations):
        domains = np.repeat(draws.permutation(block_domains), length)
        out.append(token_identity_control(token_ids.ravel(), domains, flat, n_dom, n_exp).cond_mi)
    return np.array(out)


def _probe(seed: int, n_blocks: int, length: int, n_ids: int, n_dom: int, n_exp: int, k: int):
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(0, n_ids, (n_blocks, length)) * 13 + 7  # sparse ids
    block_domains = rng.integers(0, n_dom, n_blocks)
    experts = np.argsort(rng.random((n_blocks, length, n_exp)), axis=-1)[..., :k]
    return token_ids, block_domains, experts


@pytest.mark.parametrize(("k", "n_ids"), [(1, 15), (2, 15), (3, 40), (1, 200)])
def test_cond_mi_null_matches_the_direct_reference(k: int, n_ids: int) -> None:
    n_dom, n_exp = 3, 6
    token_ids, block_domains, experts = _probe(k + n_ids, 24, 10, n_ids, n_dom, n_exp, k)
    null = conditional_mi_null(token_ids, block_domains, experts, n_dom, n_exp, 40, seed=3)
    ref = _slow_cond_mi_null(token_ids, block_domains, experts, n_dom, n_exp, 40, seed=3)
    assert null.shape == (40,)
    assert null.dtype == np.float64
    np.testing.assert_allclose(null, ref, rtol=1e-10, atol=1e-13)
    assert np.unique(null).size > 1  # the draws differ: a real test of the relabelling
    if k == 1:  # experts [P, T] is k = 1
        flat = conditional_mi_null(token_ids, block_domains, experts[..., 0], n_dom, n_exp, 40, 3)
        assert np.array_equal(flat, null)


def test_cond_mi_null_is_paired_with_the_nmi_null() -> None:
    n_dom, n_exp, length = 3, 5, 8
    token_ids, block_domains, experts = _probe(0, 30, length, 20, n_dom, n_exp, 2)
    block_counts = np.stack([np.bincount(b.ravel(), minlength=n_exp) for b in experts])
    nmi_null = permutation_null(block_counts, block_domains, n_dom, n_permutations=25, seed=11)
    cond_null = conditional_mi_null(token_ids, block_domains, experts, n_dom, n_exp, 25, seed=11)
    # Both come from the one helper's draws: permutation i of one is permutation i of the other.
    labels = scores._permutation_labels(block_domains, 25, 11)
    flat = experts.reshape(-1, 2)
    for i, perm in enumerate(labels):
        domains = np.repeat(perm, length)
        assert nmi_null[i] == pytest.approx(nmi(contingency(domains, flat, n_dom, n_exp)))
        control = token_identity_control(token_ids.ravel(), domains, flat, n_dom, n_exp)
        assert cond_null[i] == pytest.approx(control.cond_mi, rel=1e-10, abs=1e-13)


def test_cond_mi_null_is_seeded() -> None:
    token_ids, block_domains, experts = _probe(1, 20, 12, 30, 2, 4, 1)
    a = conditional_mi_null(token_ids, block_domains, experts, 2, 4, n_permutations=30, seed=7)
    b = conditional_mi_null(token_ids, block_domains, experts, 2, 4, n_permutations=30, seed=7)
    c = conditional_mi_null(token_ids, block_domains, experts, 2, 4, n_permutations=30, seed=8)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.all(a >= 0)
    assert conditional_mi_null(token_ids, block_domains, experts, 2, 4, 0).shape == (0,)
    with pytest.raises(ValueError):
        conditional_mi_null(token_ids, block_domains, experts, 2, 4, n_permutations=-1)


def test_domain_blind_routing_is_within_its_cond_mi_null_whose_mean_shows_the_bias() -> None:
    # Few occurrences per (id, expert): plug-in cond_mi far above its true value 0.
    n_blocks, length, n_dom, n_exp = 60, 32, 3, 16
    rng = np.random.default_rng(4)
    block_domains = np.arange(n_blocks) % n_dom
    token_ids = rng.integers(0, 150, (n_blocks, length))  # ~13 occurrences per id
    experts = rng.integers(0, n_exp, (n_blocks, length))
    out = score_layer(token_ids, block_domains, experts, n_dom, n_exp, n_permutations=200)
    assert out.cond_mi > 0.3  # the bias of the bare number
    assert out.cond_mi_null_mean > 0.3  # ... is the chance level
    assert out.cond_mi_null_mean <= out.cond_mi_null_p95
    assert out.cond_mi <= out.cond_mi_null_p95


def test_domain_dependent_routing_of_shared_tokens_is_far_above_its_cond_mi_null() -> None:
    n_blocks, length, n_dom, n_exp = 60, 32, 3, 16
    rng = np.random.default_rng(5)
    block_domains = np.arange(n_blocks) % n_dom
    token_ids = rng.integers(0, 150, (n_blocks, length))
    # 80% of tokens: an expert set by (token id, domain); the rest at random.
    own = (token_ids + 5 * block_domains[:, None]) % n_exp
    random_experts = rng.integers(0, n_exp, (n_blocks, length))
    experts = np.where(rng.random((n_blocks, length)) < 0.8, own, random_experts)
    out = score_layer(token_ids, block_domains, experts, n_dom, n_exp, n_permutations=200)
    assert out.cond_mi > out.cond_mi_null_p95 + 0.3
    assert out.cond_mi > 2 * out.cond_mi_null_p95


def test_cond_mi_null_degenerate_probes() -> None:
    # Two blocks of different domains: every permutation is the data or its domain swap, and
    # I(D;E|T) does not depend on the names of the domains.
    token_ids, _, experts = _probe(2, 2, 20, 6, 2, 3, 1)
    block_domains = np.array([0, 1])
    null = conditional_mi_null(token_ids, block_domains, experts, 2, 3, n_permutations=10)
    flat_domains = np.repeat(block_domains, 20)
    cond = token_identity_control(token_ids.ravel(), flat_domains, experts.ravel(), 2, 3).cond_mi
    assert cond > 0
    np.testing.assert_allclose(null, cond, rtol=1e-12)
    # No id in two blocks; one domain only: nothing can be shared.
    confined = np.arange(40).reshape(4, 10)
    null = conditional_mi_null(confined, [0, 1, 0, 1], confined % 3, 2, 3, n_permutations=5)
    assert np.array_equal(null, np.zeros(5))
    assert np.array_equal(conditional_mi_null(token_ids, [1, 1], experts, 2, 3, 5), np.zeros(5))
    empty = np.zeros((3, 0), dtype=np.int64)
    assert np.array_equal(conditional_mi_null(empty, [0, 1, 0], empty, 2, 3, 4), np.zeros(4))


@pytest.mark.parametrize(
    ("token_ids", "block_domains", "experts"),
    [
        (np.zeros((2, 3)), [0, 1], np.zeros((2, 3), dtype=int)),  # float token ids
        (np.zeros((2, 3), dtype=int), [0, 2], np.zeros((2, 3), dtype=int)),  # domain 2 of 2
        (np.zeros((2, 3), dtype=int), [0, 1, 1], np.zeros((2, 3), dtype=int)),  # P mismatch
        (np.zeros((2, 3), dtype=int), [0, 1], np.zeros((2, 4), dtype=int)),  # T mismatch
        (np.zeros((2, 3), dtype=int), [0, 1], np.full((2, 3), 3)),  # expert 3 of 3
    ],
)
def test_cond_mi_null_rejects_bad_input(token_ids, block_domains, experts) -> None:
    with pytest.raises(ValueError):
        conditional_mi_null(token_ids, np.array(block_domains), experts, 2, 3, 5)


# ----------------------------------------------------------------------------- one layer


def test_score_layer_combines_the_scores() -> None:
    rng = np.random.default_rng(2)
    n_blocks, length, n_dom, n_exp = 12, 8, 3, 4
    token_ids = rng.integers(0, 30, (n_blocks, length))
    block_domains = np.arange(n_blocks) % n_dom
    experts = rng.integers(0, n_exp, (n_blocks, length, 2))
    out = score_layer(token_ids, block_domains, experts, n_dom, n_exp, 30, 4, router_entropy=0.5)
    domains = np.repeat(block_domains, length)
    flat = experts.reshape(-1, 2)
    table = contingency(domains, flat, n_dom, n_exp)
    control = token_identity_control(token_ids.ravel(), domains, flat, n_dom, n_exp)
    null = permutation_null(_block_counts(experts, n_exp), block_domains, n_dom, 30, 4)
    assert out.nmi == nmi(table)
    assert (out.null_mean, out.null_p95) == null_summary(null)
    assert (out.cond_mi, out.token_id_nmi) == (control.cond_mi, control.token_id_nmi)
    cond_null = conditional_mi_null(token_ids, block_domains, experts, n_dom, n_exp, 30, 4)
    assert (out.cond_mi_null_mean, out.cond_mi_null_p95) == null_summary(cond_null)
    assert out.token_id_share == control.token_id_share
    assert out.usage_entropy == usage_entropy(table)
    assert out.router_entropy == 0.5
    assert math.isnan(score_layer(token_ids, block_domains, experts[..., 0], 3, 4).router_entropy)
    names = [f.name for f in fields(LayerScores)]
    assert names[names.index("cond_mi") + 1 : names.index("cond_mi") + 3] == [
        "cond_mi_null_mean",
        "cond_mi_null_p95",
    ]


# ----------------------------------------------------------------------------- table views


def test_collapsed_expert() -> None:
    assert collapsed_expert([[46, 1, 0], [49, 2, 2]]) == (0, pytest.approx(0.95))
    assert collapsed_expert([[0, 10], [0, 9]], threshold=0.99) == (1, 1.0)
    assert collapsed_expert([[5, 5], [5, 5]]) is None
    assert collapsed_expert([[9, 1]]) is None  # exactly 0.9 is not "more than"
    assert collapsed_expert(np.zeros((2, 3))) is None


def test_shares() -> None:
    out = shares([[1, 3], [0, 0], [2, 2]])
    assert out.dtype == np.float64
    assert np.array_equal(out, [[0.25, 0.75], [0.0, 0.0], [0.5, 0.5]])
