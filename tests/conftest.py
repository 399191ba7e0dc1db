"""Shared fixtures: offline env, tiny hub-layout mirrors and a tiny tokenizer (built by
``helpers.mirror`` and ``helpers.tokenizer``; tests import those, never this file).

No test reaches the network: the Hub's offline switches are set before any HF library loads,
and the session's Hugging Face caches live in a temporary folder of its own.
Tests that need real data use ``../shared/hub`` (or ``$MOE_TEST_HUB``) and skip without it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# The session's own Hugging Face caches (datasets, hub, modules), removed at exit: what the
# machine's ~/.cache/huggingface remembers of another copy of a dataset must not answer for the
# files a test reads (a green suite on a fresh machine only, red on one that ran it before).
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="moe-tests-hf-")
os.environ["HF_DATASETS_CACHE"] = os.path.join(os.environ["HF_HOME"], "datasets")
os.environ["HF_HUB_CACHE"] = os.path.join(os.environ["HF_HOME"], "hub")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.pop("MOE_HUB_MIRROR", None)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
from helpers.mirror import SHARED_HUB, build_hub_mirror, default_mirror_content
from helpers.tokenizer import build_tiny_tokenizer

atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)


@pytest.fixture(autouse=True)
def _private_cache_dir(tmp_path, monkeypatch):
    """Every test gets its own token cache root (never the repo's .cache)."""
    monkeypatch.setenv("MOE_CACHE_DIR", str(tmp_path / "token-cache"))


@pytest.fixture(scope="session")
def tiny_mirror(tmp_path_factory) -> Path:
    """A mirror root with all four default sources (see :func:`default_mirror_content`)."""
    root = tmp_path_factory.mktemp("hub")
    return build_hub_mirror(root, **default_mirror_content())


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE (vocab ~400) saved like a Hub tokenizer repo, with GPT-2's 50-token
    truncation left in its tokenizer.json (see :func:`helpers.tokenizer.build_tiny_tokenizer`)."""
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from moe_emergence.data.tokenize import load_tokenizer

    return load_tokenizer(str(tiny_tokenizer_dir))


@pytest.fixture(scope="session")
def real_hub() -> Path:
    """The real-data mirror ``../shared/hub``; skips where it is absent."""
    if not (SHARED_HUB / "openai" / "gsm8k").is_dir():
        pytest.skip(f"real-data mirror not found at {SHARED_HUB} (set MOE_TEST_HUB)")
    return SHARED_HUB


@pytest.fixture
def restore_log_handlers():
    """Remove the log handlers a Hydra run adds (bound to this test's captured, soon closed,
    stdout), so that later tests logging through them do not print "Logging error"."""
    import logging

    def loggers():
        found = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
        return [lg for lg in found if isinstance(lg, logging.Logger)]

    before = {id(lg): list(lg.handlers) for lg in loggers()}
    yield
    for lg in loggers():
        for handler in [h for h in lg.handlers if h not in before.get(id(lg), [])]:
            lg.removeHandler(handler)
            handler.close()
        for handler in before.get(id(lg), []):
            if handler not in lg.handlers:
                lg.addHandler(handler)


@pytest.fixture(scope="session")
def sample_cache(tmp_path_factory) -> Path:
    """One token-cache dir for the session's sample-corpus runs: sample_bpe is trained once."""
    return tmp_path_factory.mktemp("sample-cache")
