"""Shared fixtures: offline env, tiny hub-layout mirrors and a tiny tokenizer built here.

No test reaches the network: the Hub's offline switches are set before any HF library loads.
Tests that need real data use ``../shared/hub`` (or ``$MOE_TEST_HUB``) and skip without it.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.pop("MOE_HUB_MIRROR", None)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moe_emergence.data.sources import MATH_SUBJECTS

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_HUB = Path(os.environ.get("MOE_TEST_HUB", REPO_ROOT.parent / "shared" / "hub"))
EOS = "<|endoftext|>"


def _write_parquet(path: Path, rows: Sequence[Mapping[str, str]], columns: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({c: [r[c] for r in rows] for c in columns})
    pq.write_table(table, path)


def _write_configs_readme(repo: Path, configs: Sequence[str]) -> None:
    lines = ["---", "configs:"]
    for config in configs:
        lines += [
            f"- config_name: {config}",
            "  data_files:",
            "  - split: train",
            f"    path: {config}/train-00000-of-00001.parquet",
        ]
    lines.append("---")
    repo.mkdir(parents=True, exist_ok=True)
    (repo / "README.md").write_text("\n".join(lines) + "\n")


def build_hub_mirror(
    root: Path,
    code: Sequence[str],
    gsm8k: Sequence[tuple[str, str]],
    math: Mapping[str, Sequence[tuple[str, str]]],
    wiki: Sequence[str],
) -> Path:
    """Write the four default sources in Hub layout under ``root`` (the mirror root).

    code -> codeparrot/codeparrot-clean (gzipped JSON lines, field ``content``);
    gsm8k -> openai/gsm8k config main (question, answer); math -> EleutherAI/hendrycks_math,
    one config per subject (problem, solution); wiki -> Salesforce/wikitext (text).
    """
    code_repo = root / "codeparrot" / "codeparrot-clean"
    code_repo.mkdir(parents=True, exist_ok=True)
    with gzip.open(code_repo / "file-000000000001.json.gz", "wt", encoding="utf-8") as f:
        for i, content in enumerate(code):
            f.write(json.dumps({"repo_name": f"r{i}", "path": f"f{i}.py", "content": content}))
            f.write("\n")

    gsm = root / "openai" / "gsm8k"
    _write_configs_readme(gsm, ["main"])
    rows = [{"question": q, "answer": a} for q, a in gsm8k]
    _write_parquet(gsm / "main" / "train-00000-of-00001.parquet", rows, ["question", "answer"])

    hm = root / "EleutherAI" / "hendrycks_math"
    _write_configs_readme(hm, MATH_SUBJECTS)
    for subject in MATH_SUBJECTS:
        rows = [
            {"problem": p, "solution": s, "level": "Level 1", "type": subject}
            for p, s in math.get(subject, [])
        ]
        _write_parquet(
            hm / subject / "train-00000-of-00001.parquet",
            rows,
            ["problem", "level", "type", "solution"],
        )

    wt = root / "Salesforce" / "wikitext"
    _write_configs_readme(wt, ["wikitext-103-raw-v1"])
    rows = [{"text": t} for t in wiki]
    _write_parquet(wt / "wikitext-103-raw-v1" / "train-00000-of-00001.parquet", rows, ["text"])
    return root


def _sentence(i: int, n: int) -> str:
    words = ["alpha", "beta", "gamma", "delta", "sum", "value", "river", "stone", "light", "x"]
    out: list[str] = []
    while sum(len(w) + 1 for w in out) < n:
        out.append(words[(i + len(out) * 7) % len(words)])
    return " ".join(out)[:n]


def default_mirror_content() -> dict:
    """Small but non-trivial content: every domain packs into several 32-token blocks."""
    code = [f"def f{i}(x):\n    return x + {i}\n" + "# " + _sentence(i, 150) for i in range(40)]
    gsm8k = [
        (f"Q{i}: {_sentence(i, 60)}?", f"{i} + {i} = {2 * i}\n#### {2 * i}") for i in range(30)
    ]
    math = {
        s: [(f"{s} problem {j}: $x^{j}$", f"The answer is $\\boxed{{{j}}}$.") for j in range(3)]
        for s in MATH_SUBJECTS
    }
    wiki = []
    for i in range(40):
        wiki += ["", f" = Title {i} = \n", " " + _sentence(i, 260) + " \n"]
    return {"code": code, "gsm8k": gsm8k, "math": math, "wiki": wiki}


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
    """A byte-level BPE (vocab ~400, EOS ``<|endoftext|>``) saved like a Hub tokenizer repo.

    Its tokenizer.json carries a 50-token truncation, as GPT-2's does, to catch code that
    forgets to turn it off.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [t for texts in default_mirror_content().values() for t in texts if isinstance(t, str)]
    corpus += [_sentence(i, 400) for i in range(50)]
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
    out = tmp_path_factory.mktemp("tokenizer")
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
