"""Streaming each domain from a hub-layout mirror: length filters, budget stop, GSM8K then
MATH round-robin, metadata, and bad values rejected before any dataset is opened."""

from __future__ import annotations

import logging

import datasets
import pytest
from helpers.mirror import MATH_SUBJECTS, build_hub_mirror

from moe_emergence.data.legacy import load_code_data, load_math_data, load_prose_data

MAX = 300  # max_example_chars used throughout: keeps the texts small
GSM_FORMAT = "Problem: {}\n\nSolution: {}"  # 21 characters around question and answer


def text(n: int, label: str = "") -> str:
    """A text of exactly ``n`` characters starting with ``label``."""
    assert len(label) <= n
    return (label + "x" * n)[:n]


def gsm_row(n: int, label: str = "q") -> tuple[str, str]:
    """A GSM8K (question, answer) row whose formatted text has exactly ``n`` characters."""
    question = text(n - 21 - 1, label)
    return question, "a"


def gsm_text(row: tuple[str, str]) -> str:
    return GSM_FORMAT.format(*row)


def math_rows(subject: str, count: int) -> list[tuple[str, str]]:
    return [(f"{subject}-{j}", "s") for j in range(count)]


def math_text(subject: str, j: int) -> str:
    return GSM_FORMAT.format(f"{subject}-{j}", "s")


def make_mirror(root, code=None, gsm8k=None, math=None, wiki=None) -> str:
    """A mirror with every default source; parts not given get a few valid rows.

    Every MATH subject needs at least one row: ``datasets`` cannot stream an empty parquet file.
    """
    code = [text(150, f"code{i}") for i in range(3)] if code is None else code
    gsm8k = [gsm_row(60, f"gsm{i}") for i in range(3)] if gsm8k is None else gsm8k
    math = {} if math is None else math
    math = {s: math.get(s, math_rows(s, 1)) for s in MATH_SUBJECTS}
    wiki = [text(250, f"wiki{i}") for i in range(3)] if wiki is None else wiki
    return str(build_hub_mirror(root, code, gsm8k, math, wiki))


def mb(chars: int) -> float:
    """The size_mb whose budget is exactly ``chars`` characters."""
    return chars / (1024 * 1024)


# --- length filters ------------------------------------------------------------------------


def test_code_keeps_strictly_between_100_and_max(tmp_path):
    edges = {n: text(n, f"c{n}") for n in (100, 101, MAX - 1, MAX)}
    mirror = make_mirror(tmp_path, code=list(edges.values()))
    texts, meta = load_code_data(1.0, MAX, hub_mirror=mirror, show_progress=False)
    assert texts == [edges[101], edges[MAX - 1]]
    (stream,) = meta["sources"]
    assert (stream["num_rows_read"], stream["num_examples"]) == (4, 2)


def test_prose_keeps_strictly_between_200_and_max(tmp_path):
    edges = {n: text(n, f"w{n}") for n in (200, 201, MAX - 1, MAX)}
    mirror = make_mirror(tmp_path, wiki=["", *edges.values()])
    texts, meta = load_prose_data(1.0, MAX, hub_mirror=mirror, show_progress=False)
    assert texts == [edges[201], edges[MAX - 1]]
    (stream,) = meta["sources"]
    assert (stream["num_rows_read"], stream["num_examples"]) == (5, 2)


def test_math_keeps_formatted_text_shorter_than_max(tmp_path):
    rows = [gsm_row(23, "s"), gsm_row(MAX - 1, "m"), gsm_row(MAX, "x")]
    assert [len(gsm_text(r)) for r in rows] == [23, MAX - 1, MAX]
    mirror = make_mirror(tmp_path, gsm8k=rows)
    texts, meta = load_math_data(1.0, MAX, hub_mirror=mirror, show_progress=False)
    gsm = meta["sources"][0]
    assert gsm["dataset"] == "openai/gsm8k"
    assert (gsm["num_rows_read"], gsm["num_examples"]) == (3, 2)
    assert texts[:2] == [gsm_text(rows[0]), gsm_text(rows[1])]
    assert gsm_text(rows[2]) not in texts


