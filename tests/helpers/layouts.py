"""Simulated routers of known mechanism on the layout of a real probe (numpy only).

A layout (tests/analysis/fixtures/probe_layout_<name>.npz, written by
benchmarks/probe_layouts.py) is a real probe without its text: each token's document, each
document's domain, the blocks, and each token's id as its frequency rank in the probe. A
simulated router picks one of ``E`` experts for every token; its mechanism is a mixture, each
token independently: with probability ``domain`` the domain's own expert (d mod E); else with
probability ``document`` its document's preferred expert (drawn per document, whatever its
domain); else with probability ``token`` its id's fixed expert (drawn per id); else a uniform
expert.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe_emergence.analysis.probe import Probe, make_probe, size_matched

FIXTURES = Path(__file__).resolve().parent.parent / "analysis" / "fixtures"


@dataclass(frozen=True)
class Layout:
    """A probe's layout: ``probe`` (input_ids are id ranks) and its flat scored tokens: ids,
    docs (renumbered over the scored documents), doc_domains, token_domains."""

    name: str
    probe: Probe
    ids: np.ndarray
    docs: np.ndarray
    doc_domains: np.ndarray

    @property
    def n_domains(self) -> int:
        return len(self.probe.domains)

    @property
    def token_domains(self) -> np.ndarray:
        return self.doc_domains[self.docs]


def load_layout(name: str, matched: bool) -> Layout:
    """The layout ``name`` (``study`` or ``hub``), size-matched or not (as
    :func:`~moe_emergence.analysis.probe.size_matched` does it)."""
    data = np.load(FIXTURES / f"probe_layout_{name}.npz")
    t = int(data["block_size"])
    block_domains = data["block_domains"].astype(np.int64)
    ids = data["id_rank"].astype(np.int64).reshape(-1, t)
    docs = data["token_docs"].astype(np.int64).reshape(-1, t)
    domains = tuple(str(data["domains"]).split(","))
    probe = make_probe(ids, block_domains, domains, "held_out", docs)  # text = document
    if matched:
        probe = size_matched(probe)
    scored = probe.scored.ravel()
    flat_docs = probe.token_docs.ravel()[scored]
    present = np.unique(flat_docs)
    renumber = np.full(probe.n_docs, -1)
    renumber[present] = np.arange(present.size)
    return Layout(
        name=f"{name}{' matched' if matched else ''}",
        probe=probe,
        ids=probe.input_ids.ravel()[scored],
        docs=renumber[flat_docs],
        doc_domains=probe.doc_domains[present],
    )


def simulate(
    layout: Layout,
    rng: np.random.Generator,
    n_experts: int,
    *,
    domain: float = 0.0,
    document: float = 0.0,
    token: float = 0.0,
) -> np.ndarray:
    """[N] experts of the layout's scored tokens under the mechanism (module docstring)."""
    n = layout.ids.size
    id_expert = rng.integers(0, n_experts, int(layout.ids.max()) + 1)
    doc_expert = rng.integers(0, n_experts, layout.doc_domains.size)
    out = rng.integers(0, n_experts, n)
    u = rng.random(n)
    out = np.where(u < token + document + domain, id_expert[layout.ids], out)
    out = np.where(u < document + domain, doc_expert[layout.docs], out)
    return np.where(u < domain, layout.token_domains % n_experts, out)
