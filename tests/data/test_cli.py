"""The data CLI driven in-process: bad flags exit 2 before loading; the JSON report's counts
match a per-text recount; balance line and imbalance warning."""

from __future__ import annotations

import json
import logging

import pytest
from helpers.mirror import build_hub_mirror

from moe_emergence.data import cli
from moe_emergence.data.domains import domain_set
from moe_emergence.data.legacy import load_code_data, load_math_data, load_prose_data

DOMAINS = ("code", "math", "prose")  # the default domain set (conf/data/domains)
MATH_SUBJECTS = domain_set("code_math_prose")["math"][1].configs

IMBALANCE = "Warning: Token imbalance detected (>1.5x ratio)!"


@pytest.fixture
def no_loading(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("prepare_domains must not be called for bad input")

    monkeypatch.setattr(cli, "prepare_domains", fail)


def run_cli(argv, caplog, capsys) -> tuple[int, list[str]]:
    """Run ``main(argv)``; return its status and every output line (stdout and log records).

    Under pytest the root logger already has handlers, so the CLI's ``basicConfig`` is a no-op
    and its lines reach caplog rather than stdout.
    """
    caplog.set_level(logging.INFO)
    status = cli.main([str(a) for a in argv])
    lines = capsys.readouterr().out.splitlines()
    lines += [line for message in caplog.messages for line in message.splitlines()]
    return status, lines


def recount(tokenizer, mirror, size_mb, max_example_chars=10_000) -> dict[str, list[int]]:
    """Per domain, each text's token count plus one EOS, from the loaders and a plain call."""
    loaders = {"code": load_code_data, "math": load_math_data, "prose": load_prose_data}
    counts = {}
    for domain in DOMAINS:
        texts, _ = loaders[domain](
            size_mb, max_example_chars, hub_mirror=str(mirror), show_progress=False
        )
        counts[domain] = [len(tokenizer(text)["input_ids"]) + 1 for text in texts]
    return counts


def sentence(i: int, n: int) -> str:
    words = ["alpha", "beta", "gamma", "delta", "sum", "value", "river", "stone", "light"]
    out = " ".join(words[(i + k * 5) % len(words)] for k in range(n))
    return out[:n]


def mirror_with(root, code_texts: int, gsm_rows: int, wiki_texts: int):
    """All three domains built from the same kind of 250-char text, in the given amounts."""
    code = [sentence(i, 250) for i in range(code_texts)]
    gsm8k = [(sentence(i, 229), "a") for i in range(gsm_rows)]  # formatted: 250 chars
    math = {s: [(sentence(j, 20), "b")] for j, s in enumerate(MATH_SUBJECTS)}
    wiki = [sentence(i, 250) for i in range(wiki_texts)]
    return build_hub_mirror(root, code, gsm8k, math, wiki)


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--size-mb", "0"], ["--size-mb", "> 0", "0.0"]),
        (["--size-mb", "-1"], ["--size-mb", "> 0", "-1.0"]),
        (["--size-mb", "nan"], ["--size-mb", "> 0"]),
        (["--size-mb", "abc"], ["--size-mb"]),
        (["--block-size", "1"], ["--block-size", "≥ 2", "got 1"]),
        (["--block-size", "1.5"], ["--block-size"]),
        (["--max-example-chars", "150"], ["--max-example-chars", "150", "200", "prose"]),
        (["--hub-mirror", "/nonexistent"], ["--hub-mirror", "/nonexistent", "not a folder"]),
    ],
)
def test_bad_input_exits_2_before_loading(no_loading, capsys, argv, expected):
    with pytest.raises(SystemExit) as excinfo:
        cli.main(argv)
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    for part in expected:
        assert part in err


def test_infinite_size_mb_exits_2_before_loading(no_loading, capsys):
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["--size-mb", "inf"])
    assert excinfo.value.code == 2
    assert "--size-mb" in capsys.readouterr().err


# --- end to end on the tiny mirror ----------------------------------------------------------------


def tiny_argv(tiny_mirror, tiny_tokenizer_dir, report, *extra):
    return [
        "--hub-mirror",
        tiny_mirror,
        "--tokenizer",
        tiny_tokenizer_dir,
        "--block-size",
        "32",
        "--size-mb",
        "1",
        "--report",
        report,
        "--no-progress",
        *extra,
    ]


