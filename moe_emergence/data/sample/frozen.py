"""The frozen sample corpus: fixed texts shipped in the package, the same on every machine.

The live readers (:mod:`moe_emergence.data.sample.corpus`) read this machine's standard library
and installed packages, so another Python or one more ``pip install`` changes the data. The
``sample`` domain set reads this snapshot of them instead, built once by
``python -m moe_emergence.data.sample.freeze`` and shipped in ``frozen/``:

- ``python-stdlib.jsonl.xz``: rows ``{"path", "text"}``, the stdlib's ``*.py`` files in the live
  reader's order with ``0 < len(text) < MAX_CHARS``, until those passing the code filter
  (``100 < len``) reach :data:`CODE_CHARS`;
- ``python-docs.jsonl.xz``, ``package-descriptions.jsonl.xz``: rows ``{"document",
  "paragraphs"}``, every pydoc topic and every installed distribution's description, already
  cleaned into paragraphs (:func:`~moe_emergence.data.sample.prose.prose_paragraphs`), so a
  change to the cleaning does not move them either;
- ``manifest.json``: how and where it was built (Python version, distributions digest, date)
  and each file's SHA-256, rows and characters; every read checks the SHA-256.

Texts are stored below :data:`MAX_CHARS` characters (the default ``max_example_chars``), so any
``max_example_chars`` up to it reads exactly what the live readers read on the building machine.
"""

from __future__ import annotations

import functools
import hashlib
import json
import lzma
from pathlib import Path
from typing import Any

from moe_emergence.errors import UserError

FROZEN_DIR = Path(__file__).parent / "frozen"
MANIFEST = "manifest.json"
MAX_CHARS = 10_000  # texts are shorter; a larger max_example_chars is refused
CODE_CHARS = 1024 * 1024  # code: 1 MiB of texts passing the filter (the prose is all there is)
FROZEN_NAMES = ("python-stdlib", "python-docs", "package-descriptions")


def frozen_file(name: str) -> Path:
    return FROZEN_DIR / f"{name}.jsonl.xz"


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@functools.cache
def manifest() -> dict[str, Any]:
    """The snapshot's ``manifest.json``."""
    path = FROZEN_DIR / MANIFEST
    if not path.is_file():
        raise UserError(
            f"The frozen sample corpus is missing ({path}): reinstall moe_emergence, or restore "
            "the folder with git (git checkout -- moe_emergence/data/sample/frozen)."
        )
    return json.loads(path.read_text(encoding="utf-8"))


@functools.cache
def frozen_rows(name: str) -> tuple[dict[str, Any], ...]:
    """The rows of snapshot file ``name`` (one of :data:`FROZEN_NAMES`), in order, after
    checking its SHA-256 against the manifest. Memoized per process (~0.1 s each)."""
    entry = manifest()["files"].get(name)
    path = frozen_file(name)
    if entry is None or not path.is_file() or file_sha256(path) != entry["sha256"]:
        raise UserError(
            f"The frozen sample file {path} is missing or does not match its manifest: restore "
            "it with git (git checkout -- moe_emergence/data/sample/frozen) or reinstall."
        )
    lines = lzma.decompress(path.read_bytes()).decode("utf-8").splitlines()
    return tuple(json.loads(line) for line in lines)


def write_frozen(name: str, rows: list[dict[str, Any]], folder: Path) -> dict[str, Any]:
    """Write ``rows`` as ``folder/<name>.jsonl.xz`` (xz preset 9, sorted keys: the same rows give
    the same bytes) and return its manifest entry."""
    data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    path = folder / f"{name}.jsonl.xz"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(lzma.compress(data.encode("utf-8"), preset=9))
    tmp.replace(path)
    chars = sum(len(r.get("text", "")) + sum(map(len, r.get("paragraphs", []))) for r in rows)
    return {"sha256": file_sha256(path), "rows": len(rows), "chars": chars}


__all__ = [
    "CODE_CHARS",
    "FROZEN_DIR",
    "FROZEN_NAMES",
    "MAX_CHARS",
    "frozen_file",
    "frozen_rows",
    "manifest",
    "write_frozen",
]
