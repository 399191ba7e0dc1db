"""The token cache: hits and misses, concurrency, damage, interruption, faithful read-back."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock
from helpers.data import prep, tiny_settings

from moe_emergence.data import prepare as prepare_module
from moe_emergence.data.dataset import PackedMixedDomainDataset
from moe_emergence.data.domains import domain_set, read_domain_set
from moe_emergence.data.prepare import describe_request
from moe_emergence.data.settings import DataSettings
from moe_emergence.data.sources import load_domain
from moe_emergence.data.tokenize import encode_texts
from moe_emergence.versions import library_versions


@pytest.fixture
def settings(tiny_mirror, tiny_tokenizer_dir, tmp_path) -> DataSettings:
    return tiny_settings(tiny_mirror, tiny_tokenizer_dir, tmp_path / "cache")


def cache_key(settings: DataSettings) -> str:
    return describe_request(settings).fingerprint


@pytest.mark.parametrize(
    "change", [{"block_size": 64}, {"seed": 7}, {"balance_tokens": True}, {"rebuild_cache": False}]
)
def test_hit_when_only_post_cache_settings_change(settings, change):
    first = prep(settings)
    second = prep(settings, **change)
    assert not first.from_cache and second.from_cache
    assert second.cache_path == first.cache_path


def test_miss_when_size_filter_or_tokenizer_changes(settings, tmp_path, tiny_tokenizer_dir):
    base = prep(settings).cache_path
    other_tok = tmp_path / "tok2"
    other_tok.mkdir()
    for f in tiny_tokenizer_dir.iterdir():
        (other_tok / f.name).write_bytes(f.read_bytes())
    data = json.loads((other_tok / "tokenizer.json").read_text())
    data["model"]["merges"] = data["model"]["merges"][:-20]  # same name shape, other merges
    (other_tok / "tokenizer.json").write_text(json.dumps(data))
    paths = {
        "size": prep(settings, size_mb=0.5).cache_path,
        "filter": prep(settings, max_example_chars=5000).cache_path,
        "tokenizer": prep(settings, tokenizer=str(other_tok)).cache_path,
    }
    assert base not in paths.values()
    assert len(set(paths.values())) == 3


def test_miss_when_a_source_changes(settings, monkeypatch):
    base = prep(settings).cache_path
    changed = read_domain_set("code_math_prose")
    changed["code"][0]["text"] = "# {content}"
    other = prep(settings, domain_set=changed)
    assert not other.from_cache and other.cache_path != base


def test_cache_read_back_equals_fresh_tokenization(settings, tiny_tokenizer):
    prepared = prep(settings)
    again = prep(settings)
    assert again.from_cache
    for domain, sources in domain_set("code_math_prose").items():
        texts, meta = load_domain(
            domain, sources, 1.0, hub_mirror=settings.hub_mirror, show_progress=False
        )
        fresh = encode_texts(texts, tiny_tokenizer)
        cached = again.streams[domain]
        assert isinstance(cached.tokens, np.memmap) and cached.tokens.dtype == np.uint16
        np.testing.assert_array_equal(cached.tokens, fresh.tokens)
        np.testing.assert_array_equal(cached.doc_offsets, fresh.doc_offsets)
        assert again.metadata[domain] == json.loads(json.dumps(meta))
    assert again.metadata == prepared.metadata
    manifest = json.loads((prepared.cache_path / "manifest.json").read_text())
    assert manifest["library_versions"] == library_versions()  # the one list, as summary.json


def test_cache_hit_is_logged_with_the_rebuild_hint(settings, caplog):
    prep(settings)
    with caplog.at_level(logging.INFO, logger="moe_emergence"):
        prep(settings)
    assert any(
        "skipping streaming and tokenizing" in m and "--rebuild-cache" in m for m in caplog.messages
    )


def test_rebuild_flag_tokenizes_again(settings, monkeypatch):
    prep(settings)
    calls = []
    real = prepare_module.load_domain
    monkeypatch.setattr(
        prepare_module, "load_domain", lambda *a, **k: calls.append(a) or real(*a, **k)
    )
    rebuilt = prep(settings, rebuild_cache=True)
    assert not rebuilt.from_cache and len(calls) == 3


def test_hit_does_not_stream(settings, monkeypatch):
    prep(settings)

    def fail(*args, **kwargs):
        raise AssertionError("a cache hit must not stream")

    monkeypatch.setattr(prepare_module, "load_domain", fail)
    assert prep(settings, block_size=16).from_cache


@pytest.mark.parametrize(
    ("damage", "verify"), [("truncate", False), ("flip", True)]
)  # a same-size flip only with verify_cache (tests/data/test_cache_hits.py)
def test_damaged_file_is_detected_and_rebuilt(settings, caplog, damage, verify):
    settings = dataclasses.replace(settings, verify_cache=verify)
    first = prep(settings)
    expected = {d: np.array(s.tokens) for d, s in first.streams.items()}
    victim = first.cache_path / "math.tokens.bin"
    data = bytearray(victim.read_bytes())
    if damage == "truncate":
        data = data[:-10]
    else:
        data[7] ^= 0xFF
    victim.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        second = prep(settings)
    assert not second.from_cache
    assert any("damaged" in m and "rebuilding" in m for m in caplog.messages)
    for domain, tokens in expected.items():
        np.testing.assert_array_equal(second.streams[domain].tokens, tokens)


def test_a_truncated_tokens_file_its_manifest_agrees_with_is_rebuilt(settings, caplog):
    """The tokens file cut short and its manifest's ``num_tokens`` edited to match: the sizes
    agree, the offsets (which end at the full count) do not; the warning names the entry and
    the fix, and the entry is rebuilt whole (#29 item 8)."""
    first = prep(settings)
    expected = {d: np.array(s.tokens) for d, s in first.streams.items()}
    manifest_file = first.cache_path / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    entry = manifest["domains"]["math"]
    kept = entry["num_tokens"] // 2
    victim = first.cache_path / entry["tokens_file"]
    victim.write_bytes(victim.read_bytes()[: kept * np.dtype(manifest["dtype"]).itemsize])
    entry["num_tokens"] = kept
    manifest_file.write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING):
        second = prep(settings)
    assert not second.from_cache
    warning = next(m for m in caplog.messages if "damaged" in m)  # (checked again in the lock)
    assert str(first.cache_path) in warning and "math's offsets run from token 0 to" in warning
    assert f"holds {kept}" in warning and "--rebuild-cache" in warning
    for domain, tokens in expected.items():
        np.testing.assert_array_equal(second.streams[domain].tokens, tokens)


