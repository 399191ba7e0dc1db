"""The offline sample source: the Hub loaders' contract (metadata keys, budget rule, length
filters), reproducibility, the generated math's arithmetic, prose cleaning and the identity."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import operator
import random
import re
from fractions import Fraction
from pathlib import Path

import pytest

from moe_emergence.data.domains import domain_set
from moe_emergence.data.sample import corpus as sample
from moe_emergence.data.sample.corpus import (
    SAMPLE_VERSION,
    load_sample_domain,
    pack_paragraphs,
    prose_paragraphs,
    sample_identity,
)
from moe_emergence.data.sample.mathgen import GSM8K_STYLE, MATH_STYLE, format_math, generate_math
from moe_emergence.data.sources import StreamStats, load_domain

SIZE_MB = 0.05  # 52,428 characters per domain: a few dozen files, a few hundred problems
DOMAINS = ("code", "math", "prose")
STATS_KEYS = {f.name for f in dataclasses.fields(StreamStats)}
LOW = {"code": 100, "math": 0, "prose": 200}
LIVE = {d: sample.live_sources(d) for d in ("code", "prose")}  # this machine's stdlib and packages


def mb(chars: int) -> float:
    """The size_mb whose budget is exactly ``chars`` characters."""
    return chars / (1024 * 1024)


@pytest.fixture(scope="module")
def loaded() -> dict[str, tuple[list[str], dict]]:
    return {d: load_sample_domain(d, SIZE_MB) for d in DOMAINS}


@pytest.fixture(scope="module")
def hub_metadata_keys(tiny_mirror) -> set[str]:
    """The keys of ``load_domain``'s metadata, from a real (offline, tiny mirror) call."""
    _, meta = load_domain(
        "code",
        domain_set("code_math_prose")["code"],
        mb(200),
        hub_mirror=str(tiny_mirror),
        show_progress=False,
    )
    return set(meta)


# --- the loader contract ---------------------------------------------------------------------


def test_three_domains_have_the_hub_metadata_shape(loaded, hub_metadata_keys):
    expected = {
        "code": [("sample/frozen-python-stdlib", None)],
        "math": [("sample/generated-math", "gsm8k-style"), ("sample/generated-math", "math-style")],
        "prose": [("sample/frozen-python-docs", "pydoc-topics")],  # 52K chars: one source
    }
    for domain, (texts, meta) in loaded.items():
        assert texts, domain
        assert set(meta) == hub_metadata_keys | {"source"}
        assert meta["source"] == "sample" and meta["domain"] == domain
        assert [(s["dataset"], s["config"]) for s in meta["sources"]] == expected[domain]
        for stats in meta["sources"]:
            assert set(stats) == STATS_KEYS
            assert stats["builder_name"] == "sample"
            assert stats["version"] == str(SAMPLE_VERSION)
            assert stats["split"] == "train" and stats["location"]
            assert stats["max_example_chars"] == 10_000
        json.dumps(meta)  # goes into the cache manifest


def test_budget_rule_and_totals(loaded):
    for domain, (texts, meta) in loaded.items():
        budget = meta["budget_chars"]
        assert budget == int(SIZE_MB * 1024 * 1024)
        assert meta["budget_met"] is True, domain
        assert meta["total_chars"] == sum(map(len, texts))
        assert meta["total_chars"] - len(texts[-1]) < budget <= meta["total_chars"]
        assert meta["num_texts"] == len(texts) == sum(s["num_examples"] for s in meta["sources"])
        assert meta["total_chars"] == sum(s["total_chars"] for s in meta["sources"])
        for stats in meta["sources"]:
            assert stats["num_rows_read"] >= 1 and stats["exhausted"] is False


def test_length_filters_hold_for_every_text(loaded):
    for domain, (texts, _) in loaded.items():
        assert all(LOW[domain] < len(t) < 10_000 for t in texts), domain
    for domain in DOMAINS:
        texts, meta = load_sample_domain(domain, mb(20_000), max_example_chars=300)
        assert texts and all(LOW[domain] < len(t) < 300 for t in texts), domain
        assert all(s["max_example_chars"] == 300 for s in meta["sources"])