def test_texts_are_kept_exactly_as_read(tmp_path):
    code = "  \n" + text(150, "def f():") + "\n\n  "
    prose = " " + text(250, "The river") + " \n"
    row = ("  How many?  ", " 42 \n")
    mirror = make_mirror(tmp_path, code=[code], wiki=[prose], gsm8k=[row])
    kwargs = {"hub_mirror": mirror, "show_progress": False}
    assert load_code_data(mb(10), MAX, **kwargs)[0] == [code]
    assert load_prose_data(mb(10), MAX, **kwargs)[0] == [prose]
    formatted = "Problem:   How many?  \n\nSolution:  42 \n"
    assert load_math_data(mb(10), MAX, **kwargs)[0] == [formatted]


# --- budget ----------------------------------------------------------------------------------


def test_budget_stop_keeps_the_text_that_crosses_it(tmp_path):
    mirror = make_mirror(tmp_path, code=[text(150, f"c{i}") for i in range(20)])
    texts, meta = load_code_data(1000 / 1048576, MAX, hub_mirror=mirror, show_progress=False)
    assert len(texts) == 7 and sum(map(len, texts)) == 1050
    assert texts == [text(150, f"c{i}") for i in range(7)]
    assert meta["budget_chars"] == 1000
    assert (meta["num_texts"], meta["total_chars"], meta["budget_met"]) == (7, 1050, True)
    (stream,) = meta["sources"]
    assert stream["exhausted"] is False
    assert stream["num_rows_read"] == 7  # stops reading at the budget


def test_budget_reached_exactly_stops_there(tmp_path):
    """250-char texts, budget 1000: the fourth text brings the total to the budget, not below."""
    mirror = make_mirror(tmp_path, wiki=[text(250, f"w{i}") for i in range(6)])
    texts, meta = load_prose_data(mb(1000), MAX, hub_mirror=mirror, show_progress=False)
    assert len(texts) == 4
    assert (meta["total_chars"], meta["budget_met"]) == (1000, True)


def test_source_running_out_is_reported_exhausted(tmp_path, caplog):
    mirror = make_mirror(tmp_path, code=[text(150, f"c{i}") for i in range(3)])
    with caplog.at_level(logging.WARNING):
        texts, meta = load_code_data(mb(1000), MAX, hub_mirror=mirror, show_progress=False)
    assert len(texts) == 3
    assert (meta["total_chars"], meta["budget_met"]) == (450, False)
    assert meta["sources"][0]["exhausted"] is True
    assert "code: sources ran out at 450 of 1,000 budgeted characters" in caplog.text


# --- GSM8K, then MATH round-robin -------------------------------------------------------------


def test_gsm8k_alone_when_it_meets_the_budget(tmp_path):
    rows = [gsm_row(100, f"g{i}") for i in range(10)]
    mirror = make_mirror(tmp_path, gsm8k=rows)
    texts, meta = load_math_data(mb(500), MAX, hub_mirror=mirror, show_progress=False)
    assert texts == [gsm_text(r) for r in rows[:5]]
    assert [s["dataset"] for s in meta["sources"]] == ["openai/gsm8k"]
    assert meta["sources"][0]["exhausted"] is False
    assert not any("-0" in t for t in texts)  # no MATH problem ("<subject>-0")


