"""Coverage of the per-run probe interval of the NMI (studentised, as scored; and the basic
document bootstrap it replaced), by simulation on the real probe layouts
(tests/analysis/fixtures, see benchmarks/probe_layouts.py).

Each simulated router sends a token to its domain's expert (d mod E) with probability
``domain``, else to its document's preferred expert with probability ``document``, else to a
uniform expert; its population NMI (the target) is that of p(e | d) = domain [e = d mod E] +
(1 - domain) / E with the probe's token shares of the domains. Prints, per layout and
mechanism, the population NMI, the mean plug-in NMI, and each interval's coverage.

    python benchmarks/interval_coverage.py [--datasets 200] [--draws 999]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers.layouts import load_layout, simulate

from moe_emergence.analysis import scores

E = 4


def population_nmi(domain: float, shares: np.ndarray) -> float:
    """NMI of p(e | d) = domain [e = d mod E] + (1 - domain) / E, p(d) = shares."""
    cond = np.full((shares.size, E), (1 - domain) / E)
    cond[np.arange(shares.size), np.arange(shares.size) % E] += domain
    return scores.nmi(shares[:, None] * cond * 1e9)


def basic_interval(doc_counts, dom, n_domains, n_draws, seed, confidence=0.95):
    """The earlier reverse-percentile interval, for comparison."""
    ones = np.ones((1, dom.size))
    observed = scores._nmi_batch(scores._weighted_tables(ones, doc_counts, dom, n_domains))[0]
    weights = scores._bootstrap_weights(dom, n_domains, n_draws, seed)
    draws = scores._nmi_batch(scores._weighted_tables(weights, doc_counts, dom, n_domains))
    q = 100 * np.array([(1 - confidence) / 2, (1 + confidence) / 2])
    low, high = np.percentile(draws, q)
    return 2 * observed - high, 2 * observed - low


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", type=int, default=200)
    parser.add_argument("--draws", type=int, default=999)
    args = parser.parse_args()
    for name, matched in (("study", True), ("hub", True), ("study", False), ("hub", False)):
        layout = load_layout(name, matched)
        dom, n_dom = layout.doc_domains, layout.n_domains
        shares = np.bincount(layout.token_domains, minlength=n_dom) / layout.ids.size
        per_domain = np.bincount(dom, minlength=n_dom)
        print(f"{layout.name}: {layout.ids.size} tokens, documents per domain {per_domain}")
        for domain, document in ((0.1, 0.3), (0.2, 0.3), (0.4, 0.3), (0.2, 0.0)):
            truth = population_nmi(domain, shares)
            rng = np.random.default_rng(0)
            hits, observed = np.zeros(2), []
            for i in range(args.datasets):
                ex = simulate(layout, rng, E, domain=domain, document=document)
                counts = scores._unit_counts(layout.docs, ex, dom.size, E)
                observed.append(scores.nmi(scores.contingency(layout.token_domains, ex, n_dom, E)))
                stud = scores._nmi_interval(counts, dom, n_dom, args.draws, i)
                basic = basic_interval(counts, dom, n_dom, args.draws, i)
                hits += [stud[0] <= truth <= stud[1], basic[0] <= truth <= basic[1]]
            cover = hits / args.datasets
            print(
                f"  domain {domain:.1f} document {document:.1f}: NMI {truth:.3f} (plug-in mean "
                f"{np.mean(observed):.3f}); coverage studentised {cover[0]:.3f}, "
                f"basic {cover[1]:.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
