"""``bench_prepare.py --identity-cost``: what the token cache's content identity of a fresh
mirror copy costs (a warm ``prepare_domains`` whose per-file index knows none of the copy's
files hashes every data file once; later runs hash none)."""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prepare_stages import CACHE_DIR


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _time_copy(settings: Any, copy: Path, workdir: Path, hashed: list[int]) -> dict[str, Any]:
    """One fresh mirror copy: seconds of the first and a later warm ``prepare_domains``, of
    the request identity with and without the per-file index, and of the data files'
    identities on a fresh index (first and later), and the bytes the first run hashed."""
    from moe_emergence import files as files_module
    from moe_emergence.data.domains import domain_set
    from moe_emergence.data.prepare import describe_request, prepare_domains
    from moe_emergence.data.settings import DataSettings

    moved = DataSettings(**{**settings.to_dict(), "hub_mirror": str(copy)})
    hashed.clear()
    seconds, prepared = _timed(lambda s=moved: prepare_domains(s, show_progress=False))
    assert prepared.from_cache, "a fresh copy of the mirror must hit"
    out: dict[str, Any] = {"first": seconds, "first_bytes": sum(hashed)}
    hashed.clear()
    out["later"] = _timed(lambda s=moved: prepare_domains(s, show_progress=False))[0]
    assert not hashed, "an unchanged mirror must not be hashed again"
    out["later_identity"] = _timed(lambda s=moved: describe_request(s))[0]
    (workdir / CACHE_DIR / "file-index.json").unlink(missing_ok=True)
    out["first_identity"] = _timed(lambda s=moved: describe_request(s))[0]
    fresh = files_module.FileIndex(None)
    folders = [
        copy / src.dataset for srcs in domain_set("code_math_prose").values() for src in srcs
    ]

    def identities(index=fresh, folders=folders) -> list:
        return [files_module.folder_identity(f, index) for f in folders]

    out["files_first"] = _timed(identities)[0]
    out["files_later"] = _timed(identities)[0]
    return out


def _measure(args: argparse.Namespace, workdir: Path, hashed: list[int]) -> dict[str, Any]:
    """A cold prepare on one copy of the mirror, then ``--repeat`` fresh copies timed."""
    from moe_emergence.data.prepare import prepare_domains
    from moe_emergence.data.settings import DataSettings
    from moe_emergence.data.tokenize import load_tokenizer

    base = shutil.copytree(args.hub_mirror, workdir / "hub-0", symlinks=True)
    settings = DataSettings(
        size_mb=args.size_mb,
        block_size=args.block_size,
        tokenizer=args.tokenizer,
        hub_mirror=str(base),
        cache_dir=str(workdir / CACHE_DIR),
    )
    load_tokenizer(args.tokenizer)
    cold_s, _ = _timed(lambda: prepare_domains(settings, show_progress=False))
    runs = []
    for i in range(args.repeat):
        copy = shutil.copytree(args.hub_mirror, workdir / f"hub-{i + 1}", symlinks=True)
        runs.append(_time_copy(settings, copy, workdir, hashed))

    def median(key: str, digits: int = 4) -> float:
        return round(statistics.median(r[key] for r in runs), digits)

    return {
        "mirror_bytes_hashed": runs[-1]["first_bytes"],
        "cold_prepare_s": round(cold_s, 3),
        "warm_prepare_first_run_after_copy_s": median("first"),
        "warm_prepare_later_runs_s": median("later"),
        "request_identity_first_run_s": median("first_identity"),
        "request_identity_later_runs_s": median("later_identity"),
        "data_files_identity_first_run_s": median("files_first"),
        "data_files_identity_later_runs_s": median("files_later", 5),
    }


def run_identity_cost(args: argparse.Namespace) -> int:
    """Warm ``prepare_domains`` on a fresh copy of the mirror: the first run hashes every data
    file (the per-file index knows none of the copy's files), later runs hash none. Each
    figure is the median of ``--repeat`` runs; the tokenizer is loaded before timing."""
    from moe_emergence import files as files_module

    workdir = Path(tempfile.mkdtemp(prefix="bench_identity-"))
    hashed: list[int] = []
    real_sha = files_module.sha256_file

    def counting_sha(path: Path) -> str:
        hashed.append(path.stat().st_size)
        return real_sha(path)

    files_module.sha256_file = counting_sha
    try:
        summary = _measure(args, workdir, hashed)
    finally:
        files_module.sha256_file = real_sha
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(summary))
    return 0