def test_math_subjects_round_robin_after_gsm8k(tmp_path):
    counts = dict(zip(MATH_SUBJECTS, (3, 1, 2, 1, 4, 1, 2), strict=True))
    gsm = gsm_row(60, "gsm")
    mirror = make_mirror(
        tmp_path, gsm8k=[gsm], math={s: math_rows(s, n) for s, n in counts.items()}
    )
    texts, meta = load_math_data(1.0, MAX, hub_mirror=mirror, show_progress=False)
    expected = [gsm_text(gsm)]
    expected += [math_text(s, 0) for s in MATH_SUBJECTS]  # round 1: every subject
    expected += [math_text(s, 1) for s in ("algebra", "geometry", "number_theory", "precalculus")]
    expected += [math_text(s, 2) for s in ("algebra", "number_theory")]
    expected += [math_text("number_theory", 3)]
    assert texts == expected

    gsm_meta, *subjects = meta["sources"]
    assert gsm_meta["dataset"] == "openai/gsm8k" and gsm_meta["exhausted"] is True
    assert [s["dataset"] for s in subjects] == ["EleutherAI/hendrycks_math"] * 7
    assert [s["config"] for s in subjects] == list(MATH_SUBJECTS)
    assert [s["num_examples"] for s in subjects] == list(counts.values())
    assert all(s["exhausted"] for s in subjects)
    assert meta["budget_met"] is False


def test_math_round_robin_stops_mid_round_at_the_budget(tmp_path):
    gsm = gsm_row(60, "gsm")
    mirror = make_mirror(tmp_path, gsm8k=[gsm], math={s: math_rows(s, 3) for s in MATH_SUBJECTS})
    # the third subject's text crosses the budget and is the last one taken
    budget = 60 + len(math_text(MATH_SUBJECTS[0], 0)) + len(math_text(MATH_SUBJECTS[1], 0)) + 1
    texts, meta = load_math_data(mb(budget), MAX, hub_mirror=mirror, show_progress=False)
    assert texts == [gsm_text(gsm)] + [math_text(s, 0) for s in MATH_SUBJECTS[:3]]
    subjects = meta["sources"][1:]
    assert [s["num_examples"] for s in subjects] == [1, 1, 1, 0, 0, 0, 0]
    assert not any(s["exhausted"] for s in subjects)
    assert meta["budget_met"] is True


def test_math_row_failing_the_filter_is_skipped_within_its_turn(tmp_path):
    too_long = ("L" * MAX, "s")
    math = {s: math_rows(s, 1) for s in MATH_SUBJECTS}
    math["algebra"] = [too_long, ("algebra-1", "s")]  # the turn skips row 0, keeps row 1
    math["geometry"] = [too_long]  # nothing to keep: exhausted on its first turn
    gsm = gsm_row(60, "gsm")
    mirror = make_mirror(tmp_path, gsm8k=[gsm], math=math)
    texts, meta = load_math_data(1.0, MAX, hub_mirror=mirror, show_progress=False)
    expected = [gsm_text(gsm), math_text("algebra", 1)]
    expected += [math_text(s, 0) for s in MATH_SUBJECTS if s not in ("algebra", "geometry")]
    assert texts == expected
    read = {s["config"]: (s["num_rows_read"], s["num_examples"]) for s in meta["sources"][1:]}
    assert read["algebra"] == (2, 1)
    assert read["geometry"] == (1, 0)
    assert meta["sources"][1 + MATH_SUBJECTS.index("geometry")]["exhausted"] is True


# --- metadata ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loader", "builder", "min_chars", "first"),
    [
        (load_code_data, "json", 100, ("codeparrot/codeparrot-clean", None)),
        (load_math_data, "parquet", None, ("openai/gsm8k", "main")),
        (load_prose_data, "parquet", 200, ("Salesforce/wikitext", "wikitext-103-raw-v1")),
    ],
)
def test_stream_metadata_fields_and_domain_sums(tmp_path, loader, builder, min_chars, first):
    mirror = make_mirror(tmp_path)
    texts, meta = loader(1.0, MAX, hub_mirror=mirror, show_progress=False)
    assert (meta["sources"][0]["dataset"], meta["sources"][0]["config"]) == first
    assert meta["num_texts"] == len(texts) > 0
    assert meta["total_chars"] == sum(map(len, texts))
    assert meta["num_texts"] == sum(s["num_examples"] for s in meta["sources"])
    assert meta["total_chars"] == sum(s["total_chars"] for s in meta["sources"])
    assert (meta["size_mb"], meta["budget_chars"]) == (1.0, 1024 * 1024)
    for stream in meta["sources"]:
        assert stream["split"] == "train"
        assert stream["builder_name"] == builder
        assert isinstance(stream["version"], str) and stream["version"]
        assert stream["num_rows_read"] >= stream["num_examples"] > 0
        assert stream["min_example_chars"] == min_chars
        assert stream["max_example_chars"] == MAX
        assert stream["exhausted"] is True


