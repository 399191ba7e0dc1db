"""Batched encoding: exact ids, EOS placement, offsets, dtype, no silent truncation."""

from __future__ import annotations

import numpy as np
import pytest

from moe_emergence.data.tokenize import encode_texts, load_tokenizer, token_dtype

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "  leading and trailing spaces kept  ",
    "alpha beta gamma " * 40,  # > 50 tokens: the saved truncation must not apply
    "x",
]


def recount(tokenizer, texts):
    ids = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids


def test_encode_matches_per_text_encode_with_eos(tiny_tokenizer):
    stream = encode_texts(TEXTS, tiny_tokenizer, batch_size=3)  # batches cross text boundaries
    assert stream.tokens.tolist() == recount(tiny_tokenizer, TEXTS)
    assert stream.tokens.dtype == np.uint16
    assert stream.num_texts == len(TEXTS)


def test_doc_offsets_delimit_each_text_and_its_eos(tiny_tokenizer):
    stream = encode_texts(TEXTS, tiny_tokenizer)
    eos = tiny_tokenizer.eos_token_id
    assert stream.doc_offsets[0] == 0 and stream.doc_offsets[-1] == stream.num_tokens
    for i, text in enumerate(TEXTS):
        doc = stream.tokens[stream.doc_offsets[i] : stream.doc_offsets[i + 1]]
        assert doc[-1] == eos
        assert tiny_tokenizer.decode(doc[:-1].tolist()) == text


def test_saved_truncation_is_ignored(tiny_tokenizer, tiny_tokenizer_dir):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(tiny_tokenizer_dir / "tokenizer.json"))
    assert len(raw.encode(TEXTS[2]).ids) == 50  # the saved file truncates, as GPT-2's does
    stream = encode_texts([TEXTS[2]], tiny_tokenizer)
    assert stream.num_tokens - 1 > 50


def test_empty_input_gives_empty_stream(tiny_tokenizer):
    stream = encode_texts([], tiny_tokenizer)
    assert stream.num_tokens == 0 and stream.doc_offsets.tolist() == [0]


def test_dtype_widens_for_large_vocabularies():
    assert token_dtype(50_257) == np.uint16
    assert token_dtype(65_535) == np.uint16
    assert token_dtype(65_536) == np.uint32


def test_tokenizer_without_eos_is_rejected(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no EOS"):
        load_tokenizer(str(tmp_path))


def test_real_gpt2_counts_match_transformers(real_hub):
    tokenizer = load_tokenizer(str(real_hub / "gpt2"))
    assert tokenizer.eos_token_id == 50256
    texts = ["Hello world", "def f():\n    return 1\n" * 30]
    assert tokenizer.backend_tokenizer.truncation["max_length"] == 50  # as saved on the Hub
    stream = encode_texts(texts, tokenizer)
    assert tokenizer.backend_tokenizer.truncation["max_length"] == 50  # restored after
    assert stream.tokens.tolist() == recount(tokenizer, texts)


def test_a_folders_tokenizer_is_loaded_once_until_its_files_change(tiny_tokenizer_dir, tmp_path):
    import shutil

    folder = tmp_path / "tok"
    shutil.copytree(tiny_tokenizer_dir, folder)
    first = load_tokenizer(str(folder))
    assert load_tokenizer(str(folder)) is first
    config = folder / "tokenizer_config.json"
    config.write_text(config.read_text() + "\n")  # the folder changed: load it again
    assert load_tokenizer(str(folder)) is not first
