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
    conditional_mi,
    conditional_mi_null,
    contingency,
    cross_fitted_routers,
    document_bootstrap,
    document_folds,
    entropy,
    mutual_information,
    nmi,
    null_summary,
    permutation_null,
    permutation_p,
    score_layer,
    shares,
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


def test_random_routing_is_within_null_and_specialised_routing_far_above() -> None:
    n_blocks, length, n_dom, n_exp = 60, 64, 3, 4
    rng = np.random.default_rng(3)
    block_domains = np.arange(n_blocks) % n_dom
    docs = np.repeat(np.arange(n_blocks), length).reshape(n_blocks, length)  # a text per block
    token_ids = rng.integers(0, 100, (n_blocks, length))
    random_experts = rng.integers(0, n_exp, (n_blocks, length))
    chance = score_layer(
        token_ids, docs, block_domains, random_experts, n_dom, n_exp, n_permutations=200
    )
    assert 0 < chance.null_mean < 0.05
    assert chance.null_mean <= chance.null_p95
    assert chance.nmi <= chance.null_p95
    assert chance.null_p > 0.05
    assert chance.nmi_low <= chance.nmi <= chance.nmi_high
    assert chance.n_documents == n_blocks

    # Specialised: 80% of tokens go to their domain's expert, the rest at random.
    own = np.broadcast_to(block_domains[:, None], (n_blocks, length))
    special_experts = np.where(rng.random((n_blocks, length)) < 0.8, own, random_experts)
    special = score_layer(
        token_ids, docs, block_domains, special_experts, n_dom, n_exp, n_permutations=200
    )
    assert special.nmi > 0.3
    assert special.nmi > 5 * special.null_p95
    assert special.null_p == pytest.approx(1 / 201)
    assert special.nmi_low > special.null_p95
    assert special.domain_only_nmi == pytest.approx(special.nmi, rel=0.1)
    assert special.token_id_nmi < 0.1 * special.nmi  # a shared vocabulary: no token proxy


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
    counts = rng.multinomial(length, [0.1, 0.2, 0.3, 0.4], size=12)  # every unit: 16 tokens
    unit_domains = np.array([0] * 6 + [1] * 4 + [2] * 2)
    original = np.stack([counts[unit_domains == d].sum(axis=0) for d in range(3)])
    labels = scores._permutation_labels(unit_domains, 25, 5)
    tables = scores._labelled_tables(counts.astype(float), labels, 3)
    assert tables.shape == (25, 3, n_exp)
    assert np.array_equal(tables.sum(axis=1), np.broadcast_to(original.sum(axis=0), (25, n_exp)))
    assert np.array_equal(tables.sum(axis=2), np.broadcast_to(original.sum(axis=1), (25, 3)))

    draws = np.random.default_rng(5)
    null = permutation_null(counts, unit_domains, 3, n_permutations=25, seed=5)
    for i in range(25):
        perm = draws.permutation(unit_domains)
        expected = np.stack([counts[perm == d].sum(axis=0) for d in range(3)])
        assert np.array_equal(tables[i], expected)
        assert null[i] == pytest.approx(nmi(expected), abs=1e-12)


def test_permutation_p() -> None:
    null = np.array([0.1, 0.2, 0.3, 0.4])
    assert permutation_p(null, 0.35) == pytest.approx(2 / 5)
    assert permutation_p(null, 0.5) == pytest.approx(1 / 5)
    assert permutation_p(null, 0.3) == pytest.approx(3 / 5)  # a tie counts against it
    assert permutation_p(null, 0.0) == 1.0
    assert math.isnan(permutation_p([], 0.1))


def test_null_summary() -> None:
    null = np.arange(101, dtype=float) / 100
    mean, p95 = null_summary(null)
    assert mean == pytest.approx(0.5)
    assert p95 == pytest.approx(0.95)
    assert all(math.isnan(x) for x in null_summary(np.array([])))


# ----------------------------------------------------------------------------- cond_mi


def _slow_cond_mi(tok, dom, ex, n_dom, n_exp) -> float:
    """Direct reference: sum over ids seen in >= 2 domains of p(t) I(D;E | T=t)."""
    tok, dom, ex = (np.asarray(x).ravel() for x in (tok, dom, ex))
    shared = [t for t in np.unique(tok) if np.unique(dom[tok == t]).size >= 2]
    total = sum(int((tok == t).sum()) for t in shared)
    out = 0.0
    for t in shared:
        m = tok == t
        out += m.sum() / total * mutual_information(contingency(dom[m], ex[m], n_dom, n_exp))
    return out


def _doc_probe(seed: int, n_docs: int = 18, n: int = 400, n_ids: int = 25, n_exp: int = 5):
    rng = np.random.default_rng(seed)
    tok = rng.integers(0, n_ids, n) * 13 + 7  # sparse ids
    doc = np.sort(rng.integers(0, n_docs, n))
    doc_domains = np.arange(n_docs) % 3
    ex = rng.integers(0, n_exp, n)
    return tok, doc, doc_domains, ex


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cond_mi_matches_the_direct_reference(seed: int) -> None:
    tok, doc, doc_domains, ex = _doc_probe(seed)
    expected = _slow_cond_mi(tok, doc_domains[doc], ex, 3, 5)
    assert conditional_mi(tok, doc, doc_domains, ex, 3, 5) == pytest.approx(expected, abs=1e-12)
    assert expected > 0