def test_texts_are_reproducible(loaded):
    for domain in DOMAINS:
        assert load_sample_domain(domain, SIZE_MB) == loaded[domain]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="'poetry'"):
        load_sample_domain("poetry", 1)
    with pytest.raises(ValueError, match="size_mb"):
        load_sample_domain("code", 0)
    with pytest.raises(ValueError, match="max_example_chars=101"):
        load_sample_domain("code", 1, max_example_chars=101)
    with pytest.raises(ValueError, match="seed"):
        load_sample_domain("math", 1, seed=1.5)
    with pytest.raises(ValueError, match="keeps no text from 'sample/generated-math'"):
        load_sample_domain("math", 1, max_example_chars=100)  # every problem is longer


# --- code: stdlib files ------------------------------------------------------------------------


def test_code_reads_py_files_in_path_order_with_the_hub_filter(tmp_path, monkeypatch):
    """Files of 100, 101, max-1 and max characters: the two inside are kept, in path order;
    site-packages, __pycache__, non-.py and non-UTF-8 files are skipped."""
    files = {
        "b/z.py": "b" * 101,
        "a.py": "é" * 299,  # 299 characters, 598 bytes
        "b/a.py": "x" * 100,
        "c.py": "c" * 300,
        "site-packages/s.py": "s" * 150,
        "dist-packages/d.py": "d" * 150,
        "b/__pycache__/p.py": "p" * 150,
        "notes.txt": "t" * 150,
    }
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content, encoding="utf-8")
    (tmp_path / "bad.py").write_bytes(b"\xff" * 150)
    monkeypatch.setattr(sample, "stdlib_dir", lambda: tmp_path)
    texts, meta = load_sample_domain("code", 1, max_example_chars=300, sources=LIVE["code"])
    assert texts == ["é" * 299, "b" * 101]
    (stats,) = meta["sources"]
    assert stats["location"] == str(tmp_path)
    assert (stats["num_rows_read"], stats["num_examples"], stats["exhausted"]) == (5, 2, True)
    assert meta["budget_met"] is False


def test_live_code_texts_are_stdlib_files_as_they_are():
    """The live code reader reads the running Python's standard library (found here from a
    stdlib module's file, not from ``sample.stdlib_dir``): its .py files in path order, as they
    are."""
    root = Path(dataclasses.__file__).parent
    texts, meta = load_sample_domain("code", SIZE_MB, sources=LIVE["code"])
    assert meta["sources"][0]["location"] == str(root)
    skipped = {"site-packages", "dist-packages", "__pycache__"}
    paths = sorted(
        (p for p in root.rglob("*.py") if not skipped & set(p.relative_to(root).parts)),
        key=lambda p: p.relative_to(root).parts,
    )
    first = []
    for path in paths:
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if 100 < len(text) < 10_000:
            first.append(text)
        if len(first) == 5:
            break
    assert texts[:5] == first


# --- budget rule on controlled sources (prose readers patched) --------------------------------


def _para(n: int, label: str) -> str:
    """A one-line prose paragraph of exactly ``n`` characters."""
    text = (label + " " + "word " * n)[: n - 2] + "s."
    assert len(text) == n and "  " not in text
    return text


@pytest.fixture
def two_prose_sources(monkeypatch):
    """Three pydoc topics (two 300- and one 250-char paragraphs) and one distribution."""
    topics = {f"t{i}": _para(300 if i < 2 else 250, f"topic{i}") for i in range(3)}
    dist = sample.InstalledDistribution(
        "pkg", "1.0", _para(400, "pkg") + "\n\n" + _para(150, "short")
    )
    monkeypatch.setattr(sample, "_pydoc_topics", lambda: topics)
    monkeypatch.setattr(sample, "installed_distributions", lambda: [dist])
    return topics, dist


def test_budget_crossing_text_is_kept_and_reading_stops(two_prose_sources):
    topics, _ = two_prose_sources
    texts, meta = load_sample_domain("prose", mb(301), sources=LIVE["prose"])
    assert texts == [topics["t0"], topics["t1"]]  # 300 < 301 budget: the second crosses
    (stats,) = meta["sources"]  # the next source is never opened
    assert (stats["num_rows_read"], stats["exhausted"], meta["total_chars"]) == (2, False, 600)


