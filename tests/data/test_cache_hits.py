"""Cheap cache hits: a hit checks the manifest and the files' sizes and reads no file contents;
every file's SHA-256 is checked right after a build and, on a hit, only with verify_cache."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from helpers.data import prep, tiny_datamodule_kwargs, tiny_settings

from moe_emergence import files as files_module
from moe_emergence.data import MixedDomainDataModule
from moe_emergence.data import cache as cache_module
from moe_emergence.data.cache import MANIFEST, CacheCorruptError
from moe_emergence.data.cli import parse_args
from moe_emergence.data.settings import DataSettings
from moe_emergence.errors import UserError

DOMAINS = ("code", "math", "prose")  # the default domain set (conf/data/domains)

CACHE_FILES = sorted(f"{d}.{kind}.bin" for d in DOMAINS for kind in ("tokens", "offsets"))


@pytest.fixture
def settings(tiny_mirror, tiny_tokenizer_dir, tmp_path) -> DataSettings:
    return tiny_settings(tiny_mirror, tiny_tokenizer_dir, tmp_path / "cache")


@pytest.fixture
def hashed(monkeypatch) -> list[str]:
    """Names of the files whose contents are hashed (the cache's and the file index's)."""
    names: list[str] = []
    real = files_module.sha256_file

    def spy(path):
        names.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(cache_module, "sha256_file", spy)
    monkeypatch.setattr(files_module, "sha256_file", spy)
    return names


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[:-2]
    elif how == "extend":
        data += b"\0\0"
    elif how == "flip":  # same size, other bytes
        data[7] ^= 0xFF
    path.write_bytes(bytes(data))


def test_build_reads_every_fresh_file_back_once(settings, hashed):
    built = prep(settings)
    assert not built.from_cache
    cache_files = sorted(n for n in hashed if n.endswith(".bin"))
    assert cache_files == CACHE_FILES


def test_build_that_does_not_read_back_fails_and_publishes_nothing(settings, monkeypatch):
    monkeypatch.setattr(cache_module, "sha256_file", lambda path: "0" * 64)
    with pytest.raises(CacheCorruptError, match="does not read back as written"):
        prep(settings)
    assert not [p for p in Path(settings.cache_dir).iterdir() if (p / MANIFEST).exists()]


def test_hit_hashes_no_cache_file(settings, hashed):
    first = prep(settings)
    hashed.clear()
    again = prep(settings, block_size=16)
    assert again.from_cache and again.cache_path == first.cache_path
    assert hashed == []


def test_datamodule_hit_hashes_no_cache_file_and_keeps_its_fingerprint(
    tiny_mirror, tiny_tokenizer_dir, tmp_path, hashed
):
    def datamodule(**extra) -> MixedDomainDataModule:
        dm = MixedDomainDataModule(
            **tiny_datamodule_kwargs(
                tiny_mirror, tiny_tokenizer_dir, tmp_path / "cache", 32, report_dir=str(tmp_path)
            ),
            **extra,
        )
        dm.prepare_data()
        dm.setup("fit")
        return dm

    built = datamodule()  # builds (and reads its files back once)
    hashed.clear()
    hit = datamodule()  # prepare_data + setup, as every start of a run does
    assert not any(n.endswith(".bin") for n in hashed), hashed
    verified = datamodule(verify_cache=True)
    assert sorted(n for n in hashed if n.endswith(".bin")) == sorted(CACHE_FILES * 2)
    assert built.data_fingerprint == hit.data_fingerprint == verified.data_fingerprint
    assert hit.resume_identity(1) == verified.resume_identity(1)


@pytest.mark.parametrize("how", ["truncate", "extend", "missing"])
@pytest.mark.parametrize("file", ["math.tokens.bin", "prose.offsets.bin"])
def test_size_mismatch_is_caught_on_a_plain_hit(settings, caplog, how, file):
    first = prep(settings)
    expected = {d: np.array(s.tokens) for d, s in first.streams.items()}
    victim = first.cache_path / file
    if how == "missing":
        victim.unlink()
    else:
        damage(victim, how)
    with caplog.at_level(logging.WARNING):
        second = prep(settings)
    assert not second.from_cache
    reason = "is missing" if how == "missing" else "bytes, the manifest says"
    assert any("damaged" in m and "rebuilding" in m and reason in m for m in caplog.messages)
    for domain, tokens in expected.items():
        np.testing.assert_array_equal(second.streams[domain].tokens, tokens)


def test_same_size_corruption_is_caught_only_with_verify_cache(settings, caplog):
    first = prep(settings)
    expected = np.array(first.streams["math"].tokens)
    damage(first.cache_path / "math.tokens.bin", "flip")
    plain = prep(settings)
    assert plain.from_cache  # sizes agree: a plain hit does not read the contents
    assert not np.array_equal(np.array(plain.streams["math"].tokens), expected)
    with caplog.at_level(logging.WARNING):
        checked = prep(settings, verify_cache=True)
    assert not checked.from_cache
    assert any("does not match its checksum" in m and "rebuilding" in m for m in caplog.messages)
    np.testing.assert_array_equal(checked.streams["math"].tokens, expected)
    assert prep(settings, verify_cache=True).from_cache  # the rebuilt entry verifies


def test_verify_cache_hit_is_logged_as_verified(settings, caplog):
    prep(settings)
    with caplog.at_level(logging.INFO, logger="moe_emergence"):
        prep(settings)
        prep(settings, verify_cache=True)
    found = [m for m in caplog.messages if m.startswith("Found token cache")]
    assert "file sizes checked; --verify-cache" in found[0]
    assert "every file's SHA-256 verified" in found[1]


def test_verify_cache_setting_and_flag():
    with pytest.raises(UserError, match=r"--verify-cache \(data.verify_cache\)"):
        DataSettings(verify_cache="yes", hub_mirror=None).validate()
    assert parse_args(["--verify-cache", "--hub-mirror", "."])[0].verify_cache is True
    assert parse_args(["--hub-mirror", "."])[0].verify_cache is False


def test_hydra_key_defaults_to_off():
    from moe_emergence.config import compose_config

    assert compose_config(["data.hub_mirror=null"]).data.verify_cache is False
    assert compose_config(["data.verify_cache=true"]).data.verify_cache is True
