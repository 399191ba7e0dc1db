"""Hold out whole texts of a token stream for validation, never splitting exact duplicates.

A stream is one domain's tokens with ``doc_offsets`` (``num_texts + 1`` int offsets; text i is
``tokens[doc_offsets[i]:doc_offsets[i + 1]]``, its EOS included). Texts with identical tokens
(identical text, for our tokenizers) form one duplicate group, and a group goes to one side
whole, so that no held-out text is also trained on.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np

log = logging.getLogger(__name__)


def duplicate_groups(tokens: np.ndarray, doc_offsets: np.ndarray) -> np.ndarray:
    """Group id (int64, one per text) shared by texts with identical tokens.

    Ids are numbered by first occurrence in the stream (0, 1, ...). Texts are compared by a
    128-bit BLAKE2b digest of their token bytes (one dtype per stream), so this reads every
    token once (about 1 GB/s) and keeps only the digests.
    """
    offsets = np.asarray(doc_offsets, dtype=np.int64)
    ids: dict[bytes, int] = {}
    groups = np.empty(len(offsets) - 1, dtype=np.int64)
    for i, (start, end) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)):
        digest = hashlib.blake2b(np.ascontiguousarray(tokens[start:end]), digest_size=16).digest()
        groups[i] = ids.setdefault(digest, len(ids))
    return groups


def choose_held_out_groups(sizes: np.ndarray, target: int, seed: int) -> np.ndarray:
    """Seeded choice of groups (``sizes[g]`` texts each) holding about ``target`` texts.

    Groups are visited in a seeded random order and taken while they fit in what is left of
    ``target``, so the count held out is at most ``target`` (equal when every group is one
    text). When no group fits (every group larger than ``target``), the first smallest group in
    that order is taken instead. Returns a bool mask over groups. Needs ``1 <= target`` and at
    least two groups; the caller keeps ``target`` below the number of texts, so at least one
    group stays for training.
    """
    order = np.random.default_rng(seed).permutation(len(sizes))
    chosen = np.zeros(len(sizes), dtype=bool)
    need = target
    for g in order.tolist():
        if sizes[g] <= need:
            chosen[g] = True
            need -= int(sizes[g])
            if need == 0:
                break
    if not chosen.any():
        chosen[order[np.argmin(sizes[order])]] = True
    return chosen


def split_by_document(
    tokens: np.ndarray,
    doc_offsets: np.ndarray,
    eval_fraction: float,
    seed: int,
    min_texts: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hold out a seeded ``eval_fraction`` of a stream's texts, whole (no text on both sides),
    and at least ``min_texts`` of them where the stream has twice as many (the documents are the
    unit of the routing nulls: a probe of 3 texts has no resolution); the floor never takes
    more than half of the texts.

    Returns ``(train_tokens, eval_tokens, is_eval)``: each side keeps its texts (with their
    EOS) in stream order; ``is_eval`` (bool, one per text) says where each text went. Exact
    duplicate texts all go to the same side. When ``eval_fraction > 0`` and the stream has at
    least two distinct texts, at least one text is held out and one stays for training; the
    count held out is close to ``round(eval_fraction * num_texts)`` (at most that, unless every
    duplicate group is larger). With a single distinct text nothing is held out.
    """
    num_texts = len(doc_offsets) - 1
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction={eval_fraction} must be in [0, 1).")
    is_eval = np.zeros(num_texts, dtype=bool)
    if eval_fraction > 0 and num_texts > 1:
        groups = duplicate_groups(tokens, doc_offsets)
        sizes = np.bincount(groups)
        if len(sizes) > 1:
            floor = min(min_texts, num_texts // 2)
            target = min(max(1, round(eval_fraction * num_texts), floor), num_texts - 1)
            is_eval = choose_held_out_groups(sizes, target, seed)[groups]
        else:
            log.warning("All %d texts are identical: none can be held out.", num_texts)
    token_is_eval = np.repeat(is_eval, np.diff(doc_offsets))
    return tokens[~token_is_eval], tokens[token_is_eval], is_eval
