"""Scores of how much MoE routing depends on the data domain (numpy only, all in nats).

The unit of replication inside a run is the DOCUMENT (a probe text): the tokens of one text,
and the blocks cut from it, are not independent, so every null permutes and every interval
resamples documents, and every control fitted on the probe is cross-fitted on held-out
documents. For top-k > 1 every score reads the first choice (slot 0), so NMIs share one scale.
A ``mask`` (a size-matched probe, :func:`moe_emergence.analysis.probe.size_matched`) restricts
every score to the scored tokens and the documents that keep some.

- ``nmi = I(D;E) / H(D)`` of the domain x expert table: the effect size, 0 when routing ignores
  the domain, 1 when the chosen expert determines it. Its test permutes the domain labels
  across documents (:func:`permutation_tables`) with I(D;E) as the statistic: a permutation
  moves H(D) when documents differ in size by domain, never I(D;E)'s scale; the NMI of the
  same permutations gives the chance levels on the NMI's scale.
- Held-out gains (:mod:`moe_emergence.analysis.heldout`, :func:`held_out_gains`): log-loss
  gains of predicting a held-out document's experts from its domain, from the token id, and
  from the domain beyond the token id, each with its document-level null.
- ``cond_mi = I(D;E | T)``, plug-in, over the token ids seen in >= 2 domains, reported as its
  excess over its null mean (:func:`conditional_mi_null`: labels permuted among the (id,
  document) groups of each shared id); its null is conservative under document preference.
- The cross-fitted token-id router (:func:`cross_fitted_routers`): each id sent by its expert
  distribution on the other half of the documents; its NMI stands beside the NMI.
- The probe interval of the NMI (:func:`document_bootstrap`) and of one run's change between
  two checkpoints (:func:`paired_change_interval`): studentised bootstraps over documents,
  resampled within each domain.

Shapes: D domains, E experts, k experts per token, N tokens, U documents. ``0 * log 0 = 0``;
float64 throughout.

This module holds the functions on a probe's arrays (each checks them once into a
:class:`~moe_emergence.analysis.score_probe.ProbeArrays` and hands that on),
:class:`LayerScores` and :func:`score_layer`, and re-exports the pieces, one job to a module:
``score_tables`` (input checks, tables, entropies), ``score_probe`` (the checked probe, the
document halves), ``score_nulls`` (permutation nulls), ``score_shared`` (cond_mi),
``score_gains`` (cross-fitted router, held-out gains), ``score_intervals`` (probe intervals).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

# ``x as x``: re-exported private names that tests and benchmarks reach for here.
from moe_emergence.analysis.score_gains import (
    Advance,
    CrossFitted,
    HeldOutGains,
    _gains,
    _token_router,
)
from moe_emergence.analysis.score_intervals import (
    INTERVAL_MIN_DOCUMENTS,
    _change_interval,
    _nmi_interval,
    interval_is_approximate,
)
from moe_emergence.analysis.score_intervals import _bootstrap_weights as _bootstrap_weights
from moe_emergence.analysis.score_intervals import _weighted_tables as _weighted_tables
from moe_emergence.analysis.score_nulls import (
    _labelled_tables,
    _permutation_labels,
    null_summary,
    permutation_null,
    permutation_p,
    permutation_tables,
)
from moe_emergence.analysis.score_probe import ProbeArrays as ProbeArrays
from moe_emergence.analysis.score_probe import _probe, document_folds
from moe_emergence.analysis.score_shared import _SharedGroups
from moe_emergence.analysis.score_shared import _within_id_permutations as _within_id_permutations
from moe_emergence.analysis.score_tables import _compact as _compact
from moe_emergence.analysis.score_tables import _ids as _ids
from moe_emergence.analysis.score_tables import (
    _mi_and_hd,
    _nmi_batch,
    collapsed_expert,
    contingency,
    entropy,
    mutual_information,
    nmi,
    shares,
    usage_entropy,
)
from moe_emergence.analysis.score_tables import _unit_counts as _unit_counts

__all__ = [
    "INTERVAL_MIN_DOCUMENTS",
    "CrossFitted",
    "HeldOutGains",
    "LayerScores",
    "collapsed_expert",
    "conditional_mi",
    "conditional_mi_null",
    "contingency",
    "cross_fitted_routers",
    "document_bootstrap",
    "document_folds",
    "entropy",
    "held_out_gains",
    "interval_is_approximate",
    "mutual_information",
    "nmi",
    "null_summary",
    "paired_change_interval",
    "permutation_null",
    "permutation_p",
    "permutation_tables",
    "score_layer",
    "shares",
    "usage_entropy",
]


# ----------------------------------------------------------------------------- on a probe's arrays


def conditional_mi(
    token_ids, token_docs, doc_domains, experts, n_domains: int, n_experts: int
) -> float:
    """``I(D;E | T) = sum_t p(t) I(D;E | T=t)`` (nats, plug-in) of the first-choice routing, p
    over the tokens whose id is seen in >= 2 domains; 0.0 when there are none."""
    probe = _probe(token_ids, token_docs, doc_domains, experts, n_domains, n_experts)
    groups = _SharedGroups.of_probe(probe)
    return groups.cond_mi(groups.label, n_domains)


def conditional_mi_null(
    token_ids,
    token_docs,
    doc_domains,
    experts,
    n_domains: int,
    n_experts: int,
    n_permutations: int,
    seed: int = 0,
) -> np.ndarray:
    """[n_permutations] cond_mi after permuting the domain labels among the (id, document)
    groups of each id seen in >= 2 domains: no domain effect beyond the token, the shared ids,
    their expert counts and every document's routing of each id kept."""
    if n_permutations < 0:
        raise ValueError(f"n_permutations must be >= 0, got {n_permutations}")
    probe = _probe(token_ids, token_docs, doc_domains, experts, n_domains, n_experts)
    groups = _SharedGroups.of_probe(probe)
    return groups.null(n_domains, n_permutations, seed)


