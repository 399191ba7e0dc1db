"""Calibration of the routing tests on the REAL probe layouts, with simulated routers of known
mechanism (numpy only).

Layouts (tests/analysis/fixtures/probe_layout_*.npz, written by benchmarks/probe_layouts.py):
the study's probe (``experiment=study_cpu``, the offline sample corpus) and a probe of the shared
hub mirror (``data/domains=code_math_prose``, 1 MB per domain, block 128), each size-matched as
``experiment=study_cpu`` scores it (study: 18 documents x 88 tokens per domain; hub: 19 x 179).
A simulated router (tests/helpers/layouts.py) sends each token to its domain's expert (d mod
4), its document's preferred expert, its id's fixed expert, or a uniform one (4 experts).

Counts: 400 simulated routers per (layout, mechanism) for every null case and 200 for every
power and known-limit case; 19 permutations per test, so a p-value is a multiple of 1/20 and
"p <= 0.05" is "above every permuted value": exactly 5% under an exact null; at 400 routers
an exact test falls outside [2.5%, 7.5%] by chance about 2% of the time (a case outside the
band is rerun with more routers before it is read as miscalibration). Mechanisms: ``noise``
(uniform), ``document`` (half of every document's tokens to
its own expert), ``token`` (half of the tokens to their id's expert), ``domain`` (20% of the
tokens to their domain's expert). For every test under its null: rejection in [2.5%, 7.5%] at
5% and median p in [0.4, 0.6]; power >= 80% for the 20% effect it tests; and for each control
the case where it must come out null: no token-id gain from a token-blind router (``domain``,
``document``), no held-out domain gain from document preference alone (``document``).

Known limits, asserted as documented (docs/method.md): the domain-beyond-token null turns
liberal under strong document preference, the cond_mi null conservative; the MI test on an
unmatched probe under document preference is conservative (why probes are size-matched).
"""

from __future__ import annotations

import functools
import zlib

import numpy as np
import pytest
from helpers.layouts import Layout, load_layout, simulate

from moe_emergence.analysis import heldout
from moe_emergence.analysis.scores import (
    _compact,
    _unit_counts,
    conditional_mi,
    conditional_mi_null,
    contingency,
    document_folds,
    mutual_information,
    permutation_null,
    permutation_p,
)

E = 4
NULL_ROUTERS, ROUTERS, PERMUTATIONS, ALPHA = 400, 200, 19, 0.05
MECHANISMS = {
    "noise": {},
    "document": {"document": 0.5},
    "token": {"token": 0.5},
    "domain": {"domain": 0.2},
}
LAYOUTS = ("study", "hub")


@functools.cache
def layout(name: str, matched: bool = True) -> Layout:
    return load_layout(name, matched)


def _p_mi(lay: Layout, ex: np.ndarray, seed: int) -> float:
    counts = _unit_counts(lay.docs, ex, lay.doc_domains.size, E)
    null = permutation_null(counts, lay.doc_domains, lay.n_domains, PERMUTATIONS, seed, "mi")
    observed = mutual_information(contingency(lay.token_domains, ex, lay.n_domains, E))
    return permutation_p(null, observed)


def _p_domain_gain(lay: Layout, ex: np.ndarray, seed: int) -> float:
    folds = document_folds(lay.doc_domains, lay.n_domains, seed)
    counts = _unit_counts(lay.docs, ex, lay.doc_domains.size, E)
    perms = heldout.fold_permutations(lay.doc_domains, folds, PERMUTATIONS, seed)
    gains = heldout.domain_gain_batch(
        counts, np.concatenate([lay.doc_domains[None], perms]), folds, lay.n_domains
    )
    return permutation_p(gains[1:], gains[0])


def _p_token_gain(lay: Layout, ex: np.ndarray, seed: int) -> float:
    folds = document_folds(lay.doc_domains, lay.n_domains, seed)
    t_idx, n_ids = _compact(lay.ids)
    shuffled = heldout.within_document_shuffles(lay.docs, ex, PERMUTATIONS, seed)
    gains = heldout.token_gain_batch(
        t_idx, n_ids, folds[lay.docs], np.concatenate([ex[None], shuffled]), E
    )
    return permutation_p(gains[1:], gains[0])


def _p_beyond_token(lay: Layout, ex: np.ndarray, seed: int) -> float:
    folds = document_folds(lay.doc_domains, lay.n_domains, seed)
    t_idx, n_ids = _compact(lay.ids)
    groups = heldout.TokenDomainGroups(t_idx, n_ids, lay.docs, lay.doc_domains, folds, ex, E)
    labels = np.concatenate([groups.label[None], groups.within_id_permutations(PERMUTATIONS, seed)])
    gains = groups.gain_batch(labels, lay.n_domains)
    return permutation_p(gains[1:], gains[0])


