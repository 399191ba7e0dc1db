"""The measurement core: the fixed probe that routing is measured on, routing it in eval mode
(:func:`route_blocks`, the one eval-mode routing loop: the training callback, ``analyze`` and
``inspect`` all route through it) and scoring that routing (:func:`score_probe_routing`).

The probe is P blocks of T tokens, each block of one domain, chosen once per run and the
same on every rank and after a resume: the held-out split when there is one
(``probe: held_out``), else a seeded sample of the training blocks of every domain
(``probe: train_sample``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from moe_emergence.analysis.scores import LayerScores, contingency, score_layer
from moe_emergence.errors import UserError
from moe_emergence.model.gpt2_moe import (
    collect_aux_outputs,
    moe_layers,
    needs_domains,
    next_token_losses,
    routing_domains,
)

log = logging.getLogger(__name__)

PROBE_FILE = "probe.json"  # what a run's probe is, in its routing folder (Probe.describe)
HELD_OUT = "held_out"
TRAIN_SAMPLE = "train_sample"


@dataclass(frozen=True)
class Probe:
    """input_ids: int64 [P, T]; block_domains: int64 [P], indices into ``domains``;
    kind: ``held_out`` or ``train_sample``.

    Documents (the unit of replication inside a run): token_docs int64 [P, T], each token's
    probe document in 0..n_docs-1 (numbered by first appearance, block-major); doc_domains
    int64 [n_docs]; doc_texts int64 [n_docs], the document's text index in its domain's token
    stream (-1 when the data records no text offsets: then each block is its own document).

    token_mask: bool [P, T], the tokens that are scored (None: all of them). Every block is
    routed whole (each scored token keeps its context); the scores read the scored tokens only.
    :func:`size_matched` sets it and records what it kept and dropped in ``matching``.
    """

    input_ids: np.ndarray
    block_domains: np.ndarray
    domains: tuple[str, ...]
    kind: str
    token_docs: np.ndarray
    doc_domains: np.ndarray
    doc_texts: np.ndarray
    token_mask: np.ndarray | None = None
    matching: dict[str, Any] | None = field(default=None, compare=False)

    @functools.cached_property
    def digest(self) -> str:
        """SHA-256 of the blocks, their domains and documents, and of the scored-token mask
        when it leaves tokens out: the same tokens scored, the same digest."""
        h = hashlib.sha256()
        for arr in (self.input_ids, self.block_domains, self.token_docs, self.doc_texts):
            h.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
        h.update(",".join(self.domains).encode())
        if self.token_mask is not None and not self.token_mask.all():
            h.update(b"mask")
            h.update(np.packbits(np.ascontiguousarray(self.token_mask, dtype=bool)).tobytes())
        return h.hexdigest()

    @property
    def blocks_digest(self) -> str:
        """The digest before it covered documents (962fedb, 2026-12-03): SHA-256 of the blocks and
        their domains only, what a ``probe.json`` without ``block_documents`` records."""
        h = hashlib.sha256()
        for arr in (self.input_ids, self.block_domains):
            h.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
        h.update(",".join(self.domains).encode())
        return h.hexdigest()

    @property
    def n_docs(self) -> int:
        return int(self.doc_domains.shape[0])

    @property
    def scored(self) -> np.ndarray:
        """bool [P, T]: the tokens the scores read."""
        if self.token_mask is None:
            return np.ones(self.input_ids.shape, dtype=bool)
        return self.token_mask

    def scored_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """(documents, tokens) per domain that the scores read."""
        scored = self.scored
        docs = np.unique(self.token_docs[scored])
        tokens = np.bincount(
            np.repeat(self.block_domains, self.input_ids.shape[1])[scored.ravel()],
            minlength=len(self.domains),
        )
        n_docs = np.bincount(self.doc_domains[docs], minlength=len(self.domains))
        return (
            {d: int(n_docs[i]) for i, d in enumerate(self.domains)},
            {d: int(tokens[i]) for i, d in enumerate(self.domains)},
        )

    def describe(self) -> dict[str, Any]:
        """What the probe is, for ``probe.json``: kind, blocks, the documents and tokens per
        domain that are scored, each block's documents (text indices in its domain's stream),
        what size matching kept and dropped (null: not matched), digest."""
        blocks = {d: int((self.block_domains == i).sum()) for i, d in enumerate(self.domains)}
        docs, tokens = self.scored_counts()
        return {
            "probe": self.kind,
            "block_size": int(self.input_ids.shape[1]),
            "blocks": blocks,
            "tokens": tokens,
            "documents": docs,
            "size_matched": self.matching,
            "block_documents": [
                {"domain": self.domains[int(d)], "texts": self.doc_texts[np.unique(row)].tolist()}
                for d, row in zip(self.block_domains, self.token_docs, strict=True)
            ],
            "digest": self.digest,
        }

    def summary(self) -> str:
        """One line: what the probe scores (and, when size-matched, what it dropped)."""
        docs, tokens = self.scored_counts()
        per_domain = ", ".join(f"{d} {docs[d]} ({tokens[d]:,} tokens)" for d in self.domains)
        line = (
            f"Probe ({self.kind}): {self.input_ids.shape[0]:,} blocks of "
            f"{self.input_ids.shape[1]} tokens; documents scored: {per_domain}"
        )
        m = self.matching
        if m is None:
            return line + "; not size-matched"
        dropped = ", ".join(
            f"{d} {m['dropped'][d]['documents']} documents / {m['dropped'][d]['tokens']:,} tokens"
            for d in self.domains
        )
        return (
            f"{line}; size-matched: {m['documents_per_domain']} documents per domain x "
            f"{m['tokens_per_document']} tokens (each document's first); dropped {dropped}"
        )


def size_matched(probe: Probe) -> Probe:
    """The probe with the same number of documents per domain and the same number of tokens
    from each kept document, so that permuting domain labels across documents is exact under
    the null (the documents' count vectors are exchangeable whatever their domain).

    With the documents of each domain by size (tokens in the probe), largest first (ties: the
    earlier document), m documents per domain and s tokens each keep ``D * m * s`` tokens, s
    the smallest size among the m largest of every domain; m is chosen to keep the most tokens
    (ties: more documents). Each kept document keeps its first s tokens in the probe (block
    order: stream order); blocks left with no kept token are dropped; kept blocks are routed
    whole and the rest of their tokens are masked out of the scores."""
    if probe.token_mask is not None:
        raise ValueError("the probe is already size-matched")
    p, t = probe.input_ids.shape
    sizes = np.bincount(probe.token_docs.ravel(), minlength=probe.n_docs)
    by_domain = [np.flatnonzero(probe.doc_domains == d) for d in range(len(probe.domains))]
    ranked = [docs[np.argsort(-sizes[docs], kind="stable")] for docs in by_domain]
    n_docs, n_tokens = _best_match([sizes[docs] for docs in ranked])
    if n_docs == 0:
        empty = [d for d, docs in zip(probe.domains, by_domain, strict=True) if docs.size == 0]
        raise UserError(
            f"callbacks.routing_analysis.size_matched=true keeps nothing: the probe has no "
            f"document of {empty}; set it false or give the probe more texts "
            f"(data.eval_fraction)."
        )
    kept_docs = np.concatenate([docs[:n_docs] for docs in ranked]).astype(np.int64)
    flat_docs = probe.token_docs.ravel()
    keep_doc = np.zeros(probe.n_docs, dtype=bool)
    keep_doc[kept_docs] = True
    order = np.argsort(flat_docs, kind="stable")  # tokens by document, block-major within
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = np.empty(flat_docs.size, dtype=np.int64)
    rank[order] = np.arange(flat_docs.size) - np.repeat(starts, sizes)
    mask = (keep_doc[flat_docs] & (rank < n_tokens)).reshape(p, t)
    blocks = np.flatnonzero(mask.any(axis=1))
    token_docs = probe.token_docs[blocks]
    present, first = np.unique(token_docs.ravel(), return_index=True)
    present = present[np.argsort(first, kind="stable")]  # documents by first appearance
    renumber = np.full(probe.n_docs, -1, dtype=np.int64)
    renumber[present] = np.arange(present.size)
    all_tokens = np.bincount(
        np.repeat(probe.block_domains, t), minlength=len(probe.domains)
    ).astype(int)
    dropped = {
        d: {
            "documents": int(by_domain[i].size - min(n_docs, by_domain[i].size)),
            "tokens": int(all_tokens[i] - (n_tokens * n_docs if n_docs else 0)),
        }
        for i, d in enumerate(probe.domains)
    }
    matching = {
        "documents_per_domain": int(n_docs),
        "tokens_per_document": int(n_tokens),
        "dropped": dropped,
    }
    return replace(
        probe,
        input_ids=probe.input_ids[blocks],
        block_domains=probe.block_domains[blocks],
        token_docs=renumber[token_docs],
        doc_domains=probe.doc_domains[present],
        doc_texts=probe.doc_texts[present],
        token_mask=mask[blocks],
        matching=matching,
    )


def _best_match(sizes_by_domain: list[np.ndarray]) -> tuple[int, int]:
    """(m documents per domain, s tokens each) keeping the most tokens, given each domain's
    document sizes largest first; ties: the larger m. (0, 0) when a domain has no document."""
    m_max = min(len(sizes) for sizes in sizes_by_domain)
    if m_max == 0:
        return 0, 0
    common = np.min(np.stack([sizes[:m_max] for sizes in sizes_by_domain]), axis=0)  # [m_max]
    kept = common * np.arange(1, m_max + 1)
    m = int(np.flatnonzero(kept == kept.max())[-1]) + 1
    return m, int(common[m - 1])


def _documents(
    block_domains: np.ndarray, token_texts: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token_docs [P, T], doc_domains, doc_texts) from each token's text index in its domain's
    stream ([P, T]; -1 for a block whose texts are unknown: the block is its own document)."""
    p, t = token_texts.shape
    unknown = token_texts < 0
    key_text = np.where(unknown, np.arange(p)[:, None], token_texts)
    keys = np.stack([np.repeat(block_domains, t), unknown.ravel(), key_text.ravel()], axis=1)
    _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # number documents by first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    token_docs = rank[inverse.ravel()].reshape(p, t)
    doc_domains = keys[first[order], 0]
    doc_texts = np.where(keys[first[order], 1] == 1, -1, keys[first[order], 2])
    return token_docs, doc_domains.astype(np.int64), doc_texts.astype(np.int64)


def make_probe(
    input_ids: np.ndarray,
    block_domains: np.ndarray,
    domains: Sequence[str],
    kind: str,
    token_texts: np.ndarray | None = None,
) -> Probe:
    """A probe from its blocks; ``token_texts`` [P, T]: each token's text index in its domain's
    stream (None or -1: unknown, each such block its own document)."""
    ids = np.asarray(input_ids, dtype=np.int64)
    labels = np.asarray(block_domains, dtype=np.int64)
    texts = np.full(ids.shape, -1, dtype=np.int64) if token_texts is None else token_texts
    token_docs, doc_domains, doc_texts = _documents(labels, np.asarray(texts, dtype=np.int64))
    return Probe(ids, labels, tuple(domains), kind, token_docs, doc_domains, doc_texts)


def build_probe(
    datamodule: Any,
    domains: Sequence[str],
    train_sample_blocks: int = 64,
    held_out_blocks: int | None = None,
    seed: int = 0,
    match_sizes: bool = False,
) -> Probe:
    """The probe of a set-up :class:`~moe_emergence.data.MixedDomainDataModule`.

    With a held-out split: its blocks, all of them or (``held_out_blocks``) a seeded subset
    of that many per domain. Without: ``train_sample_blocks`` seeded training blocks per domain
    (fewer when a domain has fewer). Blocks are grouped by domain, in ``domains`` order; each
    token knows its text (the document) through the datamodule's ``eval_text_ids`` /
    ``train_text_ids``.
    """
    held_out = getattr(datamodule, "val_dataset", None)
    if held_out is not None:
        source, per_domain, kind = held_out, held_out_blocks, HELD_OUT
        text_ids = getattr(datamodule, "eval_text_ids", {})
    else:
        source = getattr(datamodule, "train_packed", None)
        per_domain, kind = train_sample_blocks, TRAIN_SAMPLE
        text_ids = getattr(datamodule, "train_text_ids", {})
    if source is None:
        raise UserError(
            "Routing analysis needs the MixedDomainDataModule's blocks after setup(): train "
            "through the datamodule, or remove callbacks.routing_analysis."
        )
    missing = [d for d in domains if d not in source.domains]
    if missing:
        raise UserError(
            f"The data has no {missing} blocks, but the model's domains are {list(domains)}."
        )
    rng = np.random.default_rng(seed)
    ids, labels, texts = [], [], []
    for d, domain in enumerate(domains):
        blocks = source.domain_blocks(domain)
        kept = source.kept_block_indices(domain) if kind == TRAIN_SAMPLE else None
        kept = np.arange(len(blocks)) if kept is None else kept
        if per_domain is not None and per_domain < len(kept):
            kept = np.sort(rng.choice(kept, size=per_domain, replace=False))
        ids.append(np.asarray(blocks[kept], dtype=np.int64))
        labels.append(np.full(len(kept), d, dtype=np.int64))
        local = source.block_texts(domain, kept)
        if local is None:
            texts.append(np.full((len(kept), blocks.shape[1]), -1, dtype=np.int64))
        else:  # index in this side's stream -> index in the domain's whole stream
            stream_ids = text_ids.get(domain)
            texts.append(local if stream_ids is None else np.asarray(stream_ids)[local])
    token_texts = np.concatenate(texts)
    if (token_texts < 0).any():
        log.warning(
            "The probe's data records no text offsets: each probe block counts as its own "
            "document, so the routing nulls and intervals treat blocks as independent."
        )
    probe = make_probe(np.concatenate(ids), np.concatenate(labels), domains, kind, token_texts)
    if match_sizes:
        probe = size_matched(probe)
    log.info(probe.summary())
    return probe


@dataclass
class ProbeRouting:
    """Eval-mode routing of probe blocks, per MoE layer (block index -> tensor).

    experts: int64 [P, T, k] chosen experts; entropy_sum: float64 [] summed over tokens of
    the clean router distribution's entropy (nats). loss_sum (``with_loss`` only): float64
    [P], each block's next-token cross-entropy (nats) summed over its T - 1 predictions.
    probs (``with_probs`` only): float32 [P, T, E], the clean router distribution of every
    token (softmax of the router logits in float32).
    """

    experts: dict[int, torch.Tensor]
    entropy_sum: dict[int, torch.Tensor]
    loss_sum: torch.Tensor | None = None
    probs: dict[int, torch.Tensor] | None = None


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode (no router noise, no dropout), then each back as it was."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.train(training)


@torch.no_grad()
def route_blocks(
    model: nn.Module,
    input_ids: torch.Tensor,
    batch_size: int,
    forward_context: Any = contextlib.nullcontext,
    with_loss: bool = False,
    with_probs: bool = False,
    block_domains: torch.Tensor | None = None,
    progress: str | None = None,
) -> ProbeRouting:
    """Route ``input_ids`` [p, T] (on the model's device) through ``model`` (a
    ``GPT2LMHeadModel``, with MoE layers or dense) in eval mode, ``batch_size`` blocks at a
    time, under ``forward_context()`` (the trainer's precision context). Draws no random
    numbers. ``with_loss`` also runs the LM head for each block's summed loss (as the
    LightningModule's validation: float32 logits, next token within the block);
    ``with_probs`` also keeps every token's router distribution. ``block_domains`` [p] long:
    each block's index in the run's domains, which a ``domain`` router routes by (required
    there, unused by the other routers). ``progress``: a bar over the blocks with this
    description (None: no bar)."""
    if block_domains is None and needs_domains(model):
        raise UserError(
            "model.moe.router=domain routes each block by its domain, and these blocks come "
            "without their domains: route blocks of known domains (block_domains)."
        )
    layers = moe_layers(model)
    p, t = input_ids.shape
    device = input_ids.device
    experts = {
        i: torch.zeros(p, t, layer.top_k, dtype=torch.long, device=device)
        for i, layer in layers.items()
    }
    entropy_sum = {i: torch.zeros((), dtype=torch.float64, device=device) for i in layers}
    loss_sum = torch.zeros(p, dtype=torch.float64, device=device) if with_loss else None
    probs = (
        {
            i: torch.zeros(p, t, layer.n_experts, dtype=torch.float32, device=device)
            for i, layer in layers.items()
        }
        if with_probs
        else None
    )
    bar = tqdm(total=p, unit="block", desc=progress, disable=progress is None, leave=False)
    with eval_mode(model), bar:
        for start in range(0, p, batch_size):
            chunk = input_ids[start : start + batch_size]
            domains = None if block_domains is None else block_domains[start : start + batch_size]
            with forward_context(), routing_domains(model, domains):
                if loss_sum is None:
                    model.transformer(input_ids=chunk)  # the MoE layers are all in here
                else:
                    lm_logits = model(input_ids=chunk).logits
            if loss_sum is not None:
                losses = next_token_losses(lm_logits, chunk)
                loss_sum[start : start + len(chunk)] = losses.double().sum(1)
            for i, (indices, logits) in collect_aux_outputs(model).routing.items():
                experts[i][start : start + len(chunk)] = indices.view(len(chunk), t, -1)
                log_p = logits.double().log_softmax(-1)
                entropy_sum[i] += -(log_p.exp() * log_p).sum()
                if probs is not None:
                    dist = logits.float().softmax(-1)
                    probs[i][start : start + len(chunk)] = dist.view(len(chunk), t, -1)
            bar.update(len(chunk))
    return ProbeRouting(experts, entropy_sum, loss_sum, probs)


def score_probe_routing(
    probe: Probe,
    experts: dict[int, np.ndarray],
    router_entropy: dict[int, float],
    n_experts: int,
    n_permutations: int,
    seed: int,
    progress: str | None = None,
) -> dict[int, tuple[np.ndarray, LayerScores]]:
    """Per MoE layer, the domain x expert table [D, E] of the probe's scored tokens'
    assignments (all k slots: the heatmap's counts) and its scores (first choice, documents as
    units, the scored tokens only);
    ``experts[layer]``: int [P, T, k] for ``probe.input_ids`` [P, T]. Layers in sorted order.
    ``progress``: a bar over the costly null draws (2 ``n_permutations`` a layer) with this
    description (None: no bar)."""
    n_domains, (p, t) = len(probe.domains), probe.input_ids.shape
    scored = probe.scored.ravel()
    token_domains = np.repeat(probe.block_domains, t)[scored]
    out = {}
    total = 2 * n_permutations * len(experts)
    with tqdm(
        total=total, unit="draw", desc=progress, disable=progress is None, leave=False
    ) as bar:
        for layer, chosen in sorted(experts.items()):
            assigned = chosen.reshape(p * t, -1)[scored]
            table = contingency(token_domains, assigned, n_domains, n_experts)
            scores = score_layer(
                probe.input_ids,
                probe.token_docs,
                probe.doc_domains,
                chosen,
                n_domains,
                n_experts,
                n_permutations=n_permutations,
                seed=seed,
                router_entropy=router_entropy[layer],
                mask=probe.token_mask,
                advance=bar.update,
            )
            out[layer] = (table, scores)
    return out