def test_a_build_removes_partial_folders_of_dead_builds_beside_it(settings):
    """A killed build of another entry left its temporary folder (and a discard its trash):
    the next build removes them under that entry's lock, and keeps the one whose build still
    runs (its lock held) (#29 item 8)."""
    root = Path(settings.cache_dir)
    root.mkdir(parents=True)
    dead = [root / ".0123456789abcdef.tmp-4242-deadbeef", root / ".0123456789abcdef.trash-1a2b"]
    running = root / ".fedcba9876543210.tmp-4343-cafecafe"
    for folder in (*dead, running):
        folder.mkdir()
        (folder / "code.tokens.bin").write_bytes(b"\0" * 8)
    with FileLock(str(root / "fedcba9876543210.lock")):
        prepared = prep(settings)
    assert not prepared.from_cache
    assert not any(p.exists() for p in dead)
    assert running.is_dir()


def test_interrupted_prepare_leaves_nothing_behind(settings, monkeypatch):
    real = prepare_module.load_domain

    def interrupt(domain, *args, **kwargs):
        if domain == "math":
            raise KeyboardInterrupt
        return real(domain, *args, **kwargs)

    monkeypatch.setattr(prepare_module, "load_domain", interrupt)
    with pytest.raises(KeyboardInterrupt):
        prep(settings)
    root = Path(settings.cache_dir)
    left = [p.name for p in root.iterdir() if not p.name.endswith(".lock")]
    assert left == ["file-index.json"]  # the mirror's file hashes, no token cache entry
    monkeypatch.setattr(prepare_module, "load_domain", real)
    assert not prep(settings).from_cache


