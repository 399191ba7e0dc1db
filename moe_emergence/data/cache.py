"""The token cache: each domain's token stream tokenized once, reused by every run.

Layout of ``<cache_dir>/<fingerprint>/``::

    manifest.json          what was built from what (written last)
    <domain>.tokens.bin    raw token ids, manifest["dtype"] (uint16 while vocab < 65,536)
    <domain>.offsets.bin   int64, num_texts + 1 entries: text i is tokens[off[i]:off[i+1]]

The fingerprint hashes everything that changes the tokens (sources, budget, filters, templates,
tokenizer identity) and nothing applied afterwards (block_size, seed, balance). A cache is
built in ``.<fingerprint>.tmp-*`` and renamed into place complete; a file lock per fingerprint
makes a second process wait and then read. Files whose size or checksum disagree with the
manifest are rebuilt with a warning.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from moe_emergence.data.files import atomic_write_text, build_folder_once
from moe_emergence.data.tokenize import TokenStream, iter_token_batches, token_dtype, untruncated

log = logging.getLogger(__name__)

CACHE_ENV = "MOE_CACHE_DIR"
DEFAULT_CACHE_DIR = Path(".cache") / "moe_emergence"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REBUILD_HINT = "pass --rebuild-cache (config: data.rebuild_cache=true) to rebuild it"


class CacheCorruptError(RuntimeError):
    """A cache file disagrees with its manifest."""


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$MOE_CACHE_DIR``, else ``.cache/moe_emergence`` in the cwd."""
    return Path(cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR)


def tokenizer_identity(tokenizer, name: str) -> dict[str, Any]:
    """Name, sizes and a SHA-256 of the tokenizer's full definition (vocab, merges, rules).

    Truncation and padding are left out of the hash: packing turns both off.
    """
    with untruncated(tokenizer) as backend:
        definition = backend.to_str().encode()
    return {
        "name": name,
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "sha256": hashlib.sha256(definition).hexdigest(),
    }