def test_code_metadata_counts_the_dropped_rows(tmp_path):
    mirror = make_mirror(tmp_path, code=[text(150, "a"), text(50, "b"), text(160, "c")])
    _, meta = load_code_data(1.0, MAX, hub_mirror=mirror, show_progress=False)
    (stream,) = meta["sources"]
    assert (stream["num_examples"], stream["num_rows_read"], stream["total_chars"]) == (2, 3, 310)


# --- min_example_chars keyword -----------------------------------------------------------------


def test_code_min_example_chars_keyword(tmp_path):
    edges = {n: text(n, f"c{n}") for n in (50, 51, 100)}
    mirror = make_mirror(tmp_path, code=list(edges.values()))
    texts, meta = load_code_data(
        1.0, MAX, min_example_chars=50, hub_mirror=mirror, show_progress=False
    )
    assert texts == [edges[51], edges[100]]
    assert meta["sources"][0]["min_example_chars"] == 50


def test_prose_min_example_chars_keyword(tmp_path):
    edges = {n: text(n, f"w{n}") for n in (10, 11, 200)}
    mirror = make_mirror(tmp_path, wiki=list(edges.values()))
    texts, meta = load_prose_data(
        1.0, MAX, min_example_chars=10, hub_mirror=mirror, show_progress=False
    )
    assert texts == [edges[11], edges[200]]
    assert meta["sources"][0]["min_example_chars"] == 10


# --- bad values fail before any dataset is opened ----------------------------------------------


@pytest.fixture
def no_loading(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("datasets.load_dataset must not be called")

    monkeypatch.setattr(datasets, "load_dataset", fail)


@pytest.mark.parametrize("loader", [load_code_data, load_math_data, load_prose_data])
@pytest.mark.parametrize("size_mb", [0, -1, -0.5])
def test_size_mb_not_positive_is_rejected(tiny_mirror, no_loading, loader, size_mb):
    with pytest.raises(ValueError, match=rf"size_mb={size_mb}.*> 0.*e\.g\. 1, 5 or 10"):
        loader(size_mb, hub_mirror=str(tiny_mirror), show_progress=False)


@pytest.mark.parametrize(
    ("call", "value", "minimum"),
    [
        (lambda **kw: load_code_data(1.0, 100, **kw), 100, 100),
        (lambda **kw: load_code_data(1.0, 50, **kw), 50, 100),
        (lambda **kw: load_prose_data(1.0, 200, **kw), 200, 200),
        (lambda **kw: load_math_data(1.0, 0, **kw), 0, 0),
        (lambda **kw: load_code_data(1.0, 300, min_example_chars=300, **kw), 300, 300),
        (lambda **kw: load_prose_data(1.0, 250, min_example_chars=400, **kw), 250, 400),
    ],
)
def test_max_not_above_min_is_rejected(tiny_mirror, no_loading, call, value, minimum):
    with pytest.raises(ValueError) as excinfo:
        call(hub_mirror=str(tiny_mirror), show_progress=False)
    message = str(excinfo.value)
    assert f"max_example_chars={value}" in message
    assert f"minimum length {minimum}" in message
    assert f"Set max_example_chars to {minimum + 2} or more" in message


def test_max_one_above_min_keeps_nothing_and_is_rejected(tiny_mirror, no_loading):
    with pytest.raises(ValueError, match="max_example_chars=101"):
        load_code_data(1.0, 101, hub_mirror=str(tiny_mirror), show_progress=False)
