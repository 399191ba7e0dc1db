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
    held_out_gains,
    interval_is_approximate,
    mutual_information,
    nmi,
    null_summary,
    paired_change_interval,
    permutation_null,
    permutation_p,
    permutation_tables,
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
    assert special.mi == pytest.approx(special.nmi * _h(1 / 3, 1 / 3, 1 / 3), rel=1e-9)
    # The domain signal replicates on held-out documents; a domain router is token-blind.
    assert special.domain_gain > 0.3 > special.domain_gain_null_p95
    assert special.domain_gain_p == pytest.approx(1 / 201)
    assert special.domain_beyond_token_gain_p < 0.05
    assert special.token_gain_p > 0.05
    assert special.token_id_nmi < 0.1 * special.nmi  # a shared vocabulary: no token proxy
    assert chance.domain_gain_p > 0.05 and chance.domain_gain < chance.domain_gain_null_p95
    assert chance.token_gain_ref_domain < chance.token_gain_ref_token


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
    mi = permutation_null(counts, block_domains, 3, n_permutations=50, seed=7, statistic="mi")
    tables = permutation_tables(counts, block_domains, 3, n_permutations=50, seed=7)
    assert mi == pytest.approx([mutual_information(t) for t in tables], abs=1e-12)
    with pytest.raises(ValueError):
        permutation_null(counts, block_domains, 3, 5, statistic="nmi_excess")


def test_the_nmi_test_reads_mi_which_permutation_does_not_rescale() -> None:
    # Documents of unequal size by domain: permuting labels moves H(D) and so the NMI, not the
    # MI's scale; the p-value of score_layer is the MI's.
    rng = np.random.default_rng(4)
    sizes = np.array([200] * 4 + [20] * 20 + [60] * 6)
    doc_domains = np.repeat([0, 1, 2], [4, 20, 6])
    docs = np.repeat(np.arange(sizes.size), sizes)
    experts = rng.integers(0, 4, docs.size)
    out = score_layer(docs * 0, docs, doc_domains, experts, 3, 4, n_permutations=99, seed=2)
    counts = np.zeros((sizes.size, 4))
    np.add.at(counts, (docs, experts), 1)
    mi_null = permutation_null(counts, doc_domains, 3, 99, 2, statistic="mi")
    nmi_null = permutation_null(counts, doc_domains, 3, 99, 2)
    assert out.null_p == permutation_p(mi_null, out.mi)
    assert (out.null_mean, out.null_p95) == null_summary(nmi_null)


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
    assert out.cond_mi_excess > 0.3
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
    token = np.zeros((2, 2))
    for fit in (0, 1):
        f = folds[doc] == fit
        marginal = np.bincount(ex[f], minlength=2) / f.sum()
        for i in np.flatnonzero(~f):
            d = doc_domains[doc[i]]
            same_id = f & (tok == tok[i])
            by_id = np.bincount(ex[same_id], minlength=2) / max(same_id.sum(), 1)
            token[d] += by_id if same_id.any() else marginal
    np.testing.assert_allclose(out.token_id_table, token, atol=1e-12)
    assert out.token_id_nmi == pytest.approx(nmi(token), abs=1e-12)


def _slow_studentised(doc_counts_list, doc_domains, n_dom, weights, statistic, confidence=0.95):
    """Bootstrap-t by hand: each resample's documents listed with repeats, its jackknife SE by
    leaving out one listed document at a time."""

    def stat(docs) -> float:
        values = []
        for counts in doc_counts_list:
            table = np.zeros((n_dom, counts.shape[1]))
            for u in docs:
                table[doc_domains[u]] += counts[u]
            values.append(nmi(table))
        return statistic(values)

    def jack_se(docs) -> float:
        loo = np.array([stat(docs[:i] + docs[i + 1 :]) for i in range(len(docs))])
        n = len(docs)
        return math.sqrt((n - 1) / n * ((loo - loo.mean()) ** 2).sum())

    everyone = list(range(len(doc_domains)))
    theta, se = stat(everyone), jack_se(everyone)
    t = []
    for w in weights:
        docs = [u for u in everyone for _ in range(int(w[u]))]
        t.append((stat(docs) - theta) / jack_se(docs))
    q_low, q_high = np.percentile(t, [100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2])
    return theta - q_high * se, theta - q_low * se


