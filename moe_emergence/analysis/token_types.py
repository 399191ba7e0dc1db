"""Model tokens of Python code by Python's own ``tokenize`` categories, and which experts
they go to.

Every character of the text gets the category of the Python token that covers it (keyword,
name, operator, number, string, comment); characters no Python token covers (spaces between
tokens) and NEWLINE/NL/INDENT/DEDENT are ``whitespace``. A model token (a character span) takes
the most frequent non-whitespace category among its characters (ties: the first), and is
``whitespace`` when all of them are; a token with an empty span (the second of two tokens
sharing one character) takes the previous token's category. Code that ``tokenize`` cannot
finish (partial snippets, bad indentation) keeps the categories found before the error; the
rest is ``whitespace`` or ``other`` (``other`` also holds ERRORTOKEN characters such as a
stray ``$``).
"""

from __future__ import annotations

import io
import keyword
import tokenize
from collections.abc import Sequence

import numpy as np

CATEGORIES = (
    "keyword",
    "name",
    "operator",
    "number",
    "string",
    "comment",
    "whitespace",
    "other",
)
WHITESPACE = CATEGORIES.index("whitespace")
OTHER = CATEGORIES.index("other")
_WHITESPACE_TOKENS = {"NEWLINE", "NL", "INDENT", "DEDENT", "ENDMARKER"}

__all__ = [
    "CATEGORIES",
    "char_categories",
    "format_type_table",
    "token_categories",
    "token_type_table",
]


def _python_category(tok: tokenize.TokenInfo) -> int:
    name = tokenize.tok_name[tok.type]
    if name == "NAME":
        return CATEGORIES.index("keyword" if keyword.iskeyword(tok.string) else "name")
    if name == "OP":
        return CATEGORIES.index("operator")
    if name == "NUMBER":
        return CATEGORIES.index("number")
    if name == "STRING" or name.startswith(("FSTRING_", "TSTRING_")):
        return CATEGORIES.index("string")
    if name == "COMMENT":
        return CATEGORIES.index("comment")
    if name in _WHITESPACE_TOKENS:
        return WHITESPACE
    return OTHER


def char_categories(text: str) -> np.ndarray:
    """int64 [len(text)]: each character's index into :data:`CATEGORIES`."""
    cats = np.array([WHITESPACE if c.isspace() else OTHER for c in text], dtype=np.int64)
    # Absolute offset of each line's start, lines split as StringIO.readline splits them.
    starts = [0]
    for line in io.StringIO(text):
        starts.append(starts[-1] + len(line))

    def offset(row: int, col: int) -> int:
        return min(starts[min(row - 1, len(starts) - 1)] + col, len(text))

    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            begin, end = offset(*tok.start), offset(*tok.end)
            if end > begin:
                cats[begin:end] = _python_category(tok)
    except (tokenize.TokenError, SyntaxError):
        pass  # partial code: keep what was found
    return cats


def token_categories(text: str, spans: Sequence[tuple[int, int]]) -> list[str]:
    """The category of each model token, given its character span ``(start, end)`` in
    ``text``."""
    cats = char_categories(text)
    out: list[str] = []
    for start, end in spans:
        if end <= start and out:  # the rest of a character the previous token began
            out.append(out[-1])
            continue
        found = [int(c) for c in cats[start:end] if c != WHITESPACE]
        if not found:
            out.append(CATEGORIES[WHITESPACE])
            continue
        counts = {c: found.count(c) for c in dict.fromkeys(found)}  # first-seen order
        out.append(CATEGORIES[max(counts, key=counts.__getitem__)])
    return out


def token_type_table(
    text: str,
    spans: Sequence[tuple[int, int]],
    experts: np.ndarray,
    n_experts: int,
) -> np.ndarray:
    """int64 [len(CATEGORIES), n_experts]: model tokens of each category sent to each expert.

    spans: one ``(start, end)`` character span per model token; experts: [T] or [T, k] (top-k:
    each of a token's k assignments counts once)."""
    chosen = np.asarray(experts, dtype=np.int64)
    chosen = chosen.reshape(len(chosen), -1)
    if len(chosen) != len(spans):
        raise ValueError(f"{len(spans)} token spans but experts for {len(chosen)} tokens")
    index = {c: i for i, c in enumerate(CATEGORIES)}
    rows = np.array([index[c] for c in token_categories(text, spans)], dtype=np.int64)
    table = np.zeros((len(CATEGORIES), n_experts), dtype=np.int64)
    np.add.at(table, (np.repeat(rows, chosen.shape[1]), chosen.reshape(-1)), 1)
    return table


def format_type_table(table: np.ndarray, title: str) -> str:
    """A plain-text table of :func:`token_type_table`'s counts (categories with no token
    left out), headed by ``title``."""
    n_experts = table.shape[1]
    header = f"{'category':<11}" + "".join(f"{f'e{e}':>6}" for e in range(n_experts))
    lines = [title, header + f"{'total':>7}"]
    for name, row in zip(CATEGORIES, table, strict=True):
        if row.sum():
            lines.append(f"{name:<11}" + "".join(f"{int(n):>6}" for n in row) + f"{row.sum():>7}")
    return "\n".join(lines)
