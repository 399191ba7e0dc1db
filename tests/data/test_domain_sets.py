"""Domain sets (conf/data/domains): the default set reproduces the blocks of the constant-defined
domains it replaced, every shipped set parses, and a bad set is one line naming the key."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from helpers.mirror import SHARED_HUB
from helpers.script import assert_one_error_line, run_train

from moe_emergence.config import check_group_overrides
from moe_emergence.data import MixedDomainDataModule
from moe_emergence.data.cli import parse_args
from moe_emergence.data.dataset import PackedMixedDomainDataset
from moe_emergence.data.domains import (
    available_sets,
    domain_set,
    parse_domains,
    read_domain_set,
)
from moe_emergence.data.packing import format_report
from moe_emergence.data.prepare import describe_request
from moe_emergence.data.settings import DataSettings
from moe_emergence.errors import UserError
from moe_emergence.runs import Checkpoint, check_resume_data

needs_shared_hub = pytest.mark.skipif(
    not (SHARED_HUB / "openai" / "gsm8k").is_dir(), reason="../shared/hub is absent"
)

# Measured with the code before domain sets existed (commit 4fdb34f, the domains as Python
# constants) on ../shared/hub: 0.25 MiB per domain, 128-token blocks, seed 3, 10% held out.
# (balance_tokens, train blocks, SHA-256 of the train blocks in order, of the held-out blocks,
# the data fingerprint); the token cache's fingerprint of that request.
PINNED = [
    (False, 1669, "34053ad734f71e6d", "062131ab4eb3f1b1", "246ea1d6205c9ef7"),
    (True, 1230, "afdd8706167868e1", "062131ab4eb3f1b1", "246ea1d6205c9ef7"),
]
PINNED_CACHE_FINGERPRINT = "77797709cf5984a6"


def blocks_digest(dataset) -> str:
    """SHA-256 (16 hex digits) over every block's domain label and token ids, in order."""
    digest = hashlib.sha256()
    for i in range(len(dataset)):
        item = dataset[i]
        digest.update(item["domain"].encode())
        digest.update(item["input_ids"].numpy().astype(np.int64).tobytes())
    return digest.hexdigest()[:16]


@needs_shared_hub
def test_default_set_gives_the_pinned_blocks_and_fingerprints(tmp_path):
    settings = DataSettings(size_mb=0.25, hub_mirror=str(SHARED_HUB), cache_dir=str(tmp_path))
    assert describe_request(settings.validate()).fingerprint == PINNED_CACHE_FINGERPRINT
    for balance, n_blocks, train, held_out, fingerprint in PINNED:
        dm = MixedDomainDataModule(
            size_mb=0.25,
            block_size=128,
            balance_tokens=balance,
            seed=3,
            hub_mirror=str(SHARED_HUB),
            cache_dir=str(tmp_path),
            show_progress=False,
            eval_fraction=0.1,
        )
        dm.prepare_data()
        dm.setup("fit")
        assert dm.domains == ("code", "math", "prose")
        assert len(dm.train_packed) == n_blocks
        assert blocks_digest(dm.train_packed) == train
        assert blocks_digest(dm.val_dataset) == held_out
        assert dm.data_fingerprint == fingerprint


def test_every_shipped_set_parses():
    assert {"code_math_prose", "sample", "gsm8k_vs_math", "en_de_wikipedia"} <= set(
        available_sets()
    )
    for name in available_sets():
        found = domain_set(name)
        assert len(found) >= 2 and all(found.values()), name
    default = domain_set("code_math_prose")
    assert [s.dataset for s in default["math"]] == ["openai/gsm8k", "EleutherAI/hendrycks_math"]
    assert len(default["math"][1].configs) == 7 and default["prose"][0].min_chars == 200
    assert DataSettings().domain_sources == default  # null: the source's default set
    assert DataSettings(source="sample").domain_sources == domain_set("sample")