def test_document_bootstrap_is_the_studentised_interval_over_documents() -> None:
    tok, doc, doc_domains, ex = _doc_probe(8, n=600, n_docs=9)
    ex = np.where(doc_domains[doc] == 0, 0, ex)  # domain 0 to expert 0
    low, high = document_bootstrap(tok, doc, doc_domains, ex, 3, 5, n_draws=40, seed=3)
    assert (low, high) == document_bootstrap(tok, doc, doc_domains, ex, 3, 5, 40, 3)
    observed = nmi(contingency(doc_domains[doc], ex, 3, 5))
    assert low < observed < high
    counts = np.zeros((9, 5))
    np.add.at(counts, (doc, ex), 1)
    weights = scores._bootstrap_weights(doc_domains, 3, 40, 3)
    expected = _slow_studentised([counts], doc_domains, 3, weights, lambda v: v[0])
    assert (low, high) == pytest.approx(expected, abs=1e-10)
    assert all(math.isnan(x) for x in document_bootstrap(tok, doc, doc_domains, ex, 3, 5, 0))


def test_bootstrap_resamples_documents_within_each_domain() -> None:
    doc_domains = np.array([0] * 5 + [1] * 3 + [2] * 2)
    weights = scores._bootstrap_weights(doc_domains, 3, 50, 1)
    per_domain = np.stack([weights[:, doc_domains == d].sum(axis=1) for d in range(3)], axis=1)
    assert np.array_equal(per_domain, np.broadcast_to([5, 3, 2], (50, 3)))
    assert np.unique(weights[:, 0]).size > 1


def test_paired_change_interval_resamples_the_same_documents_for_both() -> None:
    tok, doc, doc_domains, before = _doc_probe(9, n=600, n_docs=9)
    specialised = np.where(doc_domains[doc] == 0, 0, before)
    # No change: every resample's change is 0.
    assert paired_change_interval(tok, doc, doc_domains, before, before, 3, 5, 30, 1) == (0, 0)
    low, high = paired_change_interval(tok, doc, doc_domains, before, specialised, 3, 5, 30, 1)
    counts = []
    for ex in (before, specialised):
        c = np.zeros((9, 5))
        np.add.at(c, (doc, ex), 1)
        counts.append(c)
    weights = scores._bootstrap_weights(doc_domains, 3, 30, 1)
    expected = _slow_studentised(counts, doc_domains, 3, weights, lambda v: v[1] - v[0])
    assert (low, high) == pytest.approx(expected, abs=1e-10)
    change = nmi(contingency(doc_domains[doc], specialised, 3, 5)) - nmi(
        contingency(doc_domains[doc], before, 3, 5)
    )
    assert 0 < low < change < high
    # A mask scores the kept tokens only: the same as the probe cut down to them.
    keep = np.arange(doc.size) % 3 != 0
    masked = paired_change_interval(
        tok, doc, doc_domains, before, specialised, 3, 5, 30, 1, mask=keep
    )
    cut = paired_change_interval(
        tok[keep], doc[keep], doc_domains, before[keep], specialised[keep], 3, 5, 30, 1
    )
    assert masked == cut