def test_report_counts_match_a_per_text_recount(
    tiny_mirror, tiny_tokenizer_dir, tiny_tokenizer, tmp_path, caplog, capsys
):
    report_path = tmp_path / "r.json"
    status, lines = run_cli(tiny_argv(tiny_mirror, tiny_tokenizer_dir, report_path), caplog, capsys)
    assert status == 0
    report = json.loads(report_path.read_text())

    for key in ("num_texts", "total_chars", "token_counts", "block_counts", "metadata"):
        assert set(report[key]) == set(DOMAINS), key
    assert "balanced_block_counts" not in report
    settings = report["settings"]
    assert settings["size_mb"] == 1.0
    assert settings["block_size"] == 32
    assert settings["balance_tokens"] is False
    assert settings["tokenizer"] == str(tiny_tokenizer_dir)
    assert settings["hub_mirror"] == str(tiny_mirror)
    assert report["tokenizer"]["name"] == str(tiny_tokenizer_dir)
    assert report["tokenizer"]["eos_token_id"] == tiny_tokenizer.eos_token_id

    per_text = recount(tiny_tokenizer, tiny_mirror, 1.0)
    assert max(n for counts in per_text.values() for n in counts) > 51  # recount not truncated
    for domain, counts in per_text.items():
        assert report["num_texts"][domain] == len(counts) == report["metadata"][domain]["num_texts"]
        assert report["token_counts"][domain] == sum(counts), domain
        assert report["block_counts"][domain] == sum(counts) // 32, domain
        assert report["total_chars"][domain] == report["metadata"][domain]["total_chars"]
    assert report["num_blocks"] == sum(report["block_counts"].values())
    assert any(line.startswith("Checks passed:") for line in lines)
    assert f"Report written to {report_path}" in lines


def test_balance_tokens_reports_and_logs_the_balanced_count(
    tiny_mirror, tiny_tokenizer_dir, tmp_path, caplog, capsys
):
    report_path = tmp_path / "r.json"
    argv = tiny_argv(tiny_mirror, tiny_tokenizer_dir, report_path, "--balance-tokens")
    status, lines = run_cli(argv, caplog, capsys)
    assert status == 0
    report = json.loads(report_path.read_text())
    n = min(report["block_counts"].values())
    assert report["balanced_block_counts"] == {d: n for d in DOMAINS}
    assert report["num_blocks"] == 3 * n
    assert report["settings"]["balance_tokens"] is True
    assert f"Balanced to {n} blocks per domain ({3 * n} total, ~{3 * n * 32:,} tokens)" in lines


@pytest.mark.parametrize(
    ("amounts", "imbalanced"),
    [((12, 7, 12), False), ((40, 7, 10), True)],
    ids=["balanced", "imbalanced"],
)
def test_imbalance_warning_exactly_when_ratio_exceeds_1_5(
    tmp_path, tiny_tokenizer_dir, caplog, capsys, amounts, imbalanced
):
    mirror = mirror_with(tmp_path / "hub", *amounts)
    report_path = tmp_path / "r.json"
    argv = tiny_argv(mirror, tiny_tokenizer_dir, report_path)
    status, lines = run_cli(argv, caplog, capsys)
    assert status == 0
    counts = json.loads(report_path.read_text())["token_counts"]
    assert (max(counts.values()) > 1.5 * min(counts.values())) is imbalanced  # the setup holds
    assert (IMBALANCE in lines) is imbalanced
    if imbalanced:
        smallest = min(counts, key=counts.get)
        at = lines.index(IMBALANCE)
        assert lines[at + 1] == f"  Smallest: {smallest} with {counts[smallest]:,} tokens"
        assert lines[at + 2] == f"  Largest has {max(counts.values()):,} tokens"


# --- real data ---------------------------------------------------------------------------------


def test_real_data_counts_match_gpt2_recount(real_hub, tmp_path, caplog, capsys):
    from transformers import AutoTokenizer

    report_path = tmp_path / "r.json"
    argv = [
        "--size-mb",
        "0.25",
        "--block-size",
        "256",
        "--hub-mirror",
        real_hub,
        "--tokenizer",
        real_hub / "gpt2",
        "--report",
        report_path,
        "--no-progress",
    ]
    status, _ = run_cli(argv, caplog, capsys)
    assert status == 0
    report = json.loads(report_path.read_text())
    tokenizer = AutoTokenizer.from_pretrained(real_hub / "gpt2")
    per_text = recount(tokenizer, real_hub, 0.25)
    for domain, counts in per_text.items():
        assert report["num_texts"][domain] == len(counts), domain
        assert report["token_counts"][domain] == sum(counts), domain
        assert report["block_counts"][domain] == sum(counts) // 256, domain
    assert max(per_text["code"]) > 51  # a code text over GPT-2's saved 50-token truncation


def test_no_network_and_no_mirror_is_one_clear_error(capsys):
    status = cli.main(["--size-mb", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith("error: Cannot load dataset 'codeparrot/codeparrot-clean'")
    assert "--hub-mirror" in err
    assert "Traceback" not in err
