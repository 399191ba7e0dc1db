"""Every user mistake ends in one line, ``error: <message>`` naming the value or file and the
fix, with a non-zero exit and no traceback: from the data CLI and from train.py. One policy
(:func:`moe_emergence.errors.report_user_errors`) for every entry point."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers.script import REPO, assert_one_error_line, run_train_script
from omegaconf.errors import InterpolationResolutionError

from moe_emergence.data.cli import main as data_cli
from moe_emergence.errors import USER_ERROR_STATUS, UserError, report_user_errors


def test_report_user_errors_prints_one_line_and_returns_1(capsys):
    assert report_user_errors(lambda: None) == 0
    assert capsys.readouterr().err == ""

    def mistake():
        raise UserError("--x 3 is too big: pass at most 2.")

    assert report_user_errors(mistake) == USER_ERROR_STATUS == 1
    assert capsys.readouterr().err == "error: --x 3 is too big: pass at most 2.\n"


def test_a_wrapped_user_error_is_one_line_too(capsys):
    def wrapped():  # as Hydra's instantiate wraps a constructor's error
        try:
            raise UserError("model.moe.n_experts must be >= 1, got 0")
        except UserError as exc:
            raise RuntimeError("Error in call to target 'MoEGPT2Module'") from exc

    assert report_user_errors(wrapped) == 1
    assert capsys.readouterr().err == "error: model.moe.n_experts must be >= 1, got 0\n"

    def resolver():  # OmegaConf re-raises a resolver's error without a cause
        try:
            raise UserError("data.tokenizer: no such folder")
        except UserError:
            raise InterpolationResolutionError("resolver failed") from None

    assert report_user_errors(resolver) == 1
    assert capsys.readouterr().err == "error: data.tokenizer: no such folder\n"


def test_other_errors_keep_their_traceback(capsys):
    def bug():
        raise KeyError("a bug")

    def not_a_mistake():  # raised while handling a UserError: not one
        try:
            raise UserError("first")
        except UserError:
            raise FileNotFoundError("second")  # noqa: B904

    for work in (bug, not_a_mistake):
        with pytest.raises((KeyError, FileNotFoundError)):
            report_user_errors(work)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "path",
    [
        "train.py",
        "moe_emergence/data/cli.py",
        "moe_emergence/analysis/analyze.py",
        "moe_emergence/analysis/inspect.py",
    ],
)
def test_every_entry_point_uses_the_one_policy(path):
    """Each entry point's main hands its work to report_user_errors and catches nothing itself."""
    tree = ast.parse(Path(REPO / path).read_text())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    calls = [n.func.id for n in ast.walk(main) if isinstance(n, ast.Call) and hasattr(n.func, "id")]
    assert "report_user_errors" in calls
    assert not [n for n in ast.walk(main) if isinstance(n, ast.ExceptHandler)]


@pytest.fixture
def cli_args(tiny_mirror, tiny_tokenizer_dir, tmp_path):
    return [
        "--size-mb",
        "0.01",
        "--block-size",
        "16",
        "--hub-mirror",
        str(tiny_mirror),
        "--tokenizer",
        str(tiny_tokenizer_dir),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--no-progress",
    ]


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--seed", "-1"], ["--seed", "-1"]),
        (["--block-size", "100000"], ["block_size=100000", "at most"]),
        (["--block-size", "10000000000000"], ["block_size=10000000000000", "--block-size"]),
        # The value the --max-example-chars hint suggests keeps no prose at all: said so (not
        # "use a block size of at most 0").
        (["--max-example-chars", "202", "--block-size", "64"], ["prose", "no text", "--max-ex"]),
        (["--report", "{tmp}"], ["--report", "is a folder"]),
        (["--report", "{tmp}/missing/r.json"], ["--report", "does not exist"]),
    ],
)
def test_data_cli_mistakes(cli_args, tmp_path, capsys, extra, needles):
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    try:
        code = data_cli([*cli_args, *extra])
    except SystemExit as exc:  # argparse's parser.error: usage line + one error line
        code = exc.code
    assert code != 0
    assert_one_error_line(capsys.readouterr().err, *needles)


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (["seed=-1"], ["seed", "-1"]),
        (["seed=abc"], ["seed", "'abc'"]),
        (["data.seed=-1"], ["data.seed", "-1"]),
        (["data.eval_fraction=1.5"], ["data.eval_fraction", "1.5"]),
        (["data.block_size=100000", "model.n_positions=100000"], ["block_size=100000"]),
        (["model.moe.n_experts=0"], ["model.moe.n_experts"]),
        (["model.moe.layers=[7]"], ["MoE layer index 7"]),
        (["data.block_size=64", "model.n_positions=32"], ["data.block_size=64", "n_positions=32"]),
        (["callbacks.routing_analysis.every_n_steps=0"], ["every_n_steps"]),
        (["data.balance_tokens=off"], ["balance_tokens", "'off'"]),
        (["data.hub_mirror={tmp}/empty-mirror"], ["codeparrot/codeparrot-clean", "empty-mirror"]),
        (["ckpt_path={tmp}/missing.ckpt"], ["ckpt_path", "missing.ckpt"]),
        (["init_from={tmp}"], ["init_from", "last.ckpt"]),
    ],
)
@pytest.mark.usefixtures("restore_log_handlers")
def test_train_script_mistakes(
    tiny_mirror, tiny_tokenizer_dir, tmp_path, capsys, monkeypatch, overrides, needles
):
    (tmp_path / "empty-mirror").mkdir()
    overrides = [o.replace("{tmp}", str(tmp_path)) for o in overrides]
    code = run_train_script(
        monkeypatch,
        "experiment=debug",
        f"data.hub_mirror={tiny_mirror}",
        f"data.tokenizer={tiny_tokenizer_dir}",
        "data.block_size=16",
        "data.size_mb=0.01",
        f"hydra.run.dir={tmp_path / 'run'}",
        "trainer.max_steps=1",
        *overrides,
    )
    assert code == 1
    assert_one_error_line(capsys.readouterr().err, *needles)


@pytest.mark.usefixtures("restore_log_handlers")
def test_pretrained_gpt2_on_a_mirror_without_weights_is_one_line(
    tiny_mirror, tiny_tokenizer_dir, tmp_path, capsys, monkeypatch
):
    """#29 item 7: ``python train.py ...`` with the default pretrained GPT-2 on a mirror holding
    its tokenizer but no weights ends in one line naming the download and model.pretrained=null,
    before any data is prepared (no token cache written)."""
    import shutil

    from transformers import GPT2Config

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for org in tiny_mirror.iterdir():
        (mirror / org.name).symlink_to(org)
    shutil.copytree(tiny_tokenizer_dir, mirror / "gpt2")
    GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2).save_pretrained(mirror / "gpt2")
    code = run_train_script(
        monkeypatch,
        "experiment=debug",
        "model.pretrained=gpt2",
        f"data.hub_mirror={mirror}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert code == 1
    line = assert_one_error_line(
        capsys.readouterr().err,
        "no weights",
        f"hf download gpt2 --local-dir {mirror / 'gpt2'}",
        "model.pretrained=null",
    )
    assert "huggingface-cli" not in line
    assert not (tmp_path / "cache").exists()  # refused before data preparation