def test_interval_is_approximate_unless_size_matched_with_enough_documents() -> None:
    n = scores.INTERVAL_MIN_DOCUMENTS
    matched = np.repeat([0, 1, 2], n)
    assert interval_is_approximate(matched, np.full(3 * n, 88), 3) is False
    assert interval_is_approximate(matched, np.arange(3 * n), 3) is True  # unequal sizes
    fewer = np.repeat([0, 1, 2], [n, n - 1, n])
    assert interval_is_approximate(fewer, np.full(3 * n - 1, 88), 3) is True
    small = np.repeat([0, 1, 2], n - 1)
    assert interval_is_approximate(small, np.full(3 * n - 3, 88), 3) is True


# ----------------------------------------------------------------------------- held-out gains


def _slow_gains(tok, doc, doc_domains, ex, n_dom, n_exp, folds, smoothing):
    """The three held-out gains by hand, token by token."""
    dom = doc_domains[doc]
    fold = folds[doc]
    total = {"domain": 0.0, "token": 0.0, "beyond": 0.0}
    for i in range(tok.size):
        fit = fold != fold[i]

        def dist(mask, prior):
            counts = np.bincount(ex[mask], minlength=n_exp).astype(float)
            return (counts + smoothing * prior) / (counts.sum() + smoothing)

        counts = np.bincount(ex[fit], minlength=n_exp)
        q = (counts + 0.5) / (counts.sum() + n_exp / 2)
        q_d = dist(fit & (dom == dom[i]), q)
        q_t = dist(fit & (tok == tok[i]), q)
        q_td = dist(fit & (tok == tok[i]) & (dom == dom[i]), q_t)
        e = ex[i]
        total["domain"] += math.log(q_d[e] / q[e])
        total["token"] += math.log(q_t[e] / q[e])
        total["beyond"] += math.log(q_td[e] / q_t[e])
    return {k: v / tok.size for k, v in total.items()}


@pytest.mark.parametrize("seed", [0, 1])
def test_held_out_gains_match_the_direct_reference(seed: int) -> None:
    from moe_emergence.analysis import heldout

    tok, doc, doc_domains, ex = _doc_probe(seed, n=300, n_ids=12)
    ex = np.where((doc_domains[doc] == 1) & (tok % 2 == 0), 2, ex)  # some domain x id signal
    out = held_out_gains(tok, doc, doc_domains, ex, 3, 5, n_permutations=7, seed=seed)
    folds = document_folds(doc_domains, 3, seed)
    expected = _slow_gains(tok, doc, doc_domains, ex, 3, 5, folds, heldout.SMOOTHING)
    assert out.domain == pytest.approx(expected["domain"], abs=1e-12)
    assert out.token == pytest.approx(expected["token"], abs=1e-12)
    assert out.domain_beyond_token == pytest.approx(expected["beyond"], abs=1e-12)
    assert out.domain_null.shape == out.token_null.shape == (7,)
    assert out.domain_beyond_token_null.shape == (7,)
    # The references: a domain router and a token router on the same tokens.
    by_domain = _slow_gains(tok, doc, doc_domains, doc_domains[doc] % 5, 3, 5, folds, 16.0)
    assert out.token_ref_domain == pytest.approx(by_domain["token"], abs=1e-12)
    assert out.token_ref_token > 0.5