KILL_MIDWAY = """
import os, signal, sys
from moe_emergence.data import cache
from moe_emergence.data.prepare import prepare_domains
from moe_emergence.data.settings import DataSettings

real = cache._write_domain
def write_then_die(folder, domain, *args):
    entry = real(folder, domain, *args)
    if domain.name == "math":
        os.kill(os.getpid(), signal.SIGKILL)
    return entry
cache._write_domain = write_then_die
prepare_domains(DataSettings(size_mb=1.0, block_size=32, tokenizer=sys.argv[1],
                             hub_mirror=sys.argv[2], cache_dir=sys.argv[3]), show_progress=False)
"""


def test_killed_prepare_leaves_no_usable_partial_cache(settings):
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            KILL_MIDWAY,
            settings.tokenizer,
            settings.hub_mirror,
            settings.cache_dir,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr
    root = Path(settings.cache_dir)
    key = cache_key(settings)
    assert not (root / key).exists()
    assert [p for p in root.glob(f".{key}.tmp-*") if (p / "code.tokens.bin").exists()]
    rebuilt = prep(settings)
    assert not rebuilt.from_cache and rebuilt.cache_path == root / key
    assert not list(root.glob(f".{key}.tmp-*"))  # the stale partial build was cleared


PREPARE_AND_REPORT = """
import json, logging, sys
import numpy as np
from moe_emergence.data.prepare import prepare_domains
from moe_emergence.data.settings import DataSettings

logging.basicConfig(level=logging.INFO, format="%(message)s")
p = prepare_domains(DataSettings(size_mb=1.0, block_size=32, tokenizer=sys.argv[1],
                                 hub_mirror=sys.argv[2], cache_dir=sys.argv[3]),
                    show_progress=False)
sums = {d: int(np.asarray(s.tokens, dtype=np.int64).sum()) for d, s in p.streams.items()}
print(json.dumps({"built": not p.from_cache, "path": str(p.cache_path), "sums": sums}))
"""


def test_two_processes_build_once_and_agree(settings, tmp_path):
    root = Path(settings.cache_dir)
    root.mkdir(parents=True)
    key = cache_key(settings)
    args = [settings.tokenizer, settings.hub_mirror, settings.cache_dir]
    logs = [tmp_path / f"p{i}.log" for i in range(2)]
    with FileLock(str(root / f"{key}.lock")):  # hold the lock until both are waiting on it
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", PREPARE_AND_REPORT, *args],
                stdout=subprocess.PIPE,
                stderr=log.open("w"),
                text=True,
            )
            for log in logs
        ]
        deadline = time.monotonic() + 120
        while not all("Waiting for another process" in log.read_text() for log in logs):
            assert time.monotonic() < deadline, [log.read_text() for log in logs]
            assert all(p.poll() is None for p in procs), [log.read_text() for log in logs]
            time.sleep(0.2)
    results = [json.loads(p.communicate(timeout=120)[0].splitlines()[-1]) for p in procs]
    assert sorted(r["built"] for r in results) == [False, True]
    assert results[0]["path"] == results[1]["path"] == str(root / key)
    assert results[0]["sums"] == results[1]["sums"]


def test_cached_streams_pack_into_the_dataset(settings):
    prepared = prep(settings)
    ds = PackedMixedDomainDataset.from_token_streams(prepared.streams, 32, True, 0)
    assert len(ds) == 3 * min(s.num_tokens // 32 for s in prepared.streams.values())
    assert ds[0]["input_ids"].shape == (32,)


def test_default_cache_dir_comes_from_env(monkeypatch, tmp_path, settings):
    monkeypatch.setenv("MOE_CACHE_DIR", str(tmp_path / "from-env"))
    path = prep(settings, cache_dir=None).cache_path
    assert path.parent == tmp_path / "from-env"
    assert os.access(path / "manifest.json", os.R_OK)


def test_inputs_without_sources_are_refused_before_building(tmp_path, tiny_tokenizer):
    """A key without per-domain sources would write a manifest every later open rejects (a
    cache that never hits): refused up front, naming the function that builds keys."""
    from moe_emergence.data.cache import ensure_cache

    def never():
        raise AssertionError("nothing may be built")

    with pytest.raises(ValueError, match=r"'sources'.*prepare\.cache_inputs"):
        ensure_cache(tmp_path / "cache", {"tokenizer": {}}, never, tiny_tokenizer)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