def test_a_set_is_a_name_a_file_or_a_mapping(tmp_path):
    two = {"a": [{"dataset": "x/y", "text": "{t}"}], "b": [{"dataset": "x/z", "text": "{u}"}]}
    path = tmp_path / "mine.yaml"
    path.write_text(
        "domain_set:\n  a: [{dataset: x/y, text: '{t}'}]\n  b: [{dataset: x/z, text: '{u}'}]\n"
    )
    assert parse_domains(two) == parse_domains(str(path))
    assert tuple(parse_domains(two)) == ("a", "b")  # the set's order is the domain index
    assert parse_domains(two)["a"][0].configs == (None,)


ONE_DOMAIN = {"code": [{"dataset": "x/y", "text": "{t}"}]}
BAD_SETS = {
    "one domain only": (ONE_DOMAIN, "at least 2"),
    "empty source list": ({**ONE_DOMAIN, "math": []}, "math has no sources"),
    "unknown source key": (
        {**ONE_DOMAIN, "math": [{"datset": "x/y", "text": "{t}"}]},
        "math[0] has unknown key(s) datset",
    ),
    "missing text": ({**ONE_DOMAIN, "math": [{"dataset": "x/y"}]}, "math[0] needs text"),
    "template without field": (
        {**ONE_DOMAIN, "math": [{"dataset": "x/y", "text": "{0}"}]},
        "math[0].text",
    ),
    "broken template": (
        {**ONE_DOMAIN, "math": [{"dataset": "x/y", "text": "{t"}]},
        "math[0].text",
    ),
    "bad name": ({**ONE_DOMAIN, "9lives": [{"dataset": "x/y", "text": "{t}"}]}, "'9lives'"),
    "sample dataset on the hub source": (
        {**ONE_DOMAIN, "math": [{"dataset": "sample/generated-math", "text": "{t}"}]},
        "math[0].dataset",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SETS))
def test_a_bad_set_is_one_line_naming_the_key(case):
    spec, words = BAD_SETS[case]
    with pytest.raises(UserError) as excinfo:
        DataSettings(domain_set=spec).validate()
    message = str(excinfo.value)
    assert "\n" not in message and "data.domain_set" in message and words in message


def test_a_domain_written_twice_is_refused_before_hydra_composes(tmp_path):
    (tmp_path / "data" / "domains").mkdir(parents=True)
    (tmp_path / "data" / "domains" / "twice.yaml").write_text(
        "# @package data\ndomain_set:\n  a: [{dataset: x/y, text: '{t}'}]\n"
        "  a: [{dataset: x/z, text: '{t}'}]\n"
    )
    with pytest.raises(UserError, match=r"data/domains=twice: 'a' is written twice \(line 4"):
        check_group_overrides(["data/domains=twice"], tmp_path)
    with pytest.raises(
        UserError, match=r"data/domains=nope: there is no .*; the domain sets are tw"
    ):
        check_group_overrides(["-m", "data/domains=nope,twice"], tmp_path)
    with pytest.raises(ValueError, match="written twice"):
        read_domain_set(tmp_path / "data" / "domains" / "twice.yaml")