def test_gain_nulls_keep_what_each_null_must_keep() -> None:
    from moe_emergence.analysis import heldout

    tok, doc, doc_domains, ex = _doc_probe(3, n=400)
    folds = document_folds(doc_domains, 3, 0)
    labels = heldout.fold_permutations(doc_domains, folds, 20, 1)
    for row in labels:  # each half keeps its documents per domain
        for f in (0, 1):
            assert sorted(row[folds == f]) == sorted(doc_domains[folds == f])
    assert np.unique(labels, axis=0).shape[0] > 1
    shuffled = heldout.within_document_shuffles(doc, ex, 20, 1)
    for row in shuffled:  # each document keeps its expert counts
        for u in range(doc_domains.size):
            assert sorted(row[doc == u]) == sorted(ex[doc == u])
    assert not np.array_equal(shuffled[0], ex)
    # Documents of equal size (a size-matched probe) take the in-place path: the same guarantee.
    equal_docs = np.repeat(np.arange(8), 25)[np.random.default_rng(2).permutation(200)]
    equal_ex = np.random.default_rng(3).integers(0, 5, 200)
    for row in heldout.within_document_shuffles(equal_docs, equal_ex, 20, 1):
        for u in range(8):
            assert sorted(row[equal_docs == u]) == sorted(equal_ex[equal_docs == u])
    assert (
        np.unique(heldout.within_document_shuffles(equal_docs, equal_ex, 20, 1), axis=0).shape[0]
        == 20
    )
    t_idx, n_ids = scores._compact(tok)
    groups = heldout.TokenDomainGroups(t_idx, n_ids, doc, doc_domains, folds, ex, 5)
    size_class = np.floor(np.log2(groups.size))
    for row in groups.within_id_permutations(20, 1):  # each (id, half, size class) keeps its
        for key in set(zip(groups.t, groups.fold, size_class, strict=True)):
            mine = (groups.t == key[0]) & (groups.fold == key[1]) & (size_class == key[2])
            assert sorted(row[mine]) == sorted(groups.label[mine])


def test_id_confined_to_a_domain_is_never_read_as_domain_beyond_the_token() -> None:
    # Every id in one domain only, each id routed by its own expert: the domain beyond the
    # token has nothing to add, and the within-id null cannot move a confined id's label.
    tok, doc, doc_domains, _ = _doc_probe(4, n=600)
    confined = tok + 1000 * doc_domains[doc]
    ex = confined % 5
    out = held_out_gains(confined, doc, doc_domains, ex, 3, 5, n_permutations=9, seed=0)
    assert np.all(out.domain_beyond_token_null == out.domain_beyond_token)
    assert out.token > 0.5


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
    assert out.mi == mutual_information(table)
    assert (out.null_mean, out.null_p95) == null_summary(null)
    mi_null = permutation_null(counts, doc_domains, n_dom, 30, 4, statistic="mi")
    assert out.null_p == permutation_p(mi_null, out.mi)
    gains = held_out_gains(token_ids, docs, doc_domains, first, n_dom, n_exp, 30, 4)
    for name, observed, gain_null in (
        ("domain_gain", gains.domain, gains.domain_null),
        ("token_gain", gains.token, gains.token_null),
        ("domain_beyond_token_gain", gains.domain_beyond_token, gains.domain_beyond_token_null),
    ):
        assert getattr(out, name) == observed
        mean, p95 = null_summary(gain_null)
        assert (getattr(out, f"{name}_null_mean"), getattr(out, f"{name}_null_p95")) == (mean, p95)
        assert getattr(out, f"{name}_p") == permutation_p(gain_null, observed)
    assert (out.token_gain_ref_domain, out.token_gain_ref_token) == (
        gains.token_ref_domain,
        gains.token_ref_token,
    )
    cond = conditional_mi(token_ids, docs, doc_domains, first, n_dom, n_exp)
    cond_null = conditional_mi_null(token_ids, docs, doc_domains, first, n_dom, n_exp, 30, 4)
    assert out.cond_mi_excess == pytest.approx(cond - cond_null.mean(), abs=1e-15)
    assert out.cond_mi_null_p == permutation_p(cond_null, cond)
    routers = cross_fitted_routers(token_ids, docs, doc_domains, first, n_dom, n_exp, 4)
    assert out.token_id_nmi == routers.token_id_nmi
    boot = document_bootstrap(token_ids, docs, doc_domains, first, n_dom, n_exp, 30, 4)
    assert (out.nmi_low, out.nmi_high) == boot
    assert out.nmi_interval_approximate is True  # 2 documents per domain
    assert out.usage_entropy == usage_entropy(table)
    assert out.router_entropy == 0.5
    assert (out.n_documents, out.n_tokens) == (6, n_blocks * length)
    assert math.isnan(score_layer(token_ids, docs, doc_domains, first, 3, 4, 30).router_entropy)
    names = {f.name for f in fields(LayerScores)}
    assert not names & {"token_id_share", "domain_only_nmi", "cond_mi", "cond_mi_null_p95"}


