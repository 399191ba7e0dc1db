"""The tiny tokenizer the fixture mirrors are tokenized with."""

from __future__ import annotations

import json
from pathlib import Path

from helpers.mirror import default_mirror_content, sentence

EOS = "<|endoftext|>"


def build_tiny_tokenizer(out: Path) -> Path:
    """Save under ``out``, like a Hub tokenizer repo, a byte-level BPE (vocab ~400, EOS
    ``<|endoftext|>``) trained on :func:`default_mirror_content` and filler sentences.

    Its tokenizer.json carries a 50-token truncation, as GPT-2's does, to catch code that
    forgets to turn it off.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [t for texts in default_mirror_content().values() for t in texts if isinstance(t, str)]
    corpus += [sentence(i, 400) for i in range(50)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)
    fast.save_pretrained(out)
    saved = json.loads((out / "tokenizer.json").read_text())
    saved["truncation"] = {
        "direction": "Right",
        "max_length": 50,
        "strategy": "LongestFirst",
        "stride": 0,
    }
    (out / "tokenizer.json").write_text(json.dumps(saved))
    return out
