"""The token cache: each domain's token stream tokenized once, reused by every run.

Layout of ``<cache_dir>/<fingerprint>/``::

    manifest.json          what was built from what (written last)
    <domain>.tokens.bin    raw token ids, manifest["dtype"] (uint16 while vocab < 65,536)
    <domain>.offsets.bin   int64, num_texts + 1 entries: text i is tokens[off[i]:off[i+1]]

The fingerprint hashes everything that changes the tokens (sources with their content
identity, budget, filters, templates, the tokenizer's definition) and nothing applied afterwards
(block_size, seed, balance), nor where any file lives. A cache is built in
``.<fingerprint>.tmp-*`` and renamed into place complete; a file lock per fingerprint makes a
second process wait and then read.

A folder proves its contents before it is used: its manifest has the expected shape, names this
folder's fingerprint, records exactly the requested inputs and every domain, and every file has
the size its manifest implies (count x item size). That is all a hit costs (a few ``stat``
calls): file contents are hashed only right after a build (the fresh files are read back against
the checksums written into the manifest, before the folder is renamed into place) and on a hit
when asked (``verify_files=True``: the ``verify_cache`` setting), which compares
every file's SHA-256 too. Anything that fails a check is rebuilt with a warning; a fresh build that
does not read back as written raises CacheCorruptError.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from moe_emergence.data.checks import SettingError, is_int
from moe_emergence.data.settings import option
from moe_emergence.data.tokenize import TokenStream, iter_token_batches, token_dtype, untruncated
from moe_emergence.errors import UserError
from moe_emergence.files import build_folder_once, sha256_file, write_atomic
from moe_emergence.hub import is_hub_id
from moe_emergence.versions import library_versions

log = logging.getLogger(__name__)

CACHE_ENV = "MOE_CACHE_DIR"
DEFAULT_CACHE_DIR = Path(".cache") / "moe_emergence"
FORMAT_VERSION = 2  # 2: content identity of the sources, tokenizer definition without name
MANIFEST = "manifest.json"


class CacheCorruptError(RuntimeError):
    """A cache file disagrees with its manifest."""


class CacheWriteError(SettingError, OSError):
    """The token cache folder cannot be created or written (a file, no space, read-only);
    about the ``cache_dir`` setting when that chose the folder."""


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$MOE_CACHE_DIR``, else ``.cache/moe_emergence`` in the cwd."""
    return Path(cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR)


def _chosen_by(cache_dir: str | os.PathLike | None) -> tuple[str, str | None]:
    """What set the cache root, for messages, and the setting it is (None: not a setting)."""
    if cache_dir:
        return "cache_dir", "cache_dir"
    return (f"${CACHE_ENV}" if os.environ.get(CACHE_ENV) else "the default cache dir"), None


def check_cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root; CacheWriteError when it, or a folder above it, is not a folder."""
    root = resolve_cache_dir(cache_dir)
    for path in (root, *root.parents):
        if path.exists() or path.is_symlink():
            if path.is_dir():
                return root
            where = "is a file" if path == root else f"lies under '{path}', which is a file"
            what, field = _chosen_by(cache_dir)
            raise CacheWriteError(
                f"{what} '{root}' {where}: pass a folder for the token cache (it is created "
                f"when missing), e.g. {DEFAULT_CACHE_DIR}.",
                field,
            )
    return root


# errno values that mean "this folder cannot take the cache", and the fix for each.
_WRITE_FIXES = {
    errno.ENOSPC: "free disk space there",
    errno.EDQUOT: "free disk space (quota) there",
    errno.EACCES: "make it writable",
    errno.EPERM: "make it writable",
    errno.EROFS: "use a writable disk",
}


@contextlib.contextmanager
def writing_cache(root: Path, cache_dir: str | os.PathLike | None = None) -> Iterator[None]:
    """Turn an OSError of writing under ``root`` (no space, not writable, read-only) into a
    one-line CacheWriteError naming it; other errors (e.g. reading a dataset) pass."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, UserError) or exc.errno not in _WRITE_FIXES:
            raise
        if exc.filename is not None and not _is_under(Path(str(exc.filename)), root):
            raise
        reason = exc.strerror or os.strerror(exc.errno)
        what, field = _chosen_by(cache_dir)
        raise CacheWriteError(
            f"Cannot write the token cache in '{root}' ({reason}): "
            f"{_WRITE_FIXES[exc.errno]} or pass another {what}; the unfinished build was removed.",
            field,
        ) from exc