def test_cond_mi_of_domain_confined_or_token_determined_routing_is_zero() -> None:
    tok, doc, doc_domains, _ = _doc_probe(3)
    assert conditional_mi(tok, doc, doc_domains, tok % 5, 3, 5) == 0.0
    confined = tok + 1000 * doc_domains[doc]  # no id in two domains
    assert conditional_mi(confined, doc, doc_domains, tok % 5, 3, 5) == 0.0
    assert np.array_equal(
        conditional_mi_null(confined, doc, doc_domains, tok % 5, 3, 5, 4), np.zeros(4)
    )


def test_cond_mi_null_permutes_domains_among_each_ids_documents() -> None:
    tok, doc, doc_domains, ex = _doc_probe(4)
    dom = doc_domains[doc]
    groups = scores._SharedGroups.of(tok, doc, doc_domains, ex, 3, 5)
    null = conditional_mi_null(tok, doc, doc_domains, ex, 3, 5, n_permutations=20, seed=9)
    draws = list(scores._within_id_permutations(groups, 20, 9))
    assert len(draws) == 20 and np.unique(null).size > 1
    shared = sorted({t for t in np.unique(tok) if np.unique(dom[tok == t]).size >= 2})
    for labels, value in zip(draws, null, strict=True):
        for t in range(groups.n_ids):  # each id keeps its documents' multiset of domains
            mine = groups.t == t
            assert sorted(labels[mine]) == sorted(groups.label[mine])
        # The relabelled probe: every (id, document) group's tokens get the group's new label.
        keys = zip(groups.t.tolist(), groups.doc.tolist(), strict=True)
        relabel = dict(zip(keys, labels.tolist(), strict=True))
        t_of = {v: i for i, v in enumerate(shared)}
        new_dom = np.array(
            [relabel.get((t_of.get(t, -1), u), d) for t, u, d in zip(tok, doc, dom, strict=True)]
        )
        assert value == pytest.approx(_slow_cond_mi(tok, new_dom, ex, 3, 5), abs=1e-12)


def test_cond_mi_null_is_seeded_and_checks_its_input() -> None:
    tok, doc, doc_domains, ex = _doc_probe(5)
    a = conditional_mi_null(tok, doc, doc_domains, ex, 3, 5, n_permutations=30, seed=7)
    b = conditional_mi_null(tok, doc, doc_domains, ex, 3, 5, n_permutations=30, seed=7)
    c = conditional_mi_null(tok, doc, doc_domains, ex, 3, 5, n_permutations=30, seed=8)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.all(a >= 0)
    assert conditional_mi_null(tok, doc, doc_domains, ex, 3, 5, 0).shape == (0,)
    with pytest.raises(ValueError):
        conditional_mi_null(tok, doc, doc_domains, ex, 3, 5, n_permutations=-1)
    with pytest.raises(ValueError):  # a document past doc_domains
        conditional_mi_null(tok, doc + 100, doc_domains, ex, 3, 5, 5)
    with pytest.raises(ValueError):  # expert 5 of 5
        conditional_mi_null(tok, doc, doc_domains, ex + 1, 3, 5, 5)
    with pytest.raises(ValueError):  # float ids
        conditional_mi_null(tok.astype(float), doc, doc_domains, ex, 3, 5, 5)


def test_domain_dependent_routing_of_shared_tokens_is_far_above_its_cond_mi_null() -> None:
    rng = np.random.default_rng(5)
    tok, doc, doc_domains, _ = _doc_probe(6, n_docs=30, n=3000, n_ids=60, n_exp=8)
    dom = doc_domains[doc]
    own = (tok + 3 * dom) % 8  # an expert set by (token id, domain)
    ex = np.where(rng.random(tok.size) < 0.8, own, rng.integers(0, 8, tok.size))
    out = score_layer(tok, doc, doc_domains, ex, 3, 8, n_permutations=200)
    assert out.cond_mi > out.cond_mi_null_p95 + 0.3
    assert out.cond_mi_null_p == pytest.approx(1 / 201)


# ----------------------------------------------------------------------------- controls


def test_document_folds_are_seeded_halves_of_every_domain() -> None:
    doc_domains = np.array([0] * 7 + [1] * 4 + [2] * 1)
    folds = document_folds(doc_domains, 3, seed=2)
    assert np.array_equal(folds, document_folds(doc_domains, 3, seed=2))
    assert [int((folds[doc_domains == d] == 0).sum()) for d in range(3)] == [4, 2, 1]
    assert any(not np.array_equal(folds, document_folds(doc_domains, 3, s)) for s in range(5))