def test_budget_reached_exactly_stops_there(two_prose_sources):
    texts, meta = load_sample_domain("prose", mb(600), sources=LIVE["prose"])
    assert len(texts) == 2 and (meta["total_chars"], meta["budget_met"]) == (600, True)
    assert len(meta["sources"]) == 1


def test_next_source_opens_when_one_runs_out_and_exhaustion_is_reported(two_prose_sources, caplog):
    topics, dist = two_prose_sources
    with caplog.at_level(logging.WARNING):
        texts, meta = load_sample_domain("prose", 1, sources=LIVE["prose"])
    pkg_text = "\n".join(prose_paragraphs(dist.description))  # both paragraphs packed
    assert texts == [*topics.values(), pkg_text]
    docs, pkgs = meta["sources"]
    assert (docs["dataset"], docs["num_rows_read"], docs["exhausted"]) == (
        "sample/python-docs",
        3,
        True,
    )
    assert (pkgs["dataset"], pkgs["num_rows_read"], pkgs["exhausted"]) == (
        "sample/package-descriptions",
        1,
        True,
    )
    assert meta["budget_met"] is False and meta["total_chars"] == sum(map(len, texts))
    total = f"{sum(map(len, texts)):,}"
    assert f"sample prose: sources ran out at {total} of 1,048,576 budgeted chara" in caplog.text


# --- math: generated ---------------------------------------------------------------------------

OP = r"(?:[-+*/^]|\\times|\\div|\\cdot)"
SIDE = rf"\d+(?:\s*{OP}\s*\d+)*"
# A chain of integer-expression sides joined by "=": not preceded by a word, digit, LaTeX
# brace or operator (then it would be the tail of a longer expression); a leading minus only
# right after "$" or "= "; not followed by more expression.
CHAIN = re.compile(
    rf"(?<![\w.^{{}}\\+*/-])(?<![-+*/^] )(?<!\\times )(?<!\\div )(?<!\\cdot )"
    rf"((?:(?<=\$)-|(?<== )-)?{SIDE}(?:\s*=\s*-?{SIDE})+)"
    rf"(?![\w^{{]|\.\d|\s*{OP})"
)
TOKEN = re.compile(rf"\s*(-?\d+|{OP})")


APPLY = {
    "^": lambda a, b: a ** int(b),
    "*": operator.mul,
    "\\times": operator.mul,
    "\\cdot": operator.mul,
    "/": operator.truediv,
    "\\div": operator.truediv,
    "+": operator.add,
    "-": operator.sub,
}
PRECEDENCE = (("^",), ("*", "\\times", "\\cdot", "/", "\\div"), ("+", "-"))


def evaluate(side: str) -> Fraction:
    """An integer expression, exactly: ``^`` before ``* / \\times \\div \\cdot`` before ``+ -``."""
    tokens = [m.group(1) for m in TOKEN.finditer(side)]
    assert "".join(tokens) == re.sub(r"\s+", "", side), side
    values = [Fraction(int(t)) for t in tokens[::2]]
    ops = tokens[1::2]
    for level in PRECEDENCE:
        i = 0
        while i < len(ops):
            if ops[i] in level:
                values[i : i + 2] = [APPLY[ops.pop(i)](values[i], values[i + 1])]
            else:
                i += 1
    (value,) = values
    return value


def checked_steps(text: str) -> list[Fraction]:
    """The value of every arithmetic chain in ``text`` (those with an operator); asserts that
    all sides of every chain agree and that every ``<number> = <number>`` lies in a chain."""
    results, covered = [], set()
    for match in CHAIN.finditer(text):
        sides = re.split(r"\s*=\s*", match.group(1))
        values = [evaluate(s) for s in sides]
        assert len(set(values)) == 1, f"wrong step {match.group(1)!r} in {text!r}"
        covered.update(range(*match.span(1)))
        if any(re.search(OP + r"\s*\d", s[1:]) for s in sides):
            results.append(values[-1])
    for equation in re.finditer(r"(?<![A-Za-z]\^)(?<!\w)\d+\s*=\s*-?\d", text):  # not a^2 = ..
        assert equation.start() in covered, f"unchecked {equation.group()!r} in {text!r}"
    return results


