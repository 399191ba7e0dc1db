"""split_by_document: whole texts held out, exact duplicates never on both sides, seeded."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from moe_emergence.data.split import duplicate_groups, split_by_document

EOS = 0


def stream_of(texts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens, doc_offsets)`` of ``texts``, each followed by EOS, as the tokenizer writes."""
    with_eos = [np.array([*t, EOS], dtype=np.uint16) for t in texts]
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in with_eos])]).astype(np.int64)
    return np.concatenate(with_eos), offsets


def texts_with_duplicates() -> tuple[list[list[int]], np.ndarray]:
    """30 texts: 6 distinct texts appearing 3 times each and 12 singletons, shuffled.

    Returns the texts and each text's content id (equal ids <=> identical texts).
    """
    content_ids = np.concatenate([np.repeat(np.arange(6), 3), np.arange(6, 18)])
    content_ids = np.random.default_rng(123).permutation(content_ids)
    # content j: 2 + j % 5 tokens, all j + 1 (never EOS); lengths collide across contents
    texts = [[int(j) + 1] * (2 + int(j) % 5) for j in content_ids]
    return texts, content_ids


def test_keeps_texts_whole_and_in_stream_order():
    lengths = np.array([3, 5, 2, 4, 6, 1, 3, 2, 5, 4])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = np.repeat(np.arange(len(lengths)), lengths).astype(np.uint16)  # token = its text id
    train, held_out, is_eval = split_by_document(tokens, offsets, 0.3, seed=1)
    assert is_eval.sum() == 3
    assert set(np.unique(held_out)) == set(np.flatnonzero(is_eval))
    assert set(np.unique(train)).isdisjoint(np.unique(held_out))
    assert len(train) + len(held_out) == len(tokens)
    assert np.all(np.diff(train.astype(int)) >= 0)  # each side keeps stream order
    again = split_by_document(tokens, offsets, 0.3, seed=1)[2]
    other = split_by_document(tokens, offsets, 0.3, seed=2)[2]
    assert again.tolist() == is_eval.tolist() and other.tolist() != is_eval.tolist()


def test_duplicate_groups_number_identical_texts_by_first_occurrence():
    tokens, offsets = stream_of([[5, 6], [7], [5, 6], [5, 6, 6], [7]])
    assert duplicate_groups(tokens, offsets).tolist() == [0, 1, 0, 2, 1]


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5])
def test_duplicates_never_straddle_the_split(fraction):
    texts, content_ids = texts_with_duplicates()
    tokens, offsets = stream_of(texts)
    target = round(fraction * len(texts))
    masks = []
    for seed in range(20):
        train, held_out, is_eval = split_by_document(tokens, offsets, fraction, seed)
        for j in np.unique(content_ids):  # every group lies wholly on one side
            assert len(set(is_eval[content_ids == j].tolist())) == 1, (seed, j)
        # at most the target, short of it by less than the largest group (3 texts)
        assert target - 2 <= is_eval.sum() <= target
        assert 0 < is_eval.sum() < len(texts)
        held_texts = {tuple(texts[i]) for i in np.flatnonzero(is_eval)}
        train_texts = {tuple(texts[i]) for i in np.flatnonzero(~is_eval)}
        assert held_texts.isdisjoint(train_texts)
        assert len(train) + len(held_out) == len(tokens)
        assert split_by_document(tokens, offsets, fraction, seed)[2].tolist() == is_eval.tolist()
        masks.append(tuple(is_eval.tolist()))
    assert len(set(masks)) > 10  # the seed matters
    # duplicate groups are held out too, not only singletons
    tripled = np.isin(content_ids, np.arange(6))
    assert any(np.any(np.array(m) & tripled) for m in masks)


def test_group_larger_than_the_target_is_held_out_whole():
    tokens, offsets = stream_of([[1], [1], [2], [2]])  # two groups of two texts
    for seed in range(5):
        _, _, is_eval = split_by_document(tokens, offsets, 0.25, seed)  # target: 1 text
        assert sorted(is_eval.tolist()) == [False, False, True, True]
        assert is_eval[0] == is_eval[1] and is_eval[2] == is_eval[3]


def test_nothing_held_out_from_one_distinct_text(caplog):
    tokens, offsets = stream_of([[4, 4]])
    assert not split_by_document(tokens, offsets, 0.5, seed=0)[2].any()
    tokens, offsets = stream_of([[4, 4]] * 5)
    with caplog.at_level(logging.WARNING):
        train, held_out, is_eval = split_by_document(tokens, offsets, 0.5, seed=0)
    assert not is_eval.any() and len(held_out) == 0 and len(train) == len(tokens)
    assert "identical" in caplog.text


def test_zero_fraction_holds_out_nothing_and_bad_fraction_is_refused():
    texts, _ = texts_with_duplicates()
    tokens, offsets = stream_of(texts)
    assert not split_by_document(tokens, offsets, 0.0, seed=0)[2].any()
    with pytest.raises(ValueError, match="eval_fraction"):
        split_by_document(tokens, offsets, 1.0, seed=0)


def test_min_texts_floor_holds_out_at_least_that_many_but_never_over_half():
    tokens, offsets = stream_of([[i + 1] * 3 for i in range(30)])  # 30 distinct texts
    assert split_by_document(tokens, offsets, 0.05, seed=0)[2].sum() == 2  # round(1.5)
    assert split_by_document(tokens, offsets, 0.05, seed=0, min_texts=10)[2].sum() == 10
    assert split_by_document(tokens, offsets, 0.05, seed=0, min_texts=40)[2].sum() == 15
    assert split_by_document(tokens, offsets, 0.5, seed=0, min_texts=3)[2].sum() == 15
    assert not split_by_document(tokens, offsets, 0.0, seed=0, min_texts=10)[2].any()
