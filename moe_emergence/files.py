"""Files written whole, folders built whole, and their content identity: the package's one
atomic writer and one checksum.

A leaf (it imports nothing from the package), so that every layer may use it: the token cache
and its reports, checkpoints and their sidecars, the analysis tables, summaries and figures.

:func:`atomic_path` yields a temporary name beside the target (``.<name>.<random>.tmp``, in the
same folder so the rename stays on one file system; it never ends in the target's suffix, so a
left-over temporary is not mistaken for a ``*.ckpt`` or ``*.csv``) and renames it over the
target when the block ends without an error; readers see the old file or the whole new one,
never part of one. :func:`write_atomic` writes bytes or text (UTF-8) that way.

:func:`build_folder_once` makes a folder appear complete (built under a temporary name, then
renamed) by one process at a time (a file lock beside it, :func:`locked`); :func:`folder_identity`
is the content identity of a local folder (names, sizes, SHA-256s), with a per-file index
(:class:`FileIndex`) so unchanged files are not read again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock, Timeout

CHUNK = 1 << 22  # 4 MiB: what sha256_file reads at a time


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """A temporary path beside ``path`` (its folder created) for the caller to write; renamed
    onto ``path`` when the block ends, after an fsync of its bytes unless ``fsync`` is False;
    removed when the block raises. The file is created empty with the usual permissions
    (0666 less the umask): a writer may open it again by name (``savefig``, ``to_csv``); a
    writer that needs the format from the name's suffix must pass it (the name ends ``.tmp``)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(
    path: str | os.PathLike, data: bytes | bytearray | memoryview | str, *, fsync: bool = True
) -> Path:
    """Write ``data`` (``str``: as UTF-8) to ``path`` whole (:func:`atomic_path`); returns the
    path."""
    blob = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path, fsync=fsync) as tmp, open(tmp, "wb") as f:
        f.write(blob)
    return Path(path)


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of the file's bytes, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# ---- folders built whole, under a lock ------------------------------------------------------

log = logging.getLogger(__name__)


@contextlib.contextmanager
def locked(lock_path: Path, holder: str = "another process preparing this cache") -> Iterator[None]:
    """Hold the file lock ``lock_path``, saying so (naming the ``holder``) when another
    process holds it first."""
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("Waiting for %s (lock %s)...", holder, lock_path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def discard(path: Path) -> None:
    """Move ``path`` aside (atomically) and delete it, if it exists."""
    if path.is_symlink():
        path.unlink()
    elif path.exists():
        trash = path.with_name(f".{path.name}.trash-{uuid.uuid4().hex[:8]}")
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


def clear_stale(target: Path) -> None:
    """Remove the partial folders (``.<name>.tmp-*``, ``.<name>.trash-*``) that killed builds
    left beside ``target`` (whose lock the caller holds): ``target``'s own, and those of other
    names whose lock is free (no build of theirs is running)."""
    for stale in sorted(target.parent.glob(".*.tmp-*")) + sorted(target.parent.glob(".*.trash-*")):
        name = stale.name[1:].rpartition(".tmp-" if ".tmp-" in stale.name else ".trash-")[0]
        if name == target.name:
            shutil.rmtree(stale, ignore_errors=True)
            continue
        lock = FileLock(str(target.with_name(f"{name}.lock")))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue  # its build is running
        try:
            log.info("Removing %s, left by a build that did not finish.", stale)
            shutil.rmtree(stale, ignore_errors=True)
        finally:
            lock.release()


def build_folder_once(
    target: Path,
    build: Callable[[Path], None],
    is_ready: Callable[[Path], bool],
    rebuild: bool = False,
) -> bool:
    """Make sure folder ``target`` is ready; build it with ``build(tmp_folder)`` if not.

    The build fills ``.<name>.tmp-*`` beside ``target``, which is renamed into place only when
    complete; ``<name>.lock`` makes a second process wait and then re-check ``is_ready``.
    Partial folders left by killed builds (of ``target`` or, when no build of theirs runs, of
    folders beside it) are removed (:func:`clear_stale`). Returns whether this call built it.
    """
    if not rebuild and is_ready(target):
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    with locked(target.with_name(f"{target.name}.lock")):
        if not rebuild and is_ready(target):
            return False  # built while we waited
        clear_stale(target)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()
        try:
            build(tmp)
            discard(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return True


# ---- content identity of local files --------------------------------------------------------

FILE_INDEX = "file-index.json"
FILE_INDEX_VERSION = 1


def _stat_key(st: os.stat_result) -> list[int]:
    """What must be unchanged for a stored hash to stand: size, mtime, ctime (ns), inode."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


class FileIndex:
    """A per-file memo ``absolute path -> (size, mtime, ctime, inode, sha256)`` kept as JSON.

    A file whose stat key is unchanged is not read again; any change (an edit, a copy to a new
    place) re-hashes it. The index is a memo only: where files live never enters a cache
    fingerprint. ``path=None`` keeps it in memory. Saved atomically; a lost update (two
    processes saving at once) only costs a re-hash.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._entries = self._load()
        self._changed: dict[str, list] = {}
        self.hashed_bytes = 0  # bytes read this session (for benchmarks)

    def _load(self) -> dict[str, list]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("version") != FILE_INDEX_VERSION:
            return {}
        files = data.get("files")
        return files if isinstance(files, dict) else {}

    def sha256(self, file: Path) -> tuple[int, str]:
        """``(size in bytes, SHA-256)`` of ``file``, read only when its stat key changed."""
        key = os.path.abspath(file)
        st = os.stat(file)
        stat = _stat_key(st)
        entry = self._entries.get(key)
        if isinstance(entry, list) and len(entry) == 5 and entry[:4] == stat:
            return st.st_size, entry[4]
        digest = sha256_file(Path(file))
        self.hashed_bytes += st.st_size
        self._entries[key] = self._changed[key] = [*stat, digest]
        return st.st_size, digest

    def save(self) -> None:
        """Merge this session's new hashes into the stored index (atomic; errors ignored)."""
        if self.path is None or not self._changed:
            return
        stored = self._load()
        stored.update(self._changed)
        try:
            write_atomic(self.path, json.dumps({"version": FILE_INDEX_VERSION, "files": stored}))
            self._changed = {}
        except OSError as exc:  # a read-only cache dir: hashing again next time is fine
            log.debug("Could not save the file index %s: %s", self.path, exc)


def local_files(folder: Path) -> list[tuple[str, Path]]:
    """``(relative posix name, path)`` of every file under ``folder``, sorted by name; hidden
    names (``.cache``, ``.git``, ``.gitattributes`` ...) skipped, symlinked files followed."""
    out = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith("."):
                path = Path(root, name)
                out.append((path.relative_to(folder).as_posix(), path))
    return sorted(out)


def folder_identity(folder: str | os.PathLike, index: FileIndex) -> dict[str, int | str]:
    """What a local folder holds, independent of where it lies: file count, total bytes and
    a SHA-256 over the sorted (relative name, size, content SHA-256) triples."""
    rows = []
    for name, path in local_files(Path(folder)):
        size, digest = index.sha256(path)
        rows.append([name, size, digest])
    blob = json.dumps(rows, separators=(",", ":")).encode()
    return {
        "num_files": len(rows),
        "num_bytes": sum(r[1] for r in rows),
        "sha256": hashlib.sha256(blob).hexdigest(),
    }