@needs_shared_hub
@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (
            ["data/domains=gsm8k_vs_math", "~data.domain_set.competition_math"],
            ["data.domain_set", "has 1 domain(s) (gsm8k)", "at least 2"],
        ),
        (
            ["data/domains=gsm8k_vs_math", "data.domain_set.gsm8k.0.text='{problem}'"],
            ["data.domain_set", "gsm8k[0].text '{problem}' reads field(s) problem", "question"],
        ),
        (["data/domains=gsm8k_math"], ["data/domains=gsm8k_math", "the domain sets are"]),
    ],
)
def test_bad_sets_through_train_py_are_one_line(overrides, needles, tmp_path):
    proc = run_train(
        "experiment=debug",
        f"data.hub_mirror={SHARED_HUB}",
        f"data.tokenizer={SHARED_HUB / 'gpt2'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"paths.run_dir={tmp_path / 'run'}",
        *overrides,
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    assert_one_error_line(proc.stderr, *needles)
    assert not any(Path(tmp_path / "cache").rglob("*.bin"))  # failed before any tokenizing


def test_balance_report_and_warning_work_for_any_number_of_domains(caplog):
    """Five domains (a domain set of any size): balancing keeps the smallest domain's block
    count for each, the warning names the smallest, every block keeps its label."""
    sizes = {"a": 80, "b": 400, "c_long_name": 160, "d": 96, "e": 240}
    streams = {
        d: (1000 * i + np.arange(n)).astype(np.uint16) for i, (d, n) in enumerate(sizes.items())
    }
    with caplog.at_level("WARNING", logger="moe_emergence"):
        ds = PackedMixedDomainDataset.from_token_streams(streams, 8, balance_tokens=True, seed=1)
    assert tuple(ds.domains) == tuple(sizes)
    assert ds.balanced_block_counts == {d: 10 for d in sizes}
    assert len(ds) == 50
    assert any("Smallest: a with 80 tokens" in m for m in caplog.messages)
    for i in range(len(ds)):
        item = ds[i]
        assert item["domain"] == list(sizes)[int(item["input_ids"][0]) // 1000]
    table = format_report(
        {
            d: {"num_texts": 1, "total_chars": n, "tokens": n, "blocks": n // 8}
            for d, n in sizes.items()
        }
    )
    assert len({len(line) for line in table.splitlines()}) == 1  # long names keep columns aligned


def test_the_data_cli_takes_a_domain_set():
    settings, _ = parse_args(["--domain-set", "gsm8k_vs_math"])
    assert tuple(settings.domain_sources) == ("gsm8k", "competition_math")
    settings, _ = parse_args(["--source", "sample"])
    assert settings.domain_sources == domain_set("sample")


def test_a_resume_with_other_domains_or_order_is_refused(tmp_path):
    class Data:
        domains = ("math", "code", "prose")

    start = Checkpoint(
        tmp_path / "last.ckpt", {"hyper_parameters": {"domains": ["code", "math", "prose"]}}
    )
    with pytest.raises(UserError, match=r"trained on the domains code, math, prose \(in this"):
        check_resume_data(Data(), 1, start)


def test_a_reordered_set_reuses_the_cache_and_keeps_its_own_order(
    tiny_mirror, tiny_tokenizer_dir, tmp_path
):
    """The cache entry is the same (sorted inputs), the streams and blocks follow the set."""
    forward = read_domain_set("code_math_prose")
    backward = dict(reversed(list(forward.items())))

    def datamodule(domain_set, cache: str = "cache") -> MixedDomainDataModule:
        dm = MixedDomainDataModule(
            size_mb=1.0,
            block_size=16,
            hub_mirror=str(tiny_mirror),
            tokenizer=str(tiny_tokenizer_dir),
            cache_dir=str(tmp_path / cache),
            show_progress=False,
            domain_set=domain_set,
        )
        dm.prepare_data()
        dm.setup("fit")
        return dm

    first, second = datamodule(backward), datamodule(forward)
    assert first.report["cache"]["path"] == second.report["cache"]["path"]
    assert first.domains == tuple(first.train_packed.domains) == ("prose", "math", "code")
    assert second.domains == tuple(second.train_packed.domains) == ("code", "math", "prose")
    fresh = datamodule(forward, "fresh")  # a cache the set itself built: the same blocks
    assert blocks_digest(fresh.train_packed) == blocks_digest(second.train_packed)


def test_a_hub_source_with_the_sample_set_points_to_a_hub_set(tmp_path):
    """``experiment=study_cpu data.source=hub``: the user wants the Hub, so the hint names a Hub
    set (not the sample set the experiment already picked)."""
    proc = run_train(
        "experiment=study_cpu", "data.source=hub", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path
    )
    assert proc.returncode != 0
    assert_one_error_line(proc.stderr, "pick a Hub set (train.py: data/domains=code_math_prose")
    assert "it sets source=sample" not in proc.stderr


# ---- #29 item 8: a set file outside Hydra, its fields' mistakes, a domain name's length ------


def _data_cli(capsys, *argv: str) -> str:
    from moe_emergence.data.cli import main as data_cli

    try:
        code = data_cli(list(argv))
    except SystemExit as exc:
        code = exc.code
    assert code != 0
    return capsys.readouterr().err


def test_a_named_set_whose_file_sets_the_source_names_the_cli_flags(tmp_path, capsys):
    """``--domain-set sample`` read the set but ignored its ``source: sample`` and ``tokenizer:
    sample_bpe``, then hinted Hydra's data/domains=sample; now one line with the CLI's flags."""
    err = _data_cli(capsys, "--domain-set", "sample", "--cache-dir", str(tmp_path / "c"))
    line = assert_one_error_line(err, "--source sample --tokenizer sample_bpe", "sample.yaml")
    assert "leave data.source out" not in line
    with pytest.raises(UserError, match="--source sample --tokenizer sample_bpe"):
        DataSettings(domain_set="sample").validate()  # datamodule_from_config, notebooks
    DataSettings(domain_set="sample", source="sample", tokenizer="sample_bpe").validate()
    DataSettings(domain_set="code_math_prose").validate()  # sets nothing else


def test_a_hub_set_on_the_sample_source_names_the_cli_flags_too(capsys):
    """The hint was in Hydra's syntax only (data/domains=sample, source=hub)."""
    err = _data_cli(capsys, "--domain-set", "code_math_prose", "--source", "sample")
    assert_one_error_line(err, "data CLI: --domain-set sample", "data CLI: --source hub")


def test_a_set_file_key_that_only_hydra_applies_is_refused(tmp_path):
    path = tmp_path / "batched.yaml"
    path.write_text(
        "batch_size: 4\ndomain_set:\n"
        "  a: [{dataset: x/a, text: '{t}'}]\n  b: [{dataset: x/b, text: '{t}'}]\n"
    )
    with pytest.raises(UserError, match=r"also sets batch_size.*data/domains=batched"):
        DataSettings(domain_set=str(path)).validate()


@pytest.mark.parametrize(
    ("entry", "needles"),
    [
        ("configs: [nope]", ["math[0].configs", "'nope'", "main"]),
        ("configs: [main]\n      split: nope", ["math[0].split", "'nope'", "train"]),
    ],
)
def test_a_wrong_config_or_split_names_the_set_files_field(
    entry, needles, tiny_mirror, tiny_tokenizer_dir, tmp_path, capsys
):
    """Was blamed on the download ("its files are not what this source reads ... re-download
    it with ...")."""
    path = tmp_path / "wrong.yaml"
    path.write_text(
        "domain_set:\n"
        "  code:\n    - dataset: codeparrot/codeparrot-clean\n      text: '{content}'\n"
        f"  math:\n    - dataset: openai/gsm8k\n      {entry}\n"
        "      text: '{question} {answer}'\n"
    )
    err = _data_cli(
        capsys,
        *("--domain-set", str(path), "--hub-mirror", str(tiny_mirror)),
        *("--tokenizer", str(tiny_tokenizer_dir), "--cache-dir", str(tmp_path / "c")),
        *("--size-mb", "0.01", "--block-size", "16", "--no-progress"),
    )
    line = assert_one_error_line(err, *needles)
    assert "download" not in line


def test_a_domain_name_past_the_file_name_limit_is_one_line():
    source = [{"dataset": "x/a", "text": "{t}"}]
    spec = {"a" * 300: source, "b": source}
    with pytest.raises(UserError, match=r"domain name 'a{10}.*300 characters.*at most \d+"):
        DataSettings(domain_set=spec).validate()
