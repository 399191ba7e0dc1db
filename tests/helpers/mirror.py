"""Tiny mirrors in Hub layout (the four default sources), their default content, and where the
real-data mirror lives."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from moe_emergence.data.domains import domain_set

REPO_ROOT = Path(__file__).resolve().parents[2]
MATH_SUBJECTS = domain_set("code_math_prose")["math"][1].configs  # MATH's configs
SHARED_HUB = Path(os.environ.get("MOE_TEST_HUB", REPO_ROOT.parent / "shared" / "hub"))


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


def sentence(i: int, n: int) -> str:
    """``n`` characters of words from a ten-word list, the mix depending on ``i``."""
    words = ["alpha", "beta", "gamma", "delta", "sum", "value", "river", "stone", "light", "x"]
    out: list[str] = []
    while sum(len(w) + 1 for w in out) < n:
        out.append(words[(i + len(out) * 7) % len(words)])
    return " ".join(out)[:n]


def default_mirror_content() -> dict:
    """Small but non-trivial content: every domain packs into several 32-token blocks."""
    code = [f"def f{i}(x):\n    return x + {i}\n" + "# " + sentence(i, 150) for i in range(40)]
    gsm8k = [(f"Q{i}: {sentence(i, 60)}?", f"{i} + {i} = {2 * i}\n#### {2 * i}") for i in range(30)]
    math = {
        s: [(f"{s} problem {j}: $x^{j}$", f"The answer is $\\boxed{{{j}}}$.") for j in range(3)]
        for s in MATH_SUBJECTS
    }
    wiki = []
    for i in range(40):
        wiki += ["", f" = Title {i} = \n", " " + sentence(i, 260) + " \n"]
    return {"code": code, "gsm8k": gsm8k, "math": math, "wiki": wiki}