def _p_cond_mi(lay: Layout, ex: np.ndarray, seed: int) -> float:
    args = (lay.ids, lay.docs, lay.doc_domains, ex, lay.n_domains, E)
    return permutation_p(conditional_mi_null(*args, PERMUTATIONS, seed), conditional_mi(*args))


TESTS = {
    "mi": _p_mi,
    "domain_gain": _p_domain_gain,
    "token_gain": _p_token_gain,
    "beyond_token": _p_beyond_token,
    "cond_mi": _p_cond_mi,
}
# What each case must show: (test, mechanism) -> "null" or "power".
EXPECTED = {
    ("mi", "noise"): "null",
    ("mi", "document"): "null",
    ("mi", "domain"): "power",
    ("domain_gain", "noise"): "null",
    ("domain_gain", "document"): "null",  # a signal that does not replicate across documents
    ("domain_gain", "domain"): "power",
    ("token_gain", "noise"): "null",
    ("token_gain", "document"): "null",  # token-blind
    ("token_gain", "domain"): "null",  # token-blind, domain-specialised
    ("token_gain", "token"): "power",
    ("beyond_token", "noise"): "null",
    ("beyond_token", "token"): "null",  # token routing: nothing beyond the token
    ("beyond_token", "domain"): "power",
    ("cond_mi", "domain"): "power",
}


@functools.cache
def p_values(
    layout_name: str, mechanism: str, test: str, routers: int = ROUTERS, matched: bool = True
) -> np.ndarray:
    """[routers] p-values of ``test`` for routers of ``mechanism`` on the layout; each test
    its own seeded routers, so that the cases' outcomes are independent."""
    lay = layout(layout_name, matched)
    rng = np.random.default_rng(zlib.crc32(f"{layout_name}/{mechanism}/{test}".encode()))
    p = np.empty(routers)
    for i in range(routers):
        p[i] = TESTS[test](lay, simulate(lay, rng, E, **MECHANISMS[mechanism]), i)
    return p


@pytest.mark.parametrize("layout_name", LAYOUTS)
@pytest.mark.parametrize(("test", "mechanism"), [k for k, v in EXPECTED.items() if v == "null"])
def test_under_its_null_a_test_rejects_5_percent_with_median_p_a_half(
    layout_name: str, test: str, mechanism: str
) -> None:
    p = p_values(layout_name, mechanism, test, NULL_ROUTERS)
    assert 0.025 <= np.mean(p <= ALPHA) <= 0.075
    assert 0.4 <= np.median(p) <= 0.6


@pytest.mark.parametrize("layout_name", LAYOUTS)
@pytest.mark.parametrize(("test", "mechanism"), [k for k, v in EXPECTED.items() if v == "power"])
def test_a_20_percent_effect_is_detected_in_80_percent_of_probes(
    layout_name: str, test: str, mechanism: str
) -> None:
    assert np.mean(p_values(layout_name, mechanism, test) <= ALPHA) >= 0.8


# ----------------------------------------------------------------------------- documented limits


@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_known_limit_beyond_token_null_is_liberal_under_strong_document_preference(
    layout_name: str,
) -> None:
    # The within-id null exchanges an id's documents id by id, so it loses the correlation a
    # document's preference puts across its ids: 8.5% (study) and 16% (hub) at 5% when half of
    # every document's tokens go to its own expert; 4% and 7.5% at a fifth (docs/method.md).
    rate = np.mean(p_values(layout_name, "document", "beyond_token") <= ALPHA)
    assert 0.075 < rate <= 0.25


@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_known_limit_cond_mi_null_is_conservative_under_document_preference(
    layout_name: str,
) -> None:
    # Its null shuffles an id's documents id by id (the mirror of the limit above, on a
    # statistic whose plug-in bias the shuffle moves): under document preference it rejects
    # almost never; it is reported as an excess over its null mean, beside the held-out gains.
    p = p_values(layout_name, "document", "cond_mi")
    assert np.mean(p <= ALPHA) <= 0.025 and np.median(p) > 0.6


@pytest.mark.parametrize("layout_name", LAYOUTS)
def test_known_limit_cond_mi_is_not_calibrated_under_noise(layout_name: str) -> None:
    # Uniform routing: its p-values are not uniform (docs/method.md gives the figures); it is
    # bounded, not calibrated, and the calibrated test of the same question is beyond_token.
    assert np.mean(p_values(layout_name, "noise", "cond_mi") <= ALPHA) <= 0.10


def test_the_unmatched_hub_probe_is_why_probes_are_size_matched() -> None:
    # Unequal document sizes by domain (hub: 20, 97, 66 documents of 53-4,839 tokens): under
    # document preference the document-label permutation is not exact, even on I(D;E).
    p = p_values("hub", "document", "mi", matched=False)
    assert np.mean(p <= ALPHA) < 0.025
    assert np.median(p) > 0.6
