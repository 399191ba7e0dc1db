"""Offline first: a warm token cache serves a run with no mirror and no network (CLI and
train), and what the standard Hugging Face hub cache holds loads offline."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from huggingface_hub import constants

from moe_emergence.config import compose_config
from moe_emergence.data import MixedDomainDataModule, cli
from moe_emergence.data.legacy import load_math_data
from moe_emergence.data.prepare import prepare_domains
from moe_emergence.data.settings import DataSettings
from moe_emergence.data.tokenize import load_tokenizer
from moe_emergence.errors import UserError
from moe_emergence.hub import HubUnavailableError

GSM8K_FILE = Path("openai", "gsm8k", "main", "train-00000-of-00001.parquet")


@pytest.fixture(autouse=True)
def empty_hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face hub cache, and a working dir without ./gpt2."""
    hub_cache = tmp_path / "hf-hub-cache"
    hub_cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.chdir(tmp_path)
    return hub_cache


@pytest.fixture
def mirror(tiny_mirror, tiny_tokenizer_dir, tmp_path) -> Path:
    """The tiny mirror with the tiny tokenizer as ``gpt2`` (the default tokenizer's name)."""
    root = Path(shutil.copytree(tiny_mirror, tmp_path / "mirror"))
    shutil.copytree(tiny_tokenizer_dir, root / "gpt2")
    return root


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


def settings_for(mirror: Path | None, cache_dir: Path, **changes) -> DataSettings:
    base = DataSettings(
        size_mb=1.0,
        block_size=32,
        hub_mirror=str(mirror) if mirror else None,
        cache_dir=str(cache_dir),
    )
    return dataclasses.replace(base, **changes)


def run_cli(mirror: Path | None, cache_dir: Path, *extra: str) -> list[str]:
    argv = ["--size-mb", "1", "--block-size", "32", "--cache-dir", str(cache_dir), "--no-progress"]
    return argv + (["--hub-mirror", str(mirror)] if mirror else []) + list(extra)


def test_cli_warm_cache_serves_an_offline_run_without_mirror(mirror, cache_dir, capsys, caplog):
    assert cli.main(run_cli(mirror, cache_dir)) == 0
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="moe_emergence"):
        status = cli.main(run_cli(None, cache_dir, "--block-size", "16"))
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "Checks passed" in captured.out + " ".join(caplog.messages)
    used = [m for m in caplog.messages if m.startswith("Offline:")]
    assert len(used) == 1
    assert "codeparrot/codeparrot-clean" in used[0] and "tokenizer 'gpt2'" in used[0]
    assert str(cache_dir) in used[0] and "newest" not in used[0]


def test_offline_run_with_other_settings_gives_the_one_line_error(mirror, cache_dir, capsys):
    assert cli.main(run_cli(mirror, cache_dir)) == 0
    capsys.readouterr()
    status = cli.main(run_cli(None, cache_dir, "--size-mb", "0.5"))
    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith("error: Cannot load dataset 'codeparrot/codeparrot-clean'")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_offline_picks_the_newest_matching_entry_and_says_so(mirror, cache_dir, caplog):
    first = prepare_domains(settings_for(mirror, cache_dir), show_progress=False)
    table = pq.read_table(mirror / GSM8K_FILE)
    rows = {
        "question": ["New " + q for q in table["question"].to_pylist()],
        "answer": table["answer"].to_pylist(),
    }
    pq.write_table(pa.table(rows), mirror / GSM8K_FILE)  # the mirror moves on: a second entry
    second = prepare_domains(settings_for(mirror, cache_dir), show_progress=False)
    assert second.cache_path != first.cache_path
    with caplog.at_level(logging.INFO, logger="moe_emergence"):
        offline = prepare_domains(settings_for(None, cache_dir), show_progress=False)
    assert offline.cache_path == second.cache_path and offline.from_cache
    assert offline.tokenizer_info == second.tokenizer_info  # recorded, though not loadable
    assert any("the newest of 2" in m for m in caplog.messages)


def test_offline_skips_a_damaged_newest_entry(mirror, cache_dir, caplog):
    first = prepare_domains(settings_for(mirror, cache_dir), show_progress=False)
    table = pq.read_table(mirror / GSM8K_FILE)
    pq.write_table(table.slice(0, 10), mirror / GSM8K_FILE)
    second = prepare_domains(settings_for(mirror, cache_dir), show_progress=False)
    (second.cache_path / "math.tokens.bin").write_bytes(b"\0\0")
    with caplog.at_level(logging.WARNING):
        offline = prepare_domains(settings_for(None, cache_dir), show_progress=False)
    assert offline.cache_path == first.cache_path
    assert any("damaged" in m and str(second.cache_path) in m for m in caplog.messages)


def test_rebuild_offline_without_mirror_is_the_one_line_error(mirror, cache_dir):
    prepare_domains(settings_for(mirror, cache_dir), show_progress=False)
    with pytest.raises(HubUnavailableError, match=r"codeparrot.*--hub-mirror") as excinfo:
        prepare_domains(settings_for(None, cache_dir, rebuild_cache=True), show_progress=False)
    assert isinstance(excinfo.value, UserError)


