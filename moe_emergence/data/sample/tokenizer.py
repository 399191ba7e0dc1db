"""``sample_bpe``: a byte-level BPE trained on the offline sample corpus, for machines that
cannot download GPT-2's tokenizer.

Trained once per cache dir and corpus identity (vocab 8,192 including the EOS token
``<|endoftext|>``) on the first ``TRAIN_MB`` MiB of each sample domain, saved under
``<cache_dir>/tokenizers/sample_bpe-<hash>/`` (the hash covers the training texts themselves)
with ``sample_bpe.json`` listing each saved file's SHA-256, and loaded as a
``PreTrainedTokenizerFast``. A folder whose files disagree with that list or do not load is
retrained with a warning; ``rebuild=True`` (the ``rebuild_cache`` setting) retrains it anyway.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from moe_emergence.data.cache import check_cache_root, resolve_cache_dir, writing_cache
from moe_emergence.data.domains import domain_set
from moe_emergence.data.sample.corpus import SAMPLE_SET, load_sample_domain, sample_identity
from moe_emergence.data.tokenize import load_tokenizer_at
from moe_emergence.files import build_folder_once, sha256_file, write_atomic

log = logging.getLogger(__name__)

SAMPLE_TOKENIZER = "sample_bpe"
VOCAB_SIZE = 8192
TRAIN_MB = 0.5
EOS = "<|endoftext|>"
DIGESTS = "sample_bpe.json"  # {"files": {name: sha256}} of the saved files, written last
RECIPE_VERSION = 2  # 2: folder hash over the training texts; digests file

_RETRAINED: set[Path] = set()  # folders retrained by rebuild=True in this process


def sample_tokenizer_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where ``sample_bpe`` lives for this corpus (its identity is part of the folder name)."""
    recipe = {
        "corpus": sample_identity(TRAIN_MB),
        "vocab_size": VOCAB_SIZE,
        "train_mb": TRAIN_MB,
        "recipe_version": RECIPE_VERSION,
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return resolve_cache_dir(cache_dir) / "tokenizers" / f"{SAMPLE_TOKENIZER}-{digest}"


def train_sample_tokenizer(folder: Path) -> None:
    """Train the BPE on the sample corpus and save it in ``folder`` (Hub tokenizer layout)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        t
        for d, sources in domain_set(SAMPLE_SET).items()
        for t in load_sample_domain(d, TRAIN_MB, sources=sources)[0]
    ]
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
    files = {f.name: sha256_file(f) for f in sorted(Path(folder).iterdir()) if f.is_file()}
    write_atomic(Path(folder) / DIGESTS, json.dumps({"files": files}, indent=2) + "\n")


def check_sample_tokenizer(folder: Path) -> str | None:
    """Why ``folder`` does not hold a usable ``sample_bpe`` (None when it does): every file
    listed in ``sample_bpe.json`` has its SHA-256, and ``tokenizer.json`` loads with
    ``VOCAB_SIZE`` ids and the EOS token."""
    from tokenizers import Tokenizer

    try:
        files = json.loads((folder / DIGESTS).read_text())["files"]
        if not isinstance(files, dict) or "tokenizer.json" not in files:
            return f"{DIGESTS} lists no tokenizer.json"
        for name, digest in files.items():
            if sha256_file(folder / name) != digest:
                return f"{name} does not match its SHA-256"
        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as exc:  # a damaged file fails in many ways: all mean "retrain"
        return f"{type(exc).__name__}: {exc}"
    if backend.get_vocab_size() != VOCAB_SIZE or backend.token_to_id(EOS) is None:
        return f"tokenizer.json has {backend.get_vocab_size()} ids or no {EOS}"
    return None


def ensure_sample_tokenizer(
    cache_dir: str | os.PathLike | None = None, rebuild: bool = False
) -> Path:
    """The folder holding ``sample_bpe``, trained first when missing or damaged (a warning),
    or when ``rebuild`` (once per process). One process trains at a time."""
    folder = sample_tokenizer_dir(cache_dir)
    rebuild = rebuild and folder not in _RETRAINED

    def ready(path: Path) -> bool:
        if not path.exists():
            return False
        problem = check_sample_tokenizer(path)
        if problem is not None:
            log.warning("Sample tokenizer %s is damaged (%s); retraining it.", path, problem)
        return problem is None

    if build_folder_once(folder, train_sample_tokenizer, ready, rebuild=rebuild):
        log.info("Sample tokenizer saved to %s", folder)
    if rebuild:
        _RETRAINED.add(folder)
    return folder


def load_sample_tokenizer(cache_dir: str | os.PathLike | None = None, rebuild: bool = False):
    """``sample_bpe`` loaded (see :func:`moe_emergence.data.tokenize.load_tokenizer_at`), trained
    first where :func:`ensure_sample_tokenizer` says so; a cache root that cannot be written
    raises a one-line CacheWriteError."""
    root = check_cache_root(cache_dir)
    with writing_cache(root, cache_dir):
        location = str(ensure_sample_tokenizer(cache_dir, rebuild=rebuild))
    return load_tokenizer_at(SAMPLE_TOKENIZER, location)
