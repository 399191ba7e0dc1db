"""The offline first run: the sample_bpe tokenizer and `experiment=demo`, shortened."""

from __future__ import annotations

import json

import pytest
from helpers.configs import short_demo_overrides

from moe_emergence.config import compose_config
from moe_emergence.data.prepare import load_data_tokenizer
from moe_emergence.data.sample.corpus import load_sample_domain
from moe_emergence.data.sample.tokenizer import VOCAB_SIZE, sample_tokenizer_dir
from moe_emergence.data.tokenize import encode_texts
from moe_emergence.train import train


@pytest.fixture(scope="session")
def sample_bpe(sample_cache):
    return load_data_tokenizer("sample_bpe", cache_dir=sample_cache)


def test_sample_tokenizer_round_trips_every_domain(sample_bpe):
    assert len(sample_bpe) == VOCAB_SIZE
    assert sample_bpe.convert_ids_to_tokens(sample_bpe.eos_token_id) == "<|endoftext|>"
    for domain in ("code", "math", "prose"):
        texts = load_sample_domain(domain, 0.02)[0][:5]
        for text in texts:
            ids = sample_bpe(text, add_special_tokens=False)["input_ids"]
            assert sample_bpe.decode(ids, clean_up_tokenization_spaces=False) == text
        stream = encode_texts(texts, sample_bpe)
        assert stream.tokens.max() < VOCAB_SIZE
        assert (stream.tokens == sample_bpe.eos_token_id).sum() == len(texts)


def test_sample_tokenizer_is_trained_once_and_reused(sample_bpe, sample_cache):
    folder = sample_tokenizer_dir(sample_cache)
    made = (folder / "tokenizer.json").stat().st_mtime_ns
    again = load_data_tokenizer("sample_bpe", cache_dir=sample_cache)
    assert (folder / "tokenizer.json").stat().st_mtime_ns == made
    assert again.get_vocab() == sample_bpe.get_vocab()


def test_demo_composes_as_documented():
    cfg = compose_config(["experiment=demo"])
    assert cfg.data.source == "sample" and cfg.data.tokenizer == "sample_bpe"
    assert cfg.model.pretrained is None and cfg.trainer.accelerator == "cpu"


def test_demo_runs_a_few_steps(sample_cache, tmp_path):
    cfg = compose_config(short_demo_overrides(sample_cache, tmp_path))
    out = train(cfg)
    assert out["global_step"] == 3
    assert set(out["domain_losses"]) == {"code", "math", "prose"}
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert report["settings"]["source"] == "sample"
    assert report["tokenizer"]["vocab_size"] == VOCAB_SIZE
    assert {m["source"] for m in report["metadata"].values()} == {"sample"}
    for name in ("counts.csv", "trajectory.csv", "heatmap.png", "emergence.png"):
        assert (tmp_path / "routing" / name).stat().st_size > 0
    assert json.loads((tmp_path / "routing" / "probe.json").read_text())["probe"] == "held_out"


def test_data_cli_on_the_sample_source(sample_cache, tmp_path, capsys):
    from moe_emergence.data.cli import main

    report_path = tmp_path / "r.json"
    argv = [
        "--source",
        "sample",
        "--tokenizer",
        "sample_bpe",
        "--size-mb",
        "0.05",
        "--block-size",
        "32",
        "--cache-dir",
        str(sample_cache),
        "--no-progress",
        "--report",
        str(report_path),
    ]
    assert main(argv) == 0
    assert "Source: sample (offline corpus built on this machine)" in capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert report["settings"]["source"] == "sample"
    assert all(report["num_texts"][d] > 0 for d in ("code", "math", "prose"))
    assert all(m["source"] == "sample" for m in report["metadata"].values())
