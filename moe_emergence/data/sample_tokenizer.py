"""``sample_bpe``: a byte-level BPE trained on the offline sample corpus, for machines that
cannot download GPT-2's tokenizer.

Trained once per cache dir and corpus identity (vocab 8,192 including the EOS token
``<|endoftext|>``) on the first ``TRAIN_MB`` MiB of each sample domain, saved under
``<cache_dir>/tokenizers/sample_bpe-<hash>/`` and loaded as a ``PreTrainedTokenizerFast``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from moe_emergence.data.files import build_folder_once

log = logging.getLogger(__name__)

SAMPLE_TOKENIZER = "sample_bpe"
VOCAB_SIZE = 8192
TRAIN_MB = 0.5
EOS = "<|endoftext|>"


def sample_tokenizer_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where ``sample_bpe`` lives for this corpus (its identity is part of the folder name)."""
    from moe_emergence.data.cache import resolve_cache_dir
    from moe_emergence.data.sample import sample_identity

    recipe = {"corpus": sample_identity(), "vocab_size": VOCAB_SIZE, "train_mb": TRAIN_MB}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return resolve_cache_dir(cache_dir) / "tokenizers" / f"{SAMPLE_TOKENIZER}-{digest}"


def train_sample_tokenizer(folder: Path) -> None:
    """Train the BPE on the sample corpus and save it in ``folder`` (Hub tokenizer layout)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from moe_emergence.data.sample import load_sample_domain
    from moe_emergence.data.sources import DOMAINS

    corpus = [t for d in DOMAINS for t in load_sample_domain(d, TRAIN_MB)[0]]
    log.info("Training the %s tokenizer on %d sample texts...", SAMPLE_TOKENIZER, len(corpus))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer, length=len(corpus))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, unk_token=EOS
    )
    tokenizer.model_max_length = 1_000_000  # packing cuts blocks itself; silence length warnings
    tokenizer.save_pretrained(folder)


def ensure_sample_tokenizer(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding ``sample_bpe``, trained first if missing (one process at a time)."""
    folder = sample_tokenizer_dir(cache_dir)
    if build_folder_once(
        folder, train_sample_tokenizer, lambda f: (f / "tokenizer.json").is_file()
    ):
        log.info("Sample tokenizer saved to %s", folder)
    return folder
