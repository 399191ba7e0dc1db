"""Atomic writes: files and whole folders appear complete (temporary name, then rename), and
a folder is built by one process at a time (a file lock beside it)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """Hold the file lock ``lock_path``, saying so when another process holds it first."""
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("Waiting for another process preparing this cache (lock %s)...", lock_path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def discard(path: Path) -> None:
    """Move ``path`` aside (atomically) and delete it, if it exists."""
    if path.exists():
        trash = path.with_name(f".{path.name}.trash-{uuid.uuid4().hex[:8]}")
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


def build_folder_once(
    target: Path,
    build: Callable[[Path], None],
    is_ready: Callable[[Path], bool],
    rebuild: bool = False,
) -> bool:
    """Make sure folder ``target`` is ready; build it with ``build(tmp_folder)`` if not.

    The build fills ``.<name>.tmp-*`` beside ``target``, which is renamed into place only when
    complete; ``<name>.lock`` makes a second process wait and then re-check ``is_ready``.
    Partial folders left by killed builds are removed. Returns whether this call built it.
    """
    if not rebuild and is_ready(target):
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    with locked(target.with_name(f"{target.name}.lock")):
        if not rebuild and is_ready(target):
            return False  # built while we waited
        for stale in target.parent.glob(f".{target.name}.tmp-*"):  # we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
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