def fingerprint(inputs: Mapping[str, Any]) -> str:
    """A 16-hex-digit hash of the JSON form of ``inputs`` (keys sorted)."""
    blob = json.dumps({"format_version": FORMAT_VERSION, **inputs}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class DomainInput:
    """One domain to tokenize: its texts and the loader's metadata."""

    name: str
    texts: Iterable[str]
    metadata: Mapping[str, Any]


@dataclass
class TokenCache:
    """An opened, verified cache folder."""

    path: Path
    manifest: dict[str, Any]
    built_now: bool

    @property
    def domains(self) -> list[str]:
        return list(self.manifest["domains"])

    def streams(self) -> dict[str, TokenStream]:
        """Read-only memory maps of every domain's tokens and offsets (no copy)."""
        dtype = np.dtype(self.manifest["dtype"])
        out = {}
        for domain, entry in self.manifest["domains"].items():
            out[domain] = TokenStream(
                tokens=_memmap(self.path / entry["tokens_file"], dtype, entry["num_tokens"]),
                doc_offsets=_memmap(
                    self.path / entry["offsets_file"], np.dtype(np.int64), entry["num_texts"] + 1
                ),
            )
        return out

    @property
    def metadata(self) -> dict[str, Any]:
        return {d: e["metadata"] for d, e in self.manifest["domains"].items()}


def _memmap(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    if count == 0:
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def verify(path: Path) -> dict[str, Any]:
    """Load ``path``'s manifest and check every file's size and SHA-256 against it."""
    manifest = json.loads((path / MANIFEST).read_text())
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for domain, entry in manifest["domains"].items():
        for kind, count, size in (
            ("tokens", entry["num_tokens"], itemsize),
            ("offsets", entry["num_texts"] + 1, 8),
        ):
            file = path / entry[f"{kind}_file"]
            actual = file.stat().st_size if file.exists() else -1
            if actual != count * size:
                raise CacheCorruptError(
                    f"{file} has {actual} bytes, the manifest says {count * size} ({domain})"
                )
            if _sha256_file(file) != entry[f"{kind}_sha256"]:
                raise CacheCorruptError(f"{file} does not match its checksum ({domain})")
    return manifest


class _HashingWriter:
    """Appends arrays to a file, hashing the bytes as they go."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("wb")
        self._sha = hashlib.sha256()
        self.count = 0

    def write(self, array: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(array)).cast("B")
        self._file.write(data)
        self._sha.update(data)
        self.count += len(array)

    def close(self) -> str:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self._sha.hexdigest()


def _write_domain(
    folder: Path, domain: DomainInput, tokenizer, show_progress: bool
) -> dict[str, Any]:
    tokens_out = _HashingWriter(folder / f"{domain.name}.tokens.bin")
    offsets_out = _HashingWriter(folder / f"{domain.name}.offsets.bin")
    offsets_out.write(np.zeros(1, dtype=np.int64))
    position = 0
    total = len(domain.texts) if hasattr(domain.texts, "__len__") else None
    bar = tqdm(
        total=total, unit="text", desc=f"tokenize {domain.name}",
        disable=not show_progress, leave=False,
    )  # fmt: skip
    with bar:
        for tokens, lengths in iter_token_batches(domain.texts, tokenizer):
            tokens_out.write(tokens)
            offsets_out.write(position + np.cumsum(lengths))
            position += int(lengths.sum())
            bar.update(len(lengths))
    return {
        "tokens_file": tokens_out.path.name,
        "num_tokens": tokens_out.count,
        "tokens_sha256": tokens_out.close(),
        "offsets_file": offsets_out.path.name,
        "num_texts": offsets_out.count - 1,
        "offsets_sha256": offsets_out.close(),
        "metadata": dict(domain.metadata),
    }


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("moe_emergence", "datasets", "tokenizers", "transformers", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def build_cache(
    folder: Path,
    domains: Iterable[DomainInput],
    tokenizer,
    inputs: Mapping[str, Any],
    show_progress: bool = False,
) -> dict[str, Any]:
    """Tokenize ``domains`` into ``folder`` (which must be empty) and write its manifest last."""
    entries = {d.name: _write_domain(folder, d, tokenizer, show_progress) for d in domains}
    manifest = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint(inputs),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "dtype": token_dtype(len(tokenizer)).name,
        "tokenizer": inputs.get("tokenizer"),
        "library_versions": library_versions(),
        "inputs": dict(inputs),
        "domains": entries,
    }
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def _try_open(path: Path) -> dict[str, Any] | None:
    """The verified manifest, None when there is no cache; warns and returns None if corrupt."""
    if not (path / MANIFEST).exists():
        return None
    try:
        return verify(path)
    except (CacheCorruptError, OSError, ValueError, KeyError) as exc:
        log.warning("Token cache %s is damaged (%s); rebuilding it.", path, exc)
        return None


def ensure_cache(
    cache_dir: str | os.PathLike | None,
    inputs: Mapping[str, Any],
    make_domains: Callable[[], Iterable[DomainInput]],
    tokenizer,
    rebuild: bool = False,
    show_progress: bool = False,
) -> TokenCache:
    """Open the cache for ``inputs``, building it first when missing, damaged or ``rebuild``.

    ``make_domains`` is called only when building (it streams the datasets). Safe to call from
    several processes at once: one builds, the others wait on the lock, then read.
    """
    root = resolve_cache_dir(cache_dir)
    path = root / fingerprint(inputs)
    found: dict[str, Any] = {}

    def ready(folder: Path) -> bool:
        found["manifest"] = _try_open(folder)
        return found["manifest"] is not None

    def build(folder: Path) -> None:
        found["manifest"] = build_cache(folder, make_domains(), tokenizer, inputs, show_progress)

    built = build_folder_once(path, build, ready, rebuild=rebuild)
    return TokenCache(path, found["manifest"], built_now=built)