def test_step_checker_is_not_vacuous():
    assert checked_steps("So 4 * 3 = 12 and $84 - 2 \\times 36 = 12$ and $-8 \\div 2 = -4$.") == [
        12,
        12,
        -4,
    ]
    assert checked_steps("$2^2 \\cdot 3 = 12$, $3x + 5 = x$, $x^2 + 16 = y$") == [12]
    for wrong in ("4 * 3 = 13", "$6 \\times 8 \\div 2 = 48$", "$36 + 64 = 100 = 99$"):
        with pytest.raises(AssertionError, match="wrong step"):
            checked_steps(wrong)
    for hidden in ("$3x + 5 = 20$", "$\\tfrac12 \\times 6 \\times 8 = 24$", "4 * 3 = 12.5"):
        with pytest.raises(AssertionError, match="unchecked"):
            checked_steps(hidden)


def test_generated_math_arithmetic_checks_out():
    problems = [*itertools.islice(generate_math(0), 600), *itertools.islice(generate_math(7), 600)]
    assert [p.style for p in problems[:4]] == [GSM8K_STYLE, MATH_STYLE] * 2
    topics = {p.style: set() for p in problems}
    for p in problems:
        topics[p.style].add(p.topic)
        assert format_math(p) == f"Problem: {p.problem}\n\nSolution: {p.solution}"
        steps = checked_steps(p.solution)
        if p.style == GSM8K_STYLE:
            *lines, last_line = p.solution.split("\n")
            assert len(steps) == len(lines) >= 2, p  # one step a line
            assert last_line == f"#### {p.answer}"
            assert Fraction(int(p.answer)) == steps[-1]
        else:
            assert len(steps) >= 1, p
            assert "$" in p.problem and "$" in p.solution
            assert p.solution.count("\\boxed{") == 1
            assert f"\\boxed{{{p.answer}}}" in p.solution
            if re.fullmatch(r"-?\d+", p.answer):
                assert Fraction(int(p.answer)) == steps[-1], p
    assert len(topics[GSM8K_STYLE]) >= 5
    assert {"algebra", "number_theory", "counting_and_probability", "geometry"} == topics[
        MATH_STYLE
    ]


def test_generated_math_is_deterministic_by_seed():
    first = [format_math(p) for p in itertools.islice(generate_math(3), 200)]
    random.seed(12345)  # the global generator plays no part
    random.random()
    assert [format_math(p) for p in itertools.islice(generate_math(3), 200)] == first
    assert [format_math(p) for p in itertools.islice(generate_math(4), 200)] != first
    texts, meta = load_sample_domain("math", SIZE_MB, seed=3)
    assert len(texts) > 100 and texts[:100] == first[:100]
    assert load_sample_domain("math", SIZE_MB, seed=3) == (texts, meta)
    assert load_sample_domain("math", SIZE_MB, seed=4)[0] != texts
    assert [s["revision"] for s in meta["sources"]] == ["seed-3", "seed-3"]


# --- prose -------------------------------------------------------------------------------------

DOCUMENT = """\
Title of the project
====================

|badge| |other-badge|

[![Build](https://img.shields.io/b.svg)](https://ci.example.org)

<p align="center"><img src="logo.png"></p>

This package does one thing well: it turns long
lines into short ones, and it is
careful about it.

Install it like this::

    pip install something
    more --code here

.. code-block:: python

    print("never prose, even if it reads like it.")

## Usage

```python
def f(x):
    return x + 1
```

>>> f(1)
2

| column | table |
|--------|-------|
| a      | b     |

[reference]: https://example.org/ref

- A list item that says something useful about
  the package in a full sentence.
- Another item, also a sentence.
+ A plus-marked item is an item too.

+---------+-------+
| grid    | table |
+=========+=======+

   An indented paragraph of rendered documentation that reads as prose, so it stays.
"""


def test_prose_paragraphs_drop_code_headings_and_markup():
    assert list(prose_paragraphs(DOCUMENT)) == [
        "This package does one thing well: it turns long lines into short ones, and it is "
        "careful about it.",
        "Install it like this:",
        "A list item that says something useful about the package in a full sentence.",
        "Another item, also a sentence.",
        "A plus-marked item is an item too.",
        "An indented paragraph of rendered documentation that reads as prose, so it stays.",
    ]