def test_vocab_size_is_read_from_the_manifest_offline(mirror, cache_dir, tiny_tokenizer):
    def offline_vocab_size() -> int:
        return MixedDomainDataModule(tokenizer="gpt2", cache_dir=str(cache_dir)).vocab_size

    with pytest.raises(HubUnavailableError):
        offline_vocab_size()  # nothing recorded yet
    prepare_domains(settings_for(mirror, cache_dir), show_progress=False)
    assert offline_vocab_size() == len(tiny_tokenizer)


def test_train_runs_offline_from_a_warm_cache(mirror, cache_dir, tmp_path):
    from moe_emergence.train import train

    prepare_domains(settings_for(mirror, cache_dir), show_progress=False)
    cfg = compose_config(
        [
            "experiment=debug",
            "data.hub_mirror=null",
            "data.tokenizer=gpt2",
            f"data.cache_dir={cache_dir}",
            "data.size_mb=1",
            f"paths.run_dir={tmp_path / 'run'}",
            "trainer.max_steps=2",
            "model.warmup_steps=1",
        ]
    )
    assert train(cfg)["global_step"] == 2


# --- the standard Hugging Face hub cache ---------------------------------------------------


def fake_hub_cache(hub_cache: Path, repo_type: str, repo_id: str, source: Path) -> Path:
    """``source``'s files as the hub cache's snapshot of ``repo_id`` at ``refs/main``."""
    repo = hub_cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    shutil.copytree(source, repo / "snapshots" / "0123abcd")
    return repo / "snapshots" / "0123abcd"


def test_tokenizer_in_the_hf_cache_loads_offline(
    empty_hf_cache, tiny_tokenizer_dir, tiny_tokenizer
):
    with pytest.raises(HubUnavailableError):
        load_tokenizer("gpt2")
    fake_hub_cache(empty_hf_cache, "model", "gpt2", tiny_tokenizer_dir)
    assert load_tokenizer("gpt2").get_vocab() == tiny_tokenizer.get_vocab()


def test_dataset_in_the_hf_cache_loads_offline(empty_hf_cache, tiny_mirror):
    with pytest.raises(HubUnavailableError):
        load_math_data(1.0, show_progress=False)
    for repo_id in ("openai/gsm8k", "EleutherAI/hendrycks_math"):
        fake_hub_cache(empty_hf_cache, "dataset", repo_id, tiny_mirror / repo_id)
    texts, meta = load_math_data(1.0, show_progress=False)
    assert len(texts) == 30 + 21 and "snapshots" in meta["sources"][0]["location"]


def _swapped_copy(tokenizer_dir: Path, out: Path) -> Path:
    """A copy of ``tokenizer_dir`` whose vocabulary has two ids swapped: another tokenizer of
    the same size."""
    shutil.copytree(tokenizer_dir, out)
    definition = json.loads((out / "tokenizer.json").read_text())
    vocab = definition["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (out / "tokenizer.json").write_text(json.dumps(definition))
    return out


def test_offline_matches_the_tokenizer_by_identity_not_by_name(
    mirror, cache_dir, tmp_path, tiny_tokenizer
):
    """An entry built with the docs' path form (``--tokenizer <mirror>/gpt2``) serves an offline
    run naming the tokenizer by its Hub id (not loadable here: no mirror, empty HF cache), and
    its vocabulary size; so does an entry built from the same files under another name, found by
    their definition; an entry of another tokenizer does not."""
    built = prepare_domains(
        settings_for(mirror, cache_dir, tokenizer=str(mirror / "gpt2")), show_progress=False
    )
    offline = prepare_domains(settings_for(None, cache_dir), show_progress=False)
    assert offline.cache_path == built.cache_path and offline.from_cache
    datamodule = MixedDomainDataModule(tokenizer="gpt2", cache_dir=str(cache_dir))
    assert datamodule.vocab_size == len(tiny_tokenizer)

    elsewhere = shutil.copytree(mirror / "gpt2", tmp_path / "scratch" / "tok")
    half = settings_for(mirror, cache_dir, tokenizer=str(elsewhere), size_mb=0.5)
    built_half = prepare_domains(half, show_progress=False)
    offline = prepare_domains(settings_for(None, cache_dir, size_mb=0.5), show_progress=False)
    assert offline.cache_path == built_half.cache_path  # same definition as <mirror>/gpt2's

    other = _swapped_copy(mirror / "gpt2", tmp_path / "other" / "tok")
    quarter = settings_for(mirror, cache_dir, tokenizer=str(other), size_mb=0.25)
    other_info = prepare_domains(quarter, show_progress=False).tokenizer_info
    assert other_info["sha256"] != built.tokenizer_info["sha256"]
    with pytest.raises(HubUnavailableError):
        prepare_domains(settings_for(None, cache_dir, size_mb=0.25), show_progress=False)
