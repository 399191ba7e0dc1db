"""Docs that quote an ``analyze`` summary, kept equal to it: numbers are generated, not typed.

A Markdown file marks what it quotes with HTML comments (invisible once rendered):

- a cell of ``summary.json``: ``<!-- cell GROUP | METRIC | LAYER | FIELD | FORMAT -->0.123<!--
  /cell -->``. GROUP is the condition as ``summary.md`` names it (``top-1``, ``top-1 - frozen
  router``; or the group's key); an initial model (summary.md's step-0 table) is ``step 0:``
  and its name (``step 0: top-2``), so a condition whose initial model is its own (named like
  it) is never read for it; LAYER is a number or ``-`` (no layer); FIELD one of
  :data:`FIELDS`: a row's ``mean``, ``ci_low``, ``ci_high``, ``p``, ``p_holm``, ``n``,
  ``detectable``, ``ci`` (``[low, high]``) or ``values`` (``(v1, v2, ...)``, seed order); FORMAT
  a Python format spec (``.3f``) applied to each number;
- a section of a file in the summary's folder, verbatim: ``<!-- section summary.md ### Primary
  -->...<!-- /section -->``: from the first line starting with the given heading text to the next
  heading of the same or a higher level.

``python -m moe_emergence.analysis.quotes [--check] [--summary DIR] FILE...`` rewrites what the
markers hold from the summary (default: the committed study, ``docs/study``) or, with
``--check``, exits 1 naming every quote that differs. ``tests/test_docs_quotes.py`` runs the
check on the README and docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moe_emergence.analysis.summary_groups import STEP0_PREFIX
from moe_emergence.errors import UserError

DEFAULT_SUMMARY = Path("docs/study")
FIELDS = ("mean", "ci_low", "ci_high", "p", "p_holm", "n", "detectable", "ci", "values")
_CELL = re.compile(r"<!-- cell (?P<spec>[^>]*?) -->(?P<body>.*?)<!-- /cell -->", re.DOTALL)
_SECTION = re.compile(
    r"<!-- section (?P<file>\S+) (?P<heading>[^>]*?) -->\n(?P<body>.*?)<!-- /section -->",
    re.DOTALL,
)
_HEADING = re.compile(r"^(#+) ")


def _number(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, fmt)


class Summary:
    """One ``analyze`` output folder: ``summary.json``'s rows, found by condition name."""

    def __init__(self, folder: Path) -> None:
        path = folder / "summary.json"
        if not path.is_file():
            raise UserError(f"--summary {folder}: no summary.json there: pass an analyze --out.")
        self.folder = folder
        document = json.loads(path.read_text(encoding="utf-8"))
        names: Mapping[str, str] = document.get("names", {})
        # An initial model shared by no other condition is named like its condition in
        # summary.md: its key starts with STEP0_PREFIX, and here its name does too.
        self.keys = {
            (STEP0_PREFIX + name if key.startswith(STEP0_PREFIX) else name): key
            for key, name in names.items()
        }
        self.rows = {(r["group"], r["metric"], r["layer"]): r for r in document["rows"]}

    def row(self, group: str, metric: str, layer: int | None) -> dict[str, Any]:
        key = self.keys.get(group, group)
        row = self.rows.get((key, metric, layer))
        if row is None:
            raise UserError(
                f"no summary row for group {group!r}, metric {metric!r}, layer {layer} in "
                f"{self.folder / 'summary.json'}: fix the quote or re-run analyze."
            )
        return row

    def cell(self, spec: str) -> str:
        """The text of a ``cell`` marker's ``GROUP | METRIC | LAYER | FIELD | FORMAT``."""
        parts = [p.strip() for p in spec.split("|")]
        if len(parts) != 5 or parts[3] not in FIELDS:
            raise UserError(
                f"quote 'cell {spec}': write GROUP | METRIC | LAYER | FIELD | FORMAT, FIELD one "
                f"of {', '.join(FIELDS)}."
            )
        group, metric, layer, field, fmt = parts
        row = self.row(group, metric, None if layer == "-" else int(layer))
        if field == "ci":
            return f"[{_number(row['ci_low'], fmt)}, {_number(row['ci_high'], fmt)}]"
        if field == "values":
            return "(" + ", ".join(_number(v, fmt) for v in row["values"]) + ")"
        return _number(row[field], fmt)

    def section(self, file: str, heading: str) -> str:
        """The lines of ``file`` from the one starting with ``heading`` to the next heading of
        its level or higher (exclusive), with a trailing newline."""
        path = self.folder / file
        lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
        start = next((i for i, line in enumerate(lines) if line.startswith(heading)), None)
        if start is None:
            raise UserError(f"quote 'section {file} {heading}': no such heading in {path}.")
        level = len(_HEADING.match(heading).group(1)) if _HEADING.match(heading) else 6
        end = start + 1
        while end < len(lines):
            found = _HEADING.match(lines[end])
            if found and len(found.group(1)) <= level:
                break
            end += 1
        return "\n".join(lines[start:end]).rstrip() + "\n\n"


def render(text: str, summary: Summary) -> str:
    """``text`` with every marker's content regenerated from ``summary``."""
    text = _CELL.sub(
        lambda m: f"<!-- cell {m['spec']} -->{summary.cell(m['spec'])}<!-- /cell -->", text
    )
    return _SECTION.sub(
        lambda m: (
            f"<!-- section {m['file']} {m['heading']} -->\n"
            f"{summary.section(m['file'], m['heading'])}<!-- /section -->"
        ),
        text,
    )


def stale_quotes(text: str, summary: Summary) -> list[str]:
    """The markers of ``text`` whose content differs from ``summary``'s: one line each."""
    stale = []
    for match in _CELL.finditer(text):
        want = summary.cell(match["spec"])
        if match["body"] != want:
            stale.append(f"cell {match['spec']}: the doc says {match['body']!r}, summary {want!r}")
    for match in _SECTION.finditer(text):
        if match["body"] != summary.section(match["file"], match["heading"]):
            stale.append(f"section {match['file']} {match['heading']}: differs from the summary")
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moe_emergence.analysis.quotes", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("files", nargs="+", type=Path, help="Markdown files with quotes")
    parser.add_argument("--summary", type=Path, default=DEFAULT_SUMMARY, help="analyze --out")
    parser.add_argument("--check", action="store_true", help="report differences, change nothing")
    args = parser.parse_args(argv)
    summary = Summary(args.summary)
    status = 0
    for file in args.files:
        text = file.read_text(encoding="utf-8")
        if args.check:
            for line in stale_quotes(text, summary):
                print(f"{file}: {line}")
                status = 1
        elif (new := render(text, summary)) != text:
            file.write_text(new, encoding="utf-8")
            print(f"{file}: quotes rewritten")
    return status


if __name__ == "__main__":
    sys.exit(main())
