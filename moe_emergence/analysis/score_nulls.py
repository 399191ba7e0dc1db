"""Document-level permutation nulls of the domain x expert table, and their summaries (numpy
only): domain labels permuted across documents, each document's routing kept whole."""

from __future__ import annotations

import numpy as np

from moe_emergence.analysis.score_tables import _counts, _ids, _mi_and_hd, _nmi_batch


def _permutation_labels(unit_domains: np.ndarray, n_permutations: int, seed: int) -> np.ndarray:
    """[K, U] int64 shuffled unit (document) domain labels: row i is the i-th
    ``np.random.default_rng(seed).permutation(unit_domains)``."""
    if n_permutations < 0:
        raise ValueError(f"n_permutations must be >= 0, got {n_permutations}")
    rng = np.random.default_rng(seed)
    labels = np.empty((n_permutations, unit_domains.shape[0]), dtype=np.int64)
    for i in range(n_permutations):
        labels[i] = rng.permutation(unit_domains)
    return labels


def _labelled_tables(counts: np.ndarray, labels: np.ndarray, n_domains: int) -> np.ndarray:
    """[K, D, E] domain x expert tables of unit counts [U, E] under unit labels [K, U]."""
    tables = np.empty((labels.shape[0], n_domains, counts.shape[1]), dtype=np.float64)
    for d in range(n_domains):
        tables[:, d, :] = (labels == d).astype(np.float64) @ counts  # exact: integer sums
    return tables


def permutation_tables(
    unit_expert_counts, unit_domains, n_domains: int, n_permutations: int, seed: int = 0
) -> np.ndarray:
    """[n_permutations, D, E] domain x expert tables after permuting the domain labels across
    units (documents), each document's routing kept whole. unit_expert_counts [U, E];
    unit_domains [U]. Draw i uses the i-th ``np.random.default_rng(seed).permutation``."""
    counts = _counts(unit_expert_counts, name="unit_expert_counts")
    dom = _ids(unit_domains, n_domains, "unit_domains")
    if dom.ndim != 1 or dom.shape[0] != counts.shape[0]:
        raise ValueError(
            f"unit_domains must be [{counts.shape[0]}] to match unit_expert_counts, got {dom.shape}"
        )
    labels = _permutation_labels(dom, n_permutations, seed)
    return _labelled_tables(counts, labels, n_domains)


def permutation_null(
    unit_expert_counts,
    unit_domains,
    n_domains: int,
    n_permutations: int,
    seed: int = 0,
    statistic: str = "nmi",
) -> np.ndarray:
    """[n_permutations] values of ``statistic`` (``"nmi"``, or ``"mi"``: I(D;E) in nats) of the
    :func:`permutation_tables`: the chance level of a domain-blind router on this probe, each
    document's routing kept whole. Test with ``"mi"``: permuting labels moves each domain's
    token total and so H(D), the NMI's denominator, when documents differ in size by domain
    (the NMI's null is then conservative or liberal); I(D;E) is not rescaled by it."""
    if statistic not in ("nmi", "mi"):
        raise ValueError(f"statistic must be 'nmi' or 'mi', got {statistic!r}")
    tables = permutation_tables(unit_expert_counts, unit_domains, n_domains, n_permutations, seed)
    return _nmi_batch(tables) if statistic == "nmi" else _mi_and_hd(tables)[0]


def null_summary(null) -> tuple[float, float]:
    """(mean, 95th percentile) of null values (NMIs or cond_mi); (nan, nan) for an empty
    null."""
    arr = np.asarray(null, dtype=np.float64).ravel()
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(np.percentile(arr, 95))


def permutation_p(null, observed: float) -> float:
    """Permutation p-value ``(1 + #{null >= observed}) / (1 + K)`` (ties count against the
    observation, to 1e-12); nan for an empty null or a nan observation."""
    arr = np.asarray(null, dtype=np.float64).ravel()
    if arr.size == 0 or np.isnan(observed):
        return float("nan")
    return float((1 + np.count_nonzero(arr >= observed - 1e-12)) / (1 + arr.size))
