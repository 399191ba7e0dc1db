"""The package's one atomic writer and one checksum (moe_emergence/files.py): whole files or the
old ones, no temporary left behind, fsync unless asked not to, the usual permissions; a leaf
module."""

from __future__ import annotations

import ast
import hashlib
import os
from pathlib import Path

import pytest

from moe_emergence import files
from moe_emergence.files import atomic_path, sha256_file, write_atomic


def test_write_atomic_writes_text_and_bytes_and_replaces(tmp_path):
    target = tmp_path / "new" / "folder" / "a.json"
    assert write_atomic(target, "é\n") == target  # the folder is created
    assert target.read_bytes() == "é\n".encode()
    write_atomic(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    write_atomic(str(target), memoryview(b"xyz"), fsync=False)
    assert target.read_bytes() == b"xyz"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "counts.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        assert tmp.parent == target.parent and tmp.name.endswith(".tmp")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counts.csv"]


def test_fsync_unless_asked_not_to(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real(fd))
    write_atomic(tmp_path / "a", b"1")
    assert len(synced) == 1
    write_atomic(tmp_path / "b", b"1", fsync=False)
    assert len(synced) == 1


def test_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        write_atomic(tmp_path / "a", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o640


def test_sha256_file(tmp_path):
    blob = os.urandom(3 * files.CHUNK // 2)  # more than one chunk
    (tmp_path / "f").write_bytes(blob)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(blob).hexdigest()
    assert sha256_file(str(tmp_path / "f")) == hashlib.sha256(blob).hexdigest()


def test_files_is_a_leaf():
    tree = ast.parse(Path(files.__file__).read_text())
    imported = [
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    ]
    assert not [name for name in imported if name and name.startswith("moe_emergence")]


def test_the_suite_has_hugging_face_caches_of_its_own():
    """Set in conftest before any HF library loads: datasets' cache is the session's, not the
    machine's ~/.cache/huggingface (whose entries for another copy of a mirror once answered a
    test's field check)."""
    import datasets.config

    home = Path(os.environ["HF_HOME"])
    assert home != Path.home() / ".cache" / "huggingface"
    assert Path(datasets.config.HF_DATASETS_CACHE).is_relative_to(home)