def cross_fitted_routers(
    token_ids,
    token_docs,
    doc_domains,
    experts,
    n_domains: int,
    n_experts: int,
    seed: int = 0,
    mask=None,
) -> CrossFitted:
    """Fit on one half of the documents (:func:`document_folds`), score on the other, both
    ways. Token-id router: a token is sent by its id's expert distribution in the fit half (an
    id unseen there: the fit half's expert marginal); each scored token adds its router's
    distribution to its domain's row. Distributions, not modal experts: a mode sharpens
    stochastic routing into domain signal that is not there."""
    probe = _probe(token_ids, token_docs, doc_domains, experts, n_domains, n_experts, mask)
    return _token_router(probe, seed)


def held_out_gains(
    token_ids,
    token_docs,
    doc_domains,
    experts,
    n_domains: int,
    n_experts: int,
    n_permutations: int,
    seed: int = 0,
    mask=None,
) -> HeldOutGains:
    """The three held-out gains of the first-choice routing and their ``n_permutations``-draw
    nulls; the halves are :func:`document_folds` of ``seed``, the nulls draw from ``seed``."""
    if n_permutations < 0:
        raise ValueError(f"n_permutations must be >= 0, got {n_permutations}")
    probe = _probe(token_ids, token_docs, doc_domains, experts, n_domains, n_experts, mask)
    return _gains(probe, n_permutations, seed)


def document_bootstrap(
    token_ids,
    token_docs,
    doc_domains,
    experts,
    n_domains: int,
    n_experts: int,
    n_draws: int = 200,
    seed: int = 0,
    confidence: float = 0.95,
    mask=None,
) -> tuple[float, float]:
    """The probe interval of the NMI: a studentised (bootstrap-t) interval over ``n_draws``
    resamples of the probe's documents, with replacement within each domain, each resample's
    standard error from its leave-one-document-out jackknife. (nan, nan)
    without draws. The uncertainty of which documents the probe holds, for one run; the
    spread over seeds is another. Its coverage is checked on the real probe layouts
    (tests/analysis/test_calibration.py; docs/method.md): see :func:`interval_is_approximate`."""
    probe = _probe(token_ids, token_docs, doc_domains, experts, n_domains, n_experts, mask)
    return _nmi_interval(probe.doc_counts, probe.dom, n_domains, n_draws, seed, confidence)