def test_cross_fitted_routers_by_hand() -> None:
    # 4 documents, 2 domains; the folds put one document of each domain on each side.
    doc_domains = np.array([0, 0, 1, 1])
    folds = document_folds(doc_domains, 2, seed=0)
    tok = np.array([5, 5, 6, 5, 5, 7, 5, 9])
    doc = np.array([0, 0, 0, 1, 1, 2, 2, 3])
    ex = np.array([0, 0, 1, 0, 1, 1, 0, 1])
    out = cross_fitted_routers(tok, doc, doc_domains, ex, 2, 2, seed=0)
    token, domain = np.zeros((2, 2)), np.zeros((2, 2))
    for fit in (0, 1):
        f = folds[doc] == fit
        marginal = np.bincount(ex[f], minlength=2) / f.sum()
        for i in np.flatnonzero(~f):
            d = doc_domains[doc[i]]
            same_id = f & (tok == tok[i])
            by_id = np.bincount(ex[same_id], minlength=2) / max(same_id.sum(), 1)
            token[d] += by_id if same_id.any() else marginal
            same_dom = f & (doc_domains[doc] == d)
            domain[d] += np.bincount(ex[same_dom], minlength=2) / same_dom.sum()
    np.testing.assert_allclose(out.token_id_table, token, atol=1e-12)
    np.testing.assert_allclose(out.domain_only_table, domain, atol=1e-12)
    assert out.token_id_nmi == pytest.approx(nmi(token), abs=1e-12)
    assert out.domain_only_nmi == pytest.approx(nmi(domain), abs=1e-12)


def test_document_bootstrap_is_the_basic_interval_over_documents() -> None:
    tok, doc, doc_domains, ex = _doc_probe(8, n=2000)
    ex = np.where(doc_domains[doc] == 0, 0, ex)  # domain 0 to expert 0
    low, high = document_bootstrap(tok, doc, doc_domains, ex, 3, 5, n_draws=100, seed=3)
    assert (low, high) == document_bootstrap(tok, doc, doc_domains, ex, 3, 5, 100, 3)
    observed = nmi(contingency(doc_domains[doc], ex, 3, 5))
    assert low < observed < high
    # Basic interval: 2 * observed minus the percentiles of the resampled NMIs.
    weights = scores._bootstrap_weights(doc_domains, 3, 100, 3)
    counts = np.zeros((18, 5))
    np.add.at(counts, (doc, ex), 1)
    resampled = [
        nmi(np.stack([(w * (doc_domains == d)) @ counts for d in range(3)])) for w in weights
    ]
    q_low, q_high = np.percentile(resampled, [2.5, 97.5])
    assert (low, high) == pytest.approx((2 * observed - q_high, 2 * observed - q_low))


# ----------------------------------------------------------------------------- one layer


def test_score_layer_combines_the_scores_on_the_first_choice() -> None:
    rng = np.random.default_rng(2)
    n_blocks, length, n_dom, n_exp = 12, 8, 3, 4
    token_ids = rng.integers(0, 30, (n_blocks, length))
    docs = np.repeat(np.arange(n_blocks) // 2, length).reshape(n_blocks, length)
    doc_domains = np.arange(6) % n_dom
    experts = rng.integers(0, n_exp, (n_blocks, length, 2))
    out = score_layer(
        token_ids, docs, doc_domains, experts, n_dom, n_exp, 30, 4, router_entropy=0.5
    )
    first = experts[..., 0]
    assert out == score_layer(token_ids, docs, doc_domains, first, n_dom, n_exp, 30, 4, 0.5)
    table = contingency(doc_domains[docs.ravel()], first.ravel(), n_dom, n_exp)
    counts = np.zeros((6, n_exp))
    np.add.at(counts, (docs.ravel(), first.ravel()), 1)
    null = permutation_null(counts, doc_domains, n_dom, 30, 4)
    assert out.nmi == nmi(table)
    assert (out.null_mean, out.null_p95) == null_summary(null)
    assert out.null_p == permutation_p(null, out.nmi)
    assert out.cond_mi == conditional_mi(token_ids, docs, doc_domains, first, n_dom, n_exp)
    cond_null = conditional_mi_null(token_ids, docs, doc_domains, first, n_dom, n_exp, 30, 4)
    assert (out.cond_mi_null_mean, out.cond_mi_null_p95) == null_summary(cond_null)
    routers = cross_fitted_routers(token_ids, docs, doc_domains, first, n_dom, n_exp, 4)
    assert (out.token_id_nmi, out.domain_only_nmi) == (
        routers.token_id_nmi,
        routers.domain_only_nmi,
    )
    boot = document_bootstrap(token_ids, docs, doc_domains, first, n_dom, n_exp, 30, 4)
    assert (out.nmi_low, out.nmi_high) == boot
    assert out.usage_entropy == usage_entropy(table)
    assert out.router_entropy == 0.5
    assert out.n_documents == 6
    assert math.isnan(score_layer(token_ids, docs, doc_domains, first, 3, 4, 30).router_entropy)
    assert "token_id_share" not in {f.name for f in fields(LayerScores)}


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
