"""MixedDomainDataModule on a tiny fixture mirror: batches, idempotent setup, held-out split."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moe_emergence.data import MixedDomainDataModule
from moe_emergence.train import datamodule_from_config

DOMAINS = ("code", "math", "prose")  # the default domain set (conf/data/domains)


def overrides(mirror, tokenizer, *extra):
    return [
        f"data.hub_mirror={mirror}",
        f"data.tokenizer={tokenizer}",
        "data/size=1mb",
        "data.block_size=32",
        "data.batch_size=4",
        "data.show_progress=false",
        *extra,
    ]


@pytest.fixture
def dm(tiny_mirror, tiny_tokenizer_dir, tmp_path):
    dm = datamodule_from_config(
        overrides(tiny_mirror, tiny_tokenizer_dir, f"data.report_dir={tmp_path}")
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_batch_shape_and_domain_labels(dm):
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 32) and batch["input_ids"].dtype == torch.long
    assert len(batch["domains"]) == 4 and set(batch["domains"]) <= set(DOMAINS)


def test_setup_twice_is_harmless(dm):
    dataset = dm.train_dataset
    first = [dataset[i]["input_ids"].tolist() for i in range(len(dataset))]
    dm.setup("fit")
    assert dm.train_dataset is dataset
    assert [dm.train_dataset[i]["input_ids"].tolist() for i in range(len(dataset))] == first


def test_report_written_like_the_cli(dm, tmp_path):
    report = json.loads((tmp_path / "data_report.json").read_text())
    for key in ("num_texts", "total_chars", "token_counts", "block_counts", "metadata"):
        assert set(report[key]) == set(DOMAINS), key
    assert report["settings"]["block_size"] == 32
    assert report["block_counts"] == {d: c // 32 for d, c in report["token_counts"].items()}


def test_no_validation_without_eval_fraction(dm):
    from lightning.pytorch.utilities.model_helpers import is_overridden

    assert dm.val_dataset is None
    assert not is_overridden("val_dataloader", dm)


def test_loader_settings():
    dm = MixedDomainDataModule(num_workers=2, batch_size=3)
    assert dm.persistent_workers is True and dm.pin_memory == torch.cuda.is_available()
    assert MixedDomainDataModule(num_workers=0).persistent_workers is False


def test_eval_split_holds_out_whole_texts(tiny_mirror, tiny_tokenizer_dir, tmp_path):
    dm = datamodule_from_config(
        overrides(
            tiny_mirror,
            tiny_tokenizer_dir,
            "data.eval_fraction=0.1",
            "data/balance=on",
            "data.block_size=8",
        )
    )
    dm.prepare_data()
    dm.setup("fit")
    from lightning.pytorch.utilities.model_helpers import is_overridden

    assert is_overridden("val_dataloader", dm)
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape[1] == 8
    report = dm.report
    for domain in DOMAINS:
        held_out = dm.eval_text_ids[domain]
        assert 0 < len(held_out) < report["num_texts"][domain]
        # the eval side is never balanced; the train side is
        assert dm.val_dataset.balanced_block_counts is None
        train_tokens = dm.train_dataset.token_counts[domain]
        assert train_tokens == report["token_counts"][domain]
        eval_tokens = dm.val_dataset.token_counts[domain]
        assert train_tokens + eval_tokens == report["all_token_counts"][domain]
    assert len(set(dm.train_dataset.balanced_block_counts.values())) == 1


def test_eval_split_too_small_is_a_clear_error(tiny_mirror, tiny_tokenizer_dir):
    dm = datamodule_from_config(
        overrides(
            tiny_mirror,
            tiny_tokenizer_dir,
            "data.eval_fraction=0.01",
            "data.eval_min_texts=0",
            "data.block_size=512",
        )
    )
    with pytest.raises(ValueError, match=r"Held-out split too small.*data\.eval_fraction"):
        dm.setup("fit")


def test_probe_documents_are_the_held_out_texts(tiny_mirror, tiny_tokenizer_dir, tmp_path, caplog):
    """Every held-out block's tokens map to the texts they were cut from: the tokens of text j
    in the probe are text j's tokens in the domain's whole stream, and a domain short of
    ``eval_min_texts`` is named in a warning."""
    from moe_emergence.analysis.probe import build_probe
    from moe_emergence.data.prepare import prepare_domains

    dm = datamodule_from_config(
        overrides(
            tiny_mirror,
            tiny_tokenizer_dir,
            "data.eval_fraction=0.05",
            "data.eval_min_texts=1000",
            "data.block_size=16",
            f"data.report_dir={tmp_path}",
        )
    )
    dm.setup("fit")
    assert "holds out" in caplog.text and "data.eval_min_texts" in caplog.text
    probe = build_probe(dm, DOMAINS)
    streams = prepare_domains(dm.settings, show_progress=False).streams
    pairs = zip(probe.doc_domains.tolist(), probe.doc_texts.tolist(), strict=True)
    assert probe.n_docs == len(set(pairs))
    assert (probe.doc_texts >= 0).all()
    for u in range(probe.n_docs):
        domain = DOMAINS[probe.doc_domains[u]]
        assert probe.doc_texts[u] in dm.eval_text_ids[domain]
        stream = streams[domain]
        start, end = stream.doc_offsets[probe.doc_texts[u] : probe.doc_texts[u] + 2]
        text = stream.tokens[start:end]
        mine = probe.input_ids[probe.token_docs == u]  # block-major: in stream order
        assert len(mine) <= len(text)
        starts = (0, len(text) - len(mine))  # whole, or its head / tail at a probe edge
        assert any(np.array_equal(text[i : i + len(mine)], mine) for i in starts)
    held = {d: len(dm.eval_text_ids[d]) for d in DOMAINS}
    assert all(n * 2 <= dm.report["num_texts"][d] + 1 for d, n in held.items())
    assert probe.describe()["documents"] == {
        d: int((probe.doc_domains == i).sum()) for i, d in enumerate(DOMAINS)
    }
