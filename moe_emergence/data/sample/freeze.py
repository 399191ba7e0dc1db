"""Build the frozen sample corpus (:mod:`moe_emergence.data.sample.frozen`) from this machine's
live readers: ``python -m moe_emergence.data.sample.freeze [folder]`` (default: the package's
``frozen/``). A maintainer's tool: the shipped snapshot is what every run reads; rebuilding it
changes the ``sample`` data everywhere, so bump ``SAMPLE_VERSION`` and the fingerprint test with
it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from moe_emergence.data.sample.corpus import (
    _distributions_digest,
    _pydoc_topics,
    _python_files,
    installed_distributions,
    stdlib_dir,
)
from moe_emergence.data.sample.frozen import (
    CODE_CHARS,
    FROZEN_DIR,
    MANIFEST,
    MAX_CHARS,
    write_frozen,
)
from moe_emergence.data.sample.prose import prose_paragraphs

CODE_MIN_CHARS = 100  # conf/data/domains/sample.yaml's code filter, for the CODE_CHARS budget


def code_rows() -> list[dict[str, Any]]:
    """The stdlib's files as the live code reader walks them, ``0 < len < MAX_CHARS``, until
    the ones passing the code filter reach ``CODE_CHARS`` characters."""
    root, rows, kept = stdlib_dir(), [], 0
    for entry in _python_files(root):
        try:
            text = Path(entry.path).read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if 0 < len(text) < MAX_CHARS:
            rows.append({"path": Path(entry.path).relative_to(root).as_posix(), "text": text})
            kept += len(text) if len(text) > CODE_MIN_CHARS else 0
        if kept >= CODE_CHARS:
            break
    return rows


def prose_rows() -> dict[str, list[dict[str, Any]]]:
    """Every pydoc topic and installed distribution's description, cleaned into paragraphs."""
    topics = _pydoc_topics()
    return {
        "python-docs": [
            {"document": k, "paragraphs": list(prose_paragraphs(topics[k]))} for k in sorted(topics)
        ],
        "package-descriptions": [
            {
                "document": f"{d.name} {d.version}",
                "paragraphs": list(prose_paragraphs(d.description)),
            }
            for d in installed_distributions()
        ],
    }


def freeze(folder: Path) -> dict[str, Any]:
    """Write the snapshot's files and ``manifest.json`` into ``folder``; return the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    tables = {"python-stdlib": code_rows(), **prose_rows()}
    manifest = {
        "built_with": {
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "stdlib": str(stdlib_dir()),
            "distributions_digest": _distributions_digest(installed_distributions()),
            "date": datetime.date.today().isoformat(),
        },
        "max_chars": MAX_CHARS,
        "code_chars": CODE_CHARS,
        "files": {name: write_frozen(name, rows, folder) for name, rows in tables.items()},
    }
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MANIFEST)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", type=Path, default=FROZEN_DIR)
    args = parser.parse_args(argv)
    manifest = freeze(args.folder)
    json.dump(manifest, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
