"""Prose cleaning for the offline sample: reST / Markdown / plain text documents into one-line
paragraphs of prose (code, headings, tables, HTML, badges, link references and paragraphs that
do not read as prose removed; see :func:`prose_paragraphs`)."""

from __future__ import annotations

import re
from collections.abc import Iterator

_FENCE = re.compile(r"^\s*(```|~~~)")
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_UNDERLINE = re.compile(r"^\s*([=\-~^*#\"+`'.:_])\1{2,}\s*$")
_DROP_LINE = re.compile(
    r"""^\s*(?:
        \#{1,6}(?:\s|$)             # Markdown heading
      | \| | \+[-=]                 # table row or border, reST substitution line
      | =+(?:\s+=+)+\s*$            # reST simple-table border
      | \[[^\]]+\]:\s*\S            # Markdown link reference
      | <                           # HTML
      | !?\[!\[                     # badge
      | !\[                         # image
      | (?:https?|ftp)://\S+\s*$    # bare URL
    )""",
    re.VERBOSE,
)
_BULLET = re.compile(r"^(?:[-*+\u2022]|\d{1,3}[.)]|\(\d{1,3}\))\s+")
_MD_IMAGE = re.compile(r"!\[[^\]]*\]\([^)]*\)")
_MD_LINK = re.compile(r"\[([^\]]+)\](?:\([^)]*\)|\[[^\]]*\])")  # [text](url), [text][ref]
_RST_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`__?")
_PROSE_CHARS = re.compile(r"[A-Za-z\s,.;:'\"()?!\-\u2019]")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _drop_fences(lines: list[str]) -> list[str]:
    """``lines`` with Markdown fenced blocks (``` or ~~~, through the closing fence) blanked."""
    out: list[str] = []
    fence: str | None = None
    for line in lines:
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        else:
            out.append("" if fence else line)
            continue
        out.append("")
    return out


def _drop_lines(lines: list[str]) -> list[str]:
    """Headings (Markdown, and reST/setext titles with their under/overlines), tables, HTML,
    badges, link references and bare URLs blanked."""
    out = list(lines)
    for i, line in enumerate(lines):
        if _UNDERLINE.match(line):
            out[i] = ""
            if i > 0 and lines[i - 1].strip() and not _UNDERLINE.match(lines[i - 1]):
                out[i - 1] = ""  # the title above an underline
        elif _DROP_LINE.match(line):
            out[i] = ""
    return out


def _blocks(lines: list[str]) -> Iterator[list[str]]:
    """Runs of non-blank lines."""
    block: list[str] = []
    for line in [*lines, ""]:
        if line.strip():
            block.append(line)
        elif block:
            yield block
            block = []


def _split_items(block: list[str]) -> Iterator[list[str]]:
    """A block split where a list item starts (``- ``, ``* ``, ``1. `` ...), markers removed."""
    item: list[str] = []
    for line in block:
        bullet = _BULLET.match(line.lstrip())
        if bullet and item:
            yield item
            item = []
        item.append(line.lstrip()[bullet.end() :] if bullet else line.strip())
    if item:
        yield item


def _reads_as_prose(text: str) -> bool:
    """Mostly (90%) letters, spaces and punctuation, ending like a sentence (``.!?:``, maybe
    inside closing quotes or brackets); no grammar rules (``::=``)."""
    if not text.rstrip(")]\"'\u201d\u2019*_").endswith((".", "!", "?", ":")) or "::=" in text:
        return False
    return len(_PROSE_CHARS.findall(text)) >= 0.9 * len(text)


def _is_code_block(block: list[str]) -> bool:
    return any(">>>" in line or "```" in line for line in block) or any(
        line.lstrip().startswith(("$ ", "% ", "... ")) for line in block
    )


def prose_paragraphs(document: str) -> Iterator[str]:
    """The prose paragraphs of a reST, Markdown or plain-text ``document``, one line each.

    A block indented deeper than the paragraph before it is dropped when that paragraph ends
    with ``:`` (a literal block in reST, code in rendered docs and READMEs) or is a reST
    directive or comment (``.. name::``); other indented blocks are kept when they read as
    prose (indented paragraphs of rendered docs). Only paragraphs that read as prose remain.
    """
    lines = _drop_lines(_drop_fences(_HTML_COMMENT.sub("", document).expandtabs(8).splitlines()))
    literal_above: int | None = None  # blocks indented deeper than this are literal
    for block in _blocks(lines):
        indent = _indent(block[0])
        if literal_above is not None and indent > literal_above:
            continue
        literal_above = None
        first = block[0].strip()
        if first.startswith(".."):
            literal_above = indent
            continue
        if block[-1].rstrip().endswith(":"):
            literal_above = indent
        if _is_code_block(block):
            continue
        for item in _split_items(block):
            text = " ".join(" ".join(item).split())
            text = _RST_LINK.sub(r"\1", _MD_LINK.sub(r"\1", _MD_IMAGE.sub("", text)))
            text = text.removesuffix("::") + (":" if text.endswith("::") else "")
            if _reads_as_prose(text):
                yield text