def test_pack_paragraphs_stays_below_max():
    paragraphs = ["a" * 40, "b" * 40, "c" * 40, "d" * 200]
    assert list(pack_paragraphs(paragraphs, 100)) == [
        "a" * 40 + "\n" + "b" * 40,
        "c" * 40,
        "d" * 200,
    ]


def test_prose_corpus_has_no_code(caplog):
    with caplog.at_level(logging.WARNING):
        texts, meta = load_sample_domain("prose", 2)  # all of it on most machines
    assert texts and all(200 < len(t) < 10_000 for t in texts)
    for text in texts:
        assert "```" not in text and ">>>" not in text and "::=" not in text, text
        assert all(line == line.strip() and line for line in text.split("\n")), text
    # The pydoc topics are about 0.3 MiB: 2 MiB reads on into the package descriptions.
    [descriptions] = [
        s for s in meta["sources"] if s["dataset"] == "sample/frozen-package-descriptions"
    ]
    assert descriptions["num_rows_read"] >= 1 and descriptions["num_examples"] >= 1
    assert "package-descriptions.jsonl.xz" in descriptions["location"]


# --- identity ----------------------------------------------------------------------------------


def test_sample_identity_is_stable_and_follows_seed_and_budget():
    identity = sample_identity(0.05)
    assert sample_identity(0.05) == identity == sample_identity(0.05, seed=0)
    assert sample_identity(0.05, seed=1)["math"] != identity["math"]
    assert sample_identity(0.05, seed=1)["code"]["texts_sha256"] == identity["code"]["texts_sha256"]
    assert sample_identity(0.1) != identity
    for domain, ident in identity.items():
        texts, _ = load_sample_domain(domain, 0.05)
        assert ident == {
            "sample_version": SAMPLE_VERSION,
            "seed": 0,
            "num_texts": len(texts),
            "texts_sha256": sample.texts_digest(texts),
        }
    json.dumps(identity)


@pytest.fixture
def fresh_identity():
    sample.domain_identity.cache_clear()
    yield
    sample.domain_identity.cache_clear()


def test_sample_identity_ignores_what_is_installed(monkeypatch, fresh_identity):
    """The frozen corpus does not move when a package is installed or the stdlib differs, even
    at a budget that reads the package descriptions (the live readers do: next test)."""
    before = sample_identity(1.0)
    extra = sample.InstalledDistribution("aaa-new-package", "0.1", PROSE_PARAGRAPH)
    installed = sample.installed_distributions()
    monkeypatch.setattr(sample, "installed_distributions", lambda: [extra, *installed])
    monkeypatch.setattr(sample, "stdlib_dir", lambda: Path("/nonexistent"))
    sample.domain_identity.cache_clear()
    assert sample_identity(1.0) == before


def test_live_identity_ignores_distributions_it_never_reads(monkeypatch, fresh_identity):
    """Live prose: a package whose description the budget never reaches changes nothing."""
    before = sample.domain_identity("prose", 0.05, sources=LIVE["prose"])
    extra = sample.InstalledDistribution("aaa-new-package", "0.1", PROSE_PARAGRAPH)
    installed = sample.installed_distributions()
    monkeypatch.setattr(sample, "installed_distributions", lambda: [extra, *installed])
    sample.domain_identity.cache_clear()
    assert sample.domain_identity("prose", 0.05, sources=LIVE["prose"]) == before


def test_live_identity_follows_a_description_it_reads(monkeypatch, fresh_identity):
    before = sample.domain_identity("prose", 1.0, sources=LIVE["prose"])  # reads descriptions
    extra = sample.InstalledDistribution("aaa-new-package", "0.1", PROSE_PARAGRAPH)
    installed = sample.installed_distributions()
    monkeypatch.setattr(sample, "installed_distributions", lambda: [extra, *installed])
    sample.domain_identity.cache_clear()
    assert sample.domain_identity("prose", 1.0, sources=LIVE["prose"]) != before


PROSE_PARAGRAPH = "The quick brown fox jumps over the lazy dog near the quiet river bank. " * 6