def _is_under(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root.resolve())
    except OSError:
        return False


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


def tokenizer_definition(info: Mapping[str, Any]) -> dict[str, Any]:
    """The part of :func:`tokenizer_identity` that decides the tokens (all but its name)."""
    return {k: v for k, v in info.items() if k != "name"}


def fingerprint(inputs: Mapping[str, Any]) -> str:
    """A 16-hex-digit hash of the JSON form of ``inputs`` (keys sorted)."""
    blob = json.dumps({"format_version": FORMAT_VERSION, **inputs}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class DomainInput:
    """One domain to tokenize: its texts and the loader's metadata."""

    name: str
    texts: Iterable[str]
    metadata: Mapping[str, Any]


@dataclass
class TokenCache:
    """An opened, checked cache folder."""

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


def as_json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(value))


def _is_count(value: Any) -> bool:
    return is_int(value) and value >= 0


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in HEX for c in value)


HEX = frozenset("0123456789abcdef")
DOMAIN_KEYS = (
    "tokens_file",
    "num_tokens",
    "tokens_sha256",
    "offsets_file",
    "num_texts",
    "offsets_sha256",
    "metadata",
)


def check_manifest(
    manifest: Any, path: Path, inputs: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Raise CacheCorruptError unless ``manifest`` has the expected shape, belongs to folder
    ``path`` (its fingerprint is the folder's name and the hash of its recorded inputs), records
    ``inputs`` when given, and has exactly one well-formed entry per domain of its inputs."""
    if not isinstance(manifest, dict):
        raise CacheCorruptError(f"the manifest is {type(manifest).__name__}, not an object")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheCorruptError(f"format version {manifest.get('format_version')!r}")
    recorded = manifest.get("inputs")
    if not isinstance(recorded, dict) or not isinstance(recorded.get("sources"), dict):
        raise CacheCorruptError("the manifest records no inputs")
    if not manifest.get("fingerprint") == fingerprint(recorded) == path.name:
        raise CacheCorruptError(
            f"it was built for fingerprint {manifest.get('fingerprint')!r}, not {path.name!r} "
            f"(a copied or linked folder?)"
        )
    if inputs is not None and recorded != as_json(inputs):
        raise CacheCorruptError("its recorded inputs differ from this request")
    info = manifest.get("tokenizer")
    vocab = info.get("vocab_size") if isinstance(info, dict) else None
    if not _is_count(vocab) or manifest.get("dtype") != token_dtype(vocab).name:
        raise CacheCorruptError(f"dtype {manifest.get('dtype')!r} for vocab size {vocab!r}")
    domains = manifest.get("domains")
    if not isinstance(domains, dict) or set(domains) != set(recorded["sources"]):
        found = sorted(domains) if isinstance(domains, dict) else domains
        raise CacheCorruptError(f"domains {found!r}, expected {sorted(recorded['sources'])}")
    for domain, entry in domains.items():
        if (
            not isinstance(entry, dict)
            or any(k not in entry for k in DOMAIN_KEYS)
            or entry["tokens_file"] != f"{domain}.tokens.bin"
            or entry["offsets_file"] != f"{domain}.offsets.bin"
            or not (_is_count(entry["num_tokens"]) and _is_count(entry["num_texts"]))
            or not (_is_sha256(entry["tokens_sha256"]) and _is_sha256(entry["offsets_sha256"]))
            or not isinstance(entry["metadata"], dict)
        ):
            raise CacheCorruptError(f"the manifest's entry for {domain!r} is malformed")
    return manifest


def read_manifest(path: Path) -> Any:
    """The parsed ``manifest.json`` of folder ``path`` (any JSON value; shape not checked)."""
    return json.loads((path / MANIFEST).read_text())


def check_files(path: Path, manifest: Mapping[str, Any], checksums: bool = False) -> None:
    """Raise CacheCorruptError unless every file of the (checked) ``manifest`` exists in
    ``path`` with the size its count implies and each domain's offsets run from 0 to its token
    count (their first and last values read); with ``checksums``, also its recorded SHA-256."""
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for domain, entry in manifest["domains"].items():
        for kind, count, size in (
            ("tokens", entry["num_tokens"], itemsize),
            ("offsets", entry["num_texts"] + 1, 8),
        ):
            file = path / entry[f"{kind}_file"]
            if not file.is_file():
                raise CacheCorruptError(f"{file} is missing ({domain})")
            actual = file.stat().st_size
            if actual != count * size:
                raise CacheCorruptError(
                    f"{file} has {actual} bytes, the manifest says {count * size} ({domain})"
                )
            if checksums and sha256_file(file) != entry[f"{kind}_sha256"]:
                raise CacheCorruptError(f"{file} does not match its checksum ({domain})")
        ends = _offset_ends(path / entry["offsets_file"])
        if ends != (0, entry["num_tokens"]):
            raise CacheCorruptError(
                f"{domain}'s offsets run from token {ends[0]} to {ends[1]}, its tokens file holds "
                f"{entry['num_tokens']} (a truncated or mismatched file): delete {path} or pass "
                f"{option('rebuild_cache')} to rebuild it"
            )


def _offset_ends(file: Path) -> tuple[int, int]:
    """The first and last value of an int64 offsets file (16 bytes read)."""
    with file.open("rb") as f:
        first = f.read(8)
        f.seek(-8, os.SEEK_END)
        last = f.read(8)
    return int.from_bytes(first, "little", signed=True), int.from_bytes(last, "little", signed=True)


def verify(
    path: Path, inputs: Mapping[str, Any] | None = None, checksums: bool = True
) -> dict[str, Any]:
    """Load ``path``'s manifest, check it (:func:`check_manifest`) and every file's size
    against it; with ``checksums`` (the default here) also every file's SHA-256."""
    manifest = check_manifest(read_manifest(path), path, inputs)
    check_files(path, manifest, checksums)
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
        total=total,
        unit="text",
        desc=f"tokenize {domain.name}",
        disable=not show_progress,
        leave=False,
    )
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


def build_cache(
    folder: Path,
    domains: Iterable[DomainInput],
    tokenizer,
    inputs: Mapping[str, Any],
    show_progress: bool = False,
    tokenizer_info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Tokenize ``domains`` into ``folder`` (which must be empty) and write its manifest last.

    ``tokenizer_info`` (default ``inputs["tokenizer"]``) is recorded as the manifest's
    ``tokenizer``: with its name, so that an offline run can match it by name."""
    entries = {d.name: _write_domain(folder, d, tokenizer, show_progress) for d in domains}
    manifest = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint(inputs),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "dtype": token_dtype(len(tokenizer)).name,
        "tokenizer": dict(tokenizer_info or inputs.get("tokenizer") or {}),
        "library_versions": library_versions(),
        "inputs": as_json(inputs),
        "domains": entries,
    }
    write_atomic(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    try:  # read the fresh files back once: later hits check only their sizes
        check_files(folder, manifest, checksums=True)
    except CacheCorruptError as exc:
        raise CacheCorruptError(
            f"the token cache just written does not read back as written: {exc}; check the "
            f"disk under {folder.parent} or use another cache dir"
        ) from exc
    return manifest


def _try_open(
    path: Path, inputs: Mapping[str, Any] | None = None, verify_files: bool = False
) -> dict[str, Any] | None:
    """The checked manifest (sizes; SHA-256s too with ``verify_files``), None when there is
    no cache; warns and returns None if damaged."""
    if not (path / MANIFEST).exists():
        if path.exists() or path.is_symlink():
            log.warning("Token cache %s has no manifest; rebuilding it.", path)
        return None
    try:
        return verify(path, inputs, checksums=verify_files)
    except (CacheCorruptError, OSError, ValueError) as exc:
        log.warning("Token cache %s is damaged (%s); rebuilding it.", path, exc)
        return None


def ensure_cache(
    cache_dir: str | os.PathLike | None,
    inputs: Mapping[str, Any],
    make_domains: Callable[[], Iterable[DomainInput]],
    tokenizer,
    rebuild: bool = False,
    show_progress: bool = False,
    tokenizer_info: Mapping[str, Any] | None = None,
    verify_files: bool = False,
) -> TokenCache:
    """Open the cache for ``inputs``, building it first when missing, damaged or ``rebuild``.

    A hit checks the manifest and the files' sizes; ``verify_files`` also checks their SHA-256
    (a mismatch is damage: warned about and rebuilt). ``make_domains`` is called only when
    building (it streams the datasets); a build reads its files back once. Safe to call from
    several processes at once: one builds, the others wait on the lock, then read.
    """
    if not isinstance(inputs.get("sources"), dict):
        # A manifest without them is refused by every later open: it would never hit.
        raise ValueError(
            f"token cache inputs must record their sources per domain (a 'sources' object), "
            f"got keys {sorted(inputs)}: build them with moe_emergence.data.prepare.cache_inputs"
        )
    root = check_cache_root(cache_dir)
    path = root / fingerprint(inputs)
    found: dict[str, Any] = {}

    def ready(folder: Path) -> bool:
        found["manifest"] = _try_open(folder, inputs, verify_files)
        return found["manifest"] is not None

    def build(folder: Path) -> None:
        found["manifest"] = build_cache(
            folder, make_domains(), tokenizer, inputs, show_progress, tokenizer_info
        )

    with writing_cache(root, cache_dir):
        built = build_folder_once(path, build, ready, rebuild=rebuild)
    return TokenCache(path, found["manifest"], built_now=built)


def cache_entries(cache_dir: str | os.PathLike | None) -> list[tuple[Path, Any]]:
    """``(folder, parsed manifest)`` of every cache folder under the root that has a readable
    manifest, newest ``created_at`` first; nothing is checked (see :func:`open_entry`)."""
    root = resolve_cache_dir(cache_dir)
    out = []
    for folder in root.glob("*/") if root.is_dir() else ():
        if folder.name.startswith(".") or not (folder / MANIFEST).is_file():
            continue
        try:
            out.append((folder, read_manifest(folder)))
        except (OSError, ValueError):
            continue

    def created(item: tuple[Path, Any]) -> tuple[str, int]:
        """``created_at`` (whole seconds), then the manifest's mtime for builds within one
        second."""
        folder, manifest = item
        stamp = str(manifest.get("created_at", "")) if isinstance(manifest, dict) else ""
        try:
            return stamp, (folder / MANIFEST).stat().st_mtime_ns
        except OSError:
            return stamp, 0

    return sorted(out, key=created, reverse=True)


def open_entry(path: Path, verify_files: bool = False) -> TokenCache | None:
    """The cache folder ``path`` as found (no request to compare with), checked as a hit is
    (sizes; SHA-256s too with ``verify_files``), or None with a warning when it is damaged."""
    try:
        return TokenCache(path, verify(path, checksums=verify_files), built_now=False)
    except (CacheCorruptError, OSError, ValueError) as exc:
        log.warning("Token cache %s is damaged (%s); skipping it.", path, exc)
        return None


def recorded_for(recorded: Any, name: str) -> bool:
    """Whether a manifest's tokenizer name ``recorded`` was the tokenizer setting ``name``: the
    same, or a folder laid out as a mirror copy of the Hub id ``name`` (``<dir>/gpt2``,
    ``<dir>/org/name``: what ``--tokenizer ../shared/hub/gpt2`` records)."""
    if not isinstance(recorded, str) or not recorded:
        return False
    if recorded == name:
        return True
    if not is_hub_id(name) or is_hub_id(recorded):  # a Hub id is no copy of another
        return False
    want, got = Path(name).parts, Path(recorded).parts
    return len(got) > len(want) and got[-len(want) :] == want


def cached_tokenizer_infos(cache_dir: str | os.PathLike | None, name: str) -> list[dict]:
    """The tokenizer identities that cache manifests record for the tokenizer setting ``name``,
    newest first (unverified: for the offline fallback, where ``name`` cannot be loaded). Matched
    by identity: every entry whose tokenizer definition (vocabulary, merges, rules: SHA-256) is
    one recorded under ``name`` or a mirror copy of it (:func:`recorded_for`), whatever name or
    path built it."""
    infos = []
    for _, manifest in cache_entries(cache_dir):
        info = manifest.get("tokenizer") if isinstance(manifest, dict) else None
        if isinstance(info, dict) and _is_count(info.get("vocab_size")):
            infos.append(info)
    known = [tokenizer_definition(i) for i in infos if recorded_for(i.get("name"), name)]
    return [i for i in infos if tokenizer_definition(i) in known]
