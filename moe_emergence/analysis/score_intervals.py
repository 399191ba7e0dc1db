"""Probe intervals of the NMI (numpy only): studentised bootstraps over documents, resampled
within each domain, of one checkpoint's NMI and of one run's change between two checkpoints."""

from __future__ import annotations

import numpy as np

from moe_emergence.analysis.score_probe import ProbeArrays
from moe_emergence.analysis.score_tables import _ids, _nmi_batch

# The probe interval of the NMI is exact enough (coverage >= 93%) on size-matched probes with at
# least this many documents per domain (benchmarks/interval_coverage.py; docs/method.md).
INTERVAL_MIN_DOCUMENTS = 18


# ----------------------------------------------------------------------------- probe intervals


def _bootstrap_weights(doc_domains: np.ndarray, n_domains: int, n_draws: int, seed: int):
    """[n_draws, U] float64 multiplicities of a bootstrap over documents, within each domain
    (each domain keeps its document count)."""
    rng = np.random.default_rng(seed)
    weights = np.zeros((n_draws, doc_domains.shape[0]))
    for d in range(n_domains):
        mine = np.flatnonzero(doc_domains == d)
        if mine.size:
            weights[:, mine] = rng.multinomial(
                mine.size, np.full(mine.size, 1 / mine.size), size=n_draws
            )
    return weights


def _weighted_tables(weights: np.ndarray, doc_counts: np.ndarray, doc_domains, n_domains: int):
    """[B, D, E] domain x expert tables of the documents' counts [U, E] weighted [B, U]."""
    tables = np.empty((weights.shape[0], n_domains, doc_counts.shape[1]))
    for d in range(n_domains):
        mine = doc_domains == d
        tables[:, d, :] = weights[:, mine] @ doc_counts[mine]
    return tables


def _jackknife_se(
    tables: np.ndarray,
    weights: np.ndarray,
    counts: list[np.ndarray],
    doc_domains: np.ndarray,
    statistic,
) -> np.ndarray:
    """[B] jackknife standard errors of ``statistic`` over the documents of each weighted
    resample: ``tables`` [C, B, D, E] (one per checkpoint in ``counts``, each [U, E]),
    ``weights`` [B, U] the resample's multiplicities; removing one copy of document u at a
    time, ``se^2 = (n - 1) / n * sum_u w_u (theta_(u) - mean)^2`` with n = sum_u w_u."""
    n_draws, n_docs = weights.shape
    cells = n_docs * tables[0, 0].size * len(counts)
    step = max(1, 4_000_000 // max(cells, 1))
    out = np.empty(n_draws)
    for start in range(0, n_draws, step):
        stop = min(start + step, n_draws)
        per_checkpoint = []
        for table, doc_counts in zip(tables, counts, strict=True):
            loo = np.repeat(table[start:stop, None], n_docs, axis=1)  # [b, U, D, E]
            loo[:, np.arange(n_docs), doc_domains, :] -= doc_counts[None]
            per_checkpoint.append(_nmi_batch(loo))
        values = statistic(per_checkpoint)  # [b, U]
        w = weights[start:stop]
        n = w.sum(axis=1)
        mean = (w * values).sum(axis=1) / n
        var = (n - 1) / n * (w * (values - mean[:, None]) ** 2).sum(axis=1)
        out[start:stop] = np.sqrt(np.maximum(var, 0.0))
    return out


def _studentised_interval(
    counts: list[np.ndarray],
    doc_domains: np.ndarray,
    n_domains: int,
    n_draws: int,
    seed: int,
    confidence: float,
    statistic,
) -> tuple[float, float]:
    """Studentised (bootstrap-t) interval of ``statistic`` (a function of the NMIs of each
    checkpoint's table: list of arrays -> array) over a within-domain document bootstrap:
    ``t* = (theta* - theta) / se*``, se* the jackknife SE inside each resample, and ``(theta -
    t*_hi se, theta - t*_lo se)``. ``counts``: each checkpoint's document expert counts [U, E],
    the same documents and resamples for all (paired). (nan, nan) without draws or tokens."""
    if n_draws < 1 or any(c.sum() == 0 for c in counts):
        return float("nan"), float("nan")
    ones = np.ones((1, doc_domains.shape[0]))
    weights = _bootstrap_weights(doc_domains, n_domains, n_draws, seed)
    full = np.stack([_weighted_tables(ones, c, doc_domains, n_domains) for c in counts])
    drawn = np.stack([_weighted_tables(weights, c, doc_domains, n_domains) for c in counts])
    theta = float(statistic([_nmi_batch(t) for t in full])[0])
    se = float(_jackknife_se(full, ones, counts, doc_domains, statistic)[0])
    theta_b = statistic([_nmi_batch(t) for t in drawn])
    se_b = _jackknife_se(drawn, weights, counts, doc_domains, statistic)
    ok = se_b > 0
    if not ok.any() or se <= 0:
        return theta, theta
    t = (theta_b[ok] - theta) / se_b[ok]
    low, high = np.percentile(t, 100 * np.array([(1 - confidence) / 2, (1 + confidence) / 2]))
    return float(theta - high * se), float(theta - low * se)


def _nmi_of(values: list[np.ndarray]) -> np.ndarray:
    """The NMI of the one checkpoint."""
    return values[0]


def _change_of(values: list[np.ndarray]) -> np.ndarray:
    """NMI after minus NMI before."""
    return values[1] - values[0]


def _nmi_interval(
    doc_counts: np.ndarray,
    doc_domains: np.ndarray,
    n_domains: int,
    n_draws: int,
    seed: int,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """:func:`~moe_emergence.analysis.scores.document_bootstrap` from the documents' expert
    counts [U, E]."""
    return _studentised_interval(
        [doc_counts], doc_domains, n_domains, n_draws, seed, confidence, _nmi_of
    )


def _change_interval(
    before: ProbeArrays, after: ProbeArrays, n_draws: int, seed: int, confidence: float
) -> tuple[float, float]:
    """:func:`~moe_emergence.analysis.scores.paired_change_interval` of one probe's two
    routings (the same documents: paired); (nan, nan) without tokens."""
    if before.docs.size == 0:
        return float("nan"), float("nan")
    counts = [before.doc_counts, after.doc_counts]
    dom, n_domains = before.dom, before.n_domains
    return _studentised_interval(counts, dom, n_domains, n_draws, seed, confidence, _change_of)


def interval_is_approximate(doc_domains, doc_sizes, n_domains: int) -> bool:
    """Whether the probe interval of the NMI is to be read as approximate: unless the probe is
    size-matched (as many documents in every domain, as many scored tokens in every document)
    with at least :data:`INTERVAL_MIN_DOCUMENTS` documents per domain, the layouts its coverage
    was checked on (docs/method.md: 93-96% on the matched study and hub probes; 90.5% on the
    unmatched study probe). doc_domains [U]; doc_sizes [U] scored tokens per document."""
    dom = _ids(doc_domains, n_domains, "doc_domains")
    sizes = np.asarray(doc_sizes)
    per_domain = np.bincount(dom, minlength=n_domains)
    matched = per_domain.size > 0 and (per_domain == per_domain[0]).all()
    matched = matched and sizes.size > 0 and (sizes == sizes.flat[0]).all()
    return not (matched and per_domain.min() >= INTERVAL_MIN_DOCUMENTS)
