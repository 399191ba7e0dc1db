"""Writing a file whole and hashing one: the package's one atomic writer and one checksum.

A leaf (it imports nothing from the package), so that every layer may use it: the token cache
and its reports, checkpoints and their sidecars, the analysis tables, summaries and figures.

:func:`atomic_path` yields a temporary name beside the target (``.<name>.<random>.tmp``, in the
same folder so the rename stays on one file system; it never ends in the target's suffix, so a
left-over temporary is not mistaken for a ``*.ckpt`` or ``*.csv``) and renames it over the
target when the block ends without an error; readers see the old file or the whole new one,
never part of one. :func:`write_atomic` writes bytes or text (UTF-8) that way.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

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