def test_a_mask_scores_the_kept_tokens_and_documents_only() -> None:
    rng = np.random.default_rng(3)
    token_ids = rng.integers(0, 30, (8, 10))
    docs = np.repeat(np.arange(8), 10).reshape(8, 10)
    doc_domains = np.arange(8) % 2
    experts = rng.integers(0, 3, (8, 10))
    mask = np.zeros((8, 10), dtype=bool)
    mask[:, :6] = True
    mask[5] = False  # document 5 drops out
    out = score_layer(token_ids, docs, doc_domains, experts, 2, 3, 20, 1, mask=mask)
    kept = [u for u in range(8) if u != 5]
    cut = score_layer(
        token_ids[kept, :6],
        np.repeat(np.arange(7), 6).reshape(7, 6),
        doc_domains[kept],
        experts[kept, :6],
        2,
        3,
        20,
        1,
    )
    assert out == cut
    assert (out.n_documents, out.n_tokens) == (7, 42)
    with pytest.raises(ValueError):
        score_layer(token_ids, docs, doc_domains, experts, 2, 3, 20, 1, mask=mask[:, :5])


def test_layer_scores_read_back_from_a_trajectory_row() -> None:
    from moe_emergence.analysis.tables import TRAJECTORY, read_table, routing_rows, write_table

    tok, doc, doc_domains, ex = _doc_probe(2)
    out = score_layer(tok, doc, doc_domains, ex, 3, 5, 9, router_entropy=0.5)
    _, rows = routing_rows(5, "held_out", ("a", "b", "c"), {1: np.zeros((3, 5))}, {1: out})
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trajectory.csv"
        write_table(path, TRAJECTORY, rows)
        (row,) = read_table(path)
    back = LayerScores.from_row(row)
    assert back == out
    assert isinstance(back.nmi_interval_approximate, bool)
    assert isinstance(back.n_tokens, int)


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


@pytest.mark.parametrize("equal_documents", [False, True])
def test_nulls_drawn_in_batches_score_what_one_array_scores(monkeypatch, equal_documents) -> None:
    # The two [K, N] nulls are drawn and scored a batch at a time (memory O(k N)): whatever
    # the batch size, every score is bit-equal to drawing all K rows at once, and the progress
    # hook hears of every draw.
    from moe_emergence.analysis import heldout

    tok, doc, doc_domains, ex = _doc_probe(5, n_docs=12, n=360)
    if equal_documents:
        doc = np.repeat(np.arange(12), 30)[np.random.default_rng(4).permutation(360)]
        doc_domains = np.arange(12) % 3
    token_ids, token_docs, first = tok[None, :], doc[None, :], ex[None, :]
    whole = scores.score_layer(token_ids, token_docs, doc_domains, first, 3, 5, 40, seed=2)
    rows = heldout.within_document_shuffles(doc, ex, 40, 2)
    heard = []
    monkeypatch.setattr(heldout, "CELLS_PER_BATCH", 3 * doc.size)  # 3 rows a batch
    batches = list(heldout.within_document_shuffle_batches(doc, ex, 40, 2))
    assert [b.shape[0] for b in batches] == [3] * 13 + [1]
    np.testing.assert_array_equal(np.concatenate(batches), rows)
    batched = scores.score_layer(
        token_ids, token_docs, doc_domains, first, 3, 5, 40, seed=2, advance=heard.append
    )
    for f in fields(whole):
        a, b = getattr(whole, f.name), getattr(batched, f.name)
        assert a == b or (math.isnan(a) and math.isnan(b)), f.name
    assert sum(heard) == 2 * 40
