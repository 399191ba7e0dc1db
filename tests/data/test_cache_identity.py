"""The token cache knows its contents: keyed by what the data files hold (not where they lie),
and a folder proves its contents before it is used (else a warning and a rebuild)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.data import prep, tiny_settings

from moe_emergence import files as files_module
from moe_emergence.data.cache import MANIFEST
from moe_emergence.data.prepare import describe_request, load_data_tokenizer
from moe_emergence.data.sample.tokenizer import DIGESTS, ensure_sample_tokenizer
from moe_emergence.data.settings import DataSettings

GSM8K_FILE = Path("openai", "gsm8k", "main", "train-00000-of-00001.parquet")


@pytest.fixture
def mirror(tiny_mirror, tmp_path) -> Path:
    """A private copy of the tiny mirror (tests move and edit it)."""
    return Path(shutil.copytree(tiny_mirror, tmp_path / "mirror-a"))


@pytest.fixture
def settings(mirror, tiny_tokenizer_dir, tmp_path) -> DataSettings:
    return tiny_settings(mirror, tiny_tokenizer_dir, tmp_path / "cache")


def test_moved_mirror_hits(settings, mirror, tmp_path):
    first = prep(settings)
    (tmp_path / "elsewhere").mkdir()
    moved = mirror.rename(tmp_path / "elsewhere" / "mirror-b")
    again = prep(settings, hub_mirror=str(moved))
    assert again.from_cache and again.cache_path == first.cache_path
    manifest = (first.cache_path / MANIFEST).read_text()
    assert str(mirror) not in json.dumps(json.loads(manifest)["inputs"])  # no path in the key


def test_mirror_changed_in_place_misses(settings, mirror):
    first = prep(settings)
    old_math = np.array(first.streams["math"].tokens)
    table = pq.read_table(mirror / GSM8K_FILE)
    rows = {
        "question": ["Q new: " + q for q in table["question"].to_pylist()],
        "answer": table["answer"].to_pylist(),
    }
    pq.write_table(pa.table(rows), mirror / GSM8K_FILE)
    second = prep(settings)
    assert not second.from_cache and second.cache_path != first.cache_path
    assert not np.array_equal(np.array(second.streams["math"].tokens), old_math)
    assert second.streams["code"].num_tokens == first.streams["code"].num_tokens


def test_unchanged_files_are_not_read_again(settings, monkeypatch):
    first = prep(settings)

    def no_reading(path):
        raise AssertionError(f"{path} was hashed again although unchanged")

    monkeypatch.setattr(files_module, "sha256_file", no_reading)
    again = prep(settings, block_size=16)
    assert again.from_cache and again.cache_path == first.cache_path


def test_touched_file_is_hashed_again_and_still_hits(settings, mirror, monkeypatch):
    first = prep(settings)
    hashed = []
    real = files_module.sha256_file
    monkeypatch.setattr(files_module, "sha256_file", lambda p: hashed.append(p) or real(p))
    (mirror / GSM8K_FILE).touch()  # same content, new mtime
    again = prep(settings)
    assert again.from_cache and again.cache_path == first.cache_path
    assert [Path(p).name for p in hashed] == [GSM8K_FILE.name]


def test_hidden_download_metadata_does_not_change_the_identity(settings, mirror):
    first = prep(settings)
    meta = mirror / "openai" / "gsm8k" / ".cache" / "huggingface" / "download"
    meta.mkdir(parents=True)
    (meta / "README.md.metadata").write_text("etag and commit of huggingface-cli")
    assert prep(settings).cache_path == first.cache_path


# --- a cache folder proves its contents ----------------------------------------------------


def other_entry(settings: DataSettings) -> Path:
    """A complete entry built for another request (a smaller budget)."""
    return prep(settings, size_mb=0.5).cache_path


def expect_rebuilt(settings, caplog, reason: str):
    with caplog.at_level(logging.WARNING):
        rebuilt = prep(settings)
    assert not rebuilt.from_cache
    assert any("rebuilding" in m and reason in m for m in caplog.messages), caplog.messages
    assert rebuilt.metadata["code"]["budget_chars"] == 1024 * 1024
    return rebuilt


def test_folder_copied_under_another_fingerprint_is_rebuilt(settings, caplog):
    source = other_entry(settings)
    target = Path(settings.cache_dir) / describe_request(settings).fingerprint
    shutil.copytree(source, target)
    rebuilt = expect_rebuilt(settings, caplog, "copied or linked")
    assert rebuilt.cache_path == target


def test_folder_linked_under_another_fingerprint_is_rebuilt(settings, caplog):
    source = other_entry(settings)
    target = Path(settings.cache_dir) / describe_request(settings).fingerprint
    target.symlink_to(source, target_is_directory=True)
    rebuilt = expect_rebuilt(settings, caplog, "copied or linked")
    assert not rebuilt.cache_path.is_symlink()
    assert prep(settings, size_mb=0.5).from_cache  # the linked-to entry is left intact


def edit_manifest(path: Path, edit) -> None:
    file = path / MANIFEST
    manifest = json.loads(file.read_text())
    file.write_text(json.dumps(edit(manifest)))


def drop_domain(m):
    del m["domains"]["prose"]
    return m


def drop_domain_everywhere(m):
    del m["domains"]["prose"]
    del m["inputs"]["sources"]["prose"]
    return m


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda m: None, "not an object"),
        (lambda m: [m], "not an object"),
        (lambda m: {**m, "dtype": "float7"}, "dtype"),
        (lambda m: {**m, "dtype": "uint32"}, "dtype"),
        (lambda m: {**m, "domains": None}, "domains"),
        (drop_domain, "domains"),
        (drop_domain_everywhere, "fingerprint"),
        (lambda m: {**m, "inputs": {**m["inputs"], "budget_chars": 1}}, "fingerprint"),
        (lambda m: {**m, "format_version": 1}, "format version"),
        (lambda m: m["domains"]["math"].update(num_tokens=-1) or m, "malformed"),
        (lambda m: m["domains"]["math"].update(tokens_file="../x") or m, "malformed"),
    ],
    ids=[
        "null",
        "list",
        "unknown-dtype",
        "wrong-dtype",
        "no-domains",
        "domain-removed",
        "domain-removed-from-inputs",
        "other-inputs",
        "old-format",
        "negative-count",
        "path-escape",
    ],
)
def test_manifest_of_the_wrong_shape_is_rebuilt(settings, caplog, edit, reason):
    first = prep(settings)
    expected = {d: np.array(s.tokens) for d, s in first.streams.items()}
    edit_manifest(first.cache_path, edit)
    rebuilt = expect_rebuilt(settings, caplog, reason)
    assert set(rebuilt.streams) == {"code", "math", "prose"}
    for domain, tokens in expected.items():
        np.testing.assert_array_equal(rebuilt.streams[domain].tokens, tokens)


def test_folder_without_manifest_is_rebuilt(settings, caplog):
    first = prep(settings)
    (first.cache_path / MANIFEST).unlink()
    expect_rebuilt(settings, caplog, "no manifest")


# --- sample_bpe ----------------------------------------------------------------------------


def test_damaged_sample_tokenizer_is_retrained_and_rebuild_retrains(tmp_path, caplog):
    cache_dir = tmp_path / "cache"
    folder = ensure_sample_tokenizer(cache_dir)
    vocab = load_data_tokenizer("sample_bpe", cache_dir=cache_dir).get_vocab()
    assert json.loads((folder / DIGESTS).read_text())["files"]["tokenizer.json"]

    (folder / "tokenizer.json").write_text('{"truncated": ')
    with caplog.at_level(logging.WARNING):
        repaired = load_data_tokenizer("sample_bpe", cache_dir=cache_dir)
    assert any("damaged" in m and "retraining" in m for m in caplog.messages)
    assert repaired.get_vocab() == vocab

    data = json.loads((folder / "tokenizer.json").read_text())
    data["model"]["merges"] = data["model"]["merges"][:-1]  # loads, but not what was trained
    (folder / "tokenizer.json").write_text(json.dumps(data))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_data_tokenizer("sample_bpe", cache_dir=cache_dir)
    assert any("does not match its SHA-256" in m for m in caplog.messages)

    made = (folder / "tokenizer.json").stat().st_mtime_ns
    assert ensure_sample_tokenizer(cache_dir) == folder
    assert (folder / "tokenizer.json").stat().st_mtime_ns == made  # ready: kept
    ensure_sample_tokenizer(cache_dir, rebuild=True)
    assert (folder / "tokenizer.json").stat().st_mtime_ns != made  # --rebuild-cache retrains
