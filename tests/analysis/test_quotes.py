"""Quotes of an analyze summary in the docs: regenerated from summary.json and summary.md, and
a changed number is caught."""

from __future__ import annotations

import json

import pytest

from moe_emergence.analysis import quotes
from moe_emergence.errors import UserError

ROWS = [
    {"group": "condition=top1 - condition=frozen_router", "metric": "nmi", "layer": 2,
     "mean": 0.12345, "ci_low": 0.05, "ci_high": 0.2, "p": 0.004, "p_holm": 0.008, "n": 6,
     "detectable": 0.07, "values": [0.1, 0.2, None]},
    {"group": "condition=dense", "metric": "loss", "layer": None, "mean": 5.0449, "ci_low": 5.04,
     "ci_high": 5.05, "p": None, "p_holm": None, "n": 3, "detectable": None, "values": [5.0]},
]  # fmt: skip
NAMES = {"condition=top1 - condition=frozen_router": "top-1 - frozen router"}
MD = (
    "# Summary\n\n## Primary\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n### Detail\n\nx\n\n"
    "## Next\n\ny\n"
)


@pytest.fixture
def summary(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"rows": ROWS, "names": NAMES}))
    (tmp_path / "summary.md").write_text(MD)
    return quotes.Summary(tmp_path)


def test_cells_are_filled_by_name_or_key(summary):
    text = (
        "NMI <!-- cell top-1 - frozen router | nmi | 2 | mean | .3f -->?<!-- /cell --> "
        "<!-- cell top-1 - frozen router | nmi | 2 | ci | .2f -->?<!-- /cell -->, p_holm "
        "<!-- cell top-1 - frozen router | nmi | 2 | p_holm | .3f -->?<!-- /cell --> "
        "<!-- cell top-1 - frozen router | nmi | 2 | values | .1f -->?<!-- /cell --> "
        "<!-- cell condition=dense | loss | - | mean | .3f -->?<!-- /cell -->"
    )
    out = quotes.render(text, summary)
    assert out == (
        "NMI <!-- cell top-1 - frozen router | nmi | 2 | mean | .3f -->0.123<!-- /cell --> "
        "<!-- cell top-1 - frozen router | nmi | 2 | ci | .2f -->[0.05, 0.20]<!-- /cell -->, "
        "p_holm <!-- cell top-1 - frozen router | nmi | 2 | p_holm | .3f -->0.008<!-- /cell --> "
        "<!-- cell top-1 - frozen router | nmi | 2 | values | .1f -->(0.1, 0.2, n/a)<!-- /cell -->"
        " <!-- cell condition=dense | loss | - | mean | .3f -->5.045<!-- /cell -->"
    )
    assert quotes.stale_quotes(out, summary) == []
    assert quotes.render(out, summary) == out


def test_a_changed_number_or_section_is_stale(summary):
    text = quotes.render(
        "<!-- cell top-1 - frozen router | nmi | 2 | mean | .3f -->?<!-- /cell -->\n"
        "<!-- section summary.md ## Primary -->\n<!-- /section -->\n",
        summary,
    )
    assert "| 1 | 2 |\n\n### Detail\n\nx\n\n<!-- /section -->" in text and "## Next" not in text
    assert quotes.stale_quotes(text, summary) == []
    edited = text.replace("0.123", "0.124").replace("| 1 | 2 |", "| 1 | 3 |")
    stale = quotes.stale_quotes(edited, summary)
    assert len(stale) == 2 and "'0.124', summary '0.123'" in stale[0]


def test_bad_quotes_are_one_line_errors(summary):
    with pytest.raises(UserError, match="FIELD one of"):
        summary.cell("top-1 | nmi | 2 | median | .3f")
    with pytest.raises(UserError, match="no summary row for group 'top-2'"):
        summary.cell("top-2 | nmi | 2 | mean | .3f")
    with pytest.raises(UserError, match="no such heading"):
        summary.section("summary.md", "## Missing")


def test_the_cli_checks_and_rewrites(summary, tmp_path, capsys):
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- cell condition=dense | loss | - | mean | .2f -->5.00<!-- /cell -->\n")
    assert quotes.main([str(doc), "--summary", str(tmp_path), "--check"]) == 1
    assert "the doc says '5.00', summary '5.04'" in capsys.readouterr().out
    assert quotes.main([str(doc), "--summary", str(tmp_path)]) == 0
    assert quotes.main([str(doc), "--summary", str(tmp_path), "--check"]) == 0


def test_a_condition_and_its_own_initial_model_named_alike_are_quoted_apart(tmp_path):
    # summary.md names an initial model no other condition shares like its condition ("top-2"
    # in both the routing table and the step-0 table): a bare name must read the condition,
    # never the initial model's step-0 NMI, whichever comes last in summary.json's names.
    row = {"metric": "nmi", "layer": 2, "ci_low": None, "ci_high": None, "p": None,
           "p_holm": None, "n": 3, "detectable": None, "values": []}  # fmt: skip
    rows = [
        {**row, "group": "condition=top2", "mean": 0.5475},
        {**row, "group": "step 0: condition=top2", "mean": 0.0047},
    ]
    names = {"condition=top2": "top-2", "step 0: condition=top2": "top-2"}
    (tmp_path / "summary.json").write_text(json.dumps({"rows": rows, "names": names}))
    summary = quotes.Summary(tmp_path)
    final = quotes.render("<!-- cell top-2 | nmi | 2 | mean | .4f -->?<!-- /cell -->", summary)
    start = quotes.render(
        "<!-- cell step 0: top-2 | nmi | 2 | mean | .4f -->?<!-- /cell -->", summary
    )
    assert ">0.5475<" in final and ">0.0047<" in start