def paired_change_interval(
    token_ids,
    token_docs,
    doc_domains,
    experts_before,
    experts_after,
    n_domains: int,
    n_experts: int,
    n_draws: int,
    seed: int,
    confidence: float = 0.95,
    mask=None,
) -> tuple[float, float]:
    """Document-paired studentised bootstrap interval of NMI(after) - NMI(before) of one run on one
    probe (say the final checkpoint and step 0): each draw resamples the documents (within
    each domain) once and scores both checkpoints' first-choice routing on that one resample,
    so the probe's document make-up cancels in the difference. experts_before / _after: [P, T,
    k], [P, T] or [N] like ``token_ids``; (nan, nan) without draws or tokens."""
    before, after = (
        _probe(token_ids, token_docs, doc_domains, e, n_domains, n_experts, mask)
        for e in (experts_before, experts_after)
    )
    return _change_interval(before, after, n_draws, seed, confidence)


# ----------------------------------------------------------------------------- one layer


@dataclass(frozen=True)
class LayerScores:
    """All scores of one MoE layer on the probe's scored tokens (all of them, or those a
    size-matched probe keeps), at the unit of replication inside a run: the document (a probe
    text; blocks of one text are not independent). For top-k > 1 every score reads the first
    choice (slot 0, the highest router logit), so that NMIs share one scale. Nats throughout;
    p-values are permutation p-values ``(1 + #{null >= observed}) / (1 + K)``.

    mi: I(D;E) of the domain x expert table: the statistic of the NMI's test.
    nmi, nmi_low, nmi_high: the effect size I(D;E) / H(D), and its 95% probe interval
        (studentised bootstrap over documents, resampled within each domain).
    nmi_interval_approximate: the interval's coverage may be below 93% on this probe (not
        size-matched, or too few documents; :func:`interval_is_approximate`): print it as
        approximate.
    null_mean, null_p95: the NMI of the document-level permutation null (domain labels
        permuted across documents): chance levels on the NMI's scale.
    null_p: the test's p-value, computed on I(D;E) (its scale is not moved by a permutation).
    domain_gain: held-out log-loss gain (nats per token) of q(e | d) over q(e), fitted on one
        half of the documents and scored on the other, both ways: the domain signal that
        replicates on documents it was not fitted on; with its null (labels permuted across
        the documents of each half): domain_gain_null_mean, _null_p95, domain_gain_p.
    token_gain: the same of q(e | token id) over q(e); null: experts shuffled among the tokens
        of each document (a token-blind router keeps every document's expert counts):
        token_gain_null_mean, _null_p95, token_gain_p. token_gain_ref_domain,
        token_gain_ref_token: this probe's references, the token gain of a token-blind domain
        router (domain d -> expert d mod E) and of a pure token router (each id one expert).
    domain_beyond_token_gain: q(e | id, d) over q(e | id): domain signal the token id does not
        carry; null: labels permuted among the documents holding each id (within each half):
        domain_beyond_token_gain_null_mean, _null_p95, domain_beyond_token_gain_p.
    cond_mi_excess: plug-in I(D;E | T) over the ids seen in >= 2 domains minus its null's mean
        (labels permuted among each shared id's (id, document) groups): the plug-in's bias
        removed; cond_mi_null_p its p-value (conservative under document preference).
    token_id_nmi: NMI of the cross-fitted token-id router (each token sent by its id's expert
        distribution on the other half of the documents).
    usage_entropy: H(E) of expert usage, in [0, log E].
    router_entropy: passed through from the caller (measured on router logits).
    n_documents, n_tokens: documents and tokens the scores rest on.
    """

    mi: float
    nmi: float
    nmi_low: float
    nmi_high: float
    nmi_interval_approximate: bool
    null_mean: float
    null_p95: float
    null_p: float
    domain_gain: float
    domain_gain_null_mean: float
    domain_gain_null_p95: float
    domain_gain_p: float
    token_gain: float
    token_gain_null_mean: float
    token_gain_null_p95: float
    token_gain_p: float
    token_gain_ref_domain: float
    token_gain_ref_token: float
    domain_beyond_token_gain: float
    domain_beyond_token_gain_null_mean: float
    domain_beyond_token_gain_null_p95: float
    domain_beyond_token_gain_p: float
    cond_mi_excess: float
    cond_mi_null_p: float
    token_id_nmi: float
    usage_entropy: float
    router_entropy: float
    n_documents: int
    n_tokens: int

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> LayerScores:
        """The scores from a trajectory.csv row (strings as csv writes them), by field type."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            text = row[f.name]
            if f.type == "bool":
                values[f.name] = str(text).strip().lower() in ("true", "1", "1.0")
            elif f.type == "int":
                values[f.name] = int(float(text))
            else:
                values[f.name] = float(text)
        return cls(**values)


def score_layer(
    token_ids,
    token_docs,
    doc_domains,
    experts,
    n_domains: int,
    n_experts: int,
    n_permutations: int,
    seed: int = 0,
    router_entropy: float = float("nan"),
    mask=None,
    advance: Advance = None,
) -> LayerScores:
    """Score one MoE layer on a probe: token_ids, token_docs [P, T]; doc_domains [U]; experts
    [P, T, k] or [P, T] (first choice read); ``mask`` bool [P, T]: the tokens scored (None:
    all). The NMI null, the gains' nulls, the cond_mi null, the document folds and the
    bootstrap each draw from ``seed`` (``n_permutations`` draws each). ``advance(draws)``:
    told as the two costly nulls (token gain, domain beyond token) progress, 2 K draws in
    all. Memory: O(N) and batches of :func:`~moe_emergence.analysis.heldout.rows_per_batch`
    draws, never O(K N)."""
    probe = _probe(token_ids, token_docs, doc_domains, experts, n_domains, n_experts, mask)
    dom, doc_counts = probe.dom, probe.doc_counts
    table = contingency(dom[probe.docs], probe.first, n_domains, n_experts)
    null_tables = _labelled_tables(
        doc_counts, _permutation_labels(dom, n_permutations, seed), n_domains
    )
    null_mi, _ = _mi_and_hd(null_tables)
    null_mean, null_p95 = null_summary(_nmi_batch(null_tables))
    observed_mi = mutual_information(table)
    gains = _gains(probe, n_permutations, seed, advance)
    groups = _SharedGroups.of_probe(probe)
    cond = groups.cond_mi(groups.label, n_domains)
    cond_null = groups.null(n_domains, n_permutations, seed)
    nmi_low, nmi_high = _nmi_interval(doc_counts, dom, n_domains, n_permutations, seed)
    return LayerScores(
        mi=observed_mi,
        nmi=nmi(table),
        nmi_low=nmi_low,
        nmi_high=nmi_high,
        nmi_interval_approximate=interval_is_approximate(dom, doc_counts.sum(axis=1), n_domains),
        null_mean=null_mean,
        null_p95=null_p95,
        null_p=permutation_p(null_mi, observed_mi),
        **_tested("domain_gain", gains.domain, gains.domain_null),
        **_tested("token_gain", gains.token, gains.token_null),
        token_gain_ref_domain=gains.token_ref_domain,
        token_gain_ref_token=gains.token_ref_token,
        **_tested(
            "domain_beyond_token_gain", gains.domain_beyond_token, gains.domain_beyond_token_null
        ),
        cond_mi_excess=cond - null_summary(cond_null)[0] if cond_null.size else float("nan"),
        cond_mi_null_p=permutation_p(cond_null, cond),
        token_id_nmi=_token_router(probe, seed).token_id_nmi,
        usage_entropy=usage_entropy(table),
        router_entropy=float(router_entropy),
        n_documents=probe.n_docs,
        n_tokens=int(probe.tok.size),
    )


def _tested(name: str, observed: float, null: np.ndarray) -> dict[str, float]:
    """``{name, name_null_mean, name_null_p95, name_p}`` of a statistic and its null."""
    mean, p95 = null_summary(null)
    return {
        name: observed,
        f"{name}_null_mean": mean,
        f"{name}_null_p95": p95,
        f"{name}_p": permutation_p(null, observed),
    }
