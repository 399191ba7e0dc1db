"""The study's numbers in the README and docs/results.md are the committed summary's: every
quote marker (:mod:`moe_emergence.analysis.quotes`) holds what ``docs/study`` says."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_emergence.analysis import quotes

ROOT = Path(__file__).resolve().parents[1]
QUOTING = ("README.md", "docs/results.md")


@pytest.mark.parametrize("name", QUOTING)
def test_quoted_cells_and_tables_equal_the_committed_summary(name):
    summary = quotes.Summary(ROOT / quotes.DEFAULT_SUMMARY)
    text = (ROOT / name).read_text(encoding="utf-8")
    assert "<!-- cell " in text or "<!-- section " in text, f"{name} quotes nothing"
    stale = quotes.stale_quotes(text, summary)
    assert not stale, (
        f"{name}: quotes differ from docs/study (run python -m moe_emergence.analysis.quotes "
        f"{name}):\n" + "\n".join(stale)
    )
