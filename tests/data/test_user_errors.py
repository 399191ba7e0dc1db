"""User mistakes in the data inputs end in one ``error:`` line naming the value or file and the
fix, with no traceback: a local --tokenizer path that is missing, a file, empty or holds broken
JSON; mirror data files that are truncated, not parquet, or hold no rows; a --cache-dir that is
a file or cannot be written. Through the data CLI and, for some, train.py."""

from __future__ import annotations

import errno
import gzip
import shutil
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers.mirror import build_hub_mirror, default_mirror_content
from helpers.script import assert_one_error_line, run_train_script

from moe_emergence.data import cache as cache_module
from moe_emergence.data.cli import main as data_cli
from moe_emergence.data.damage import DataFileError, check_local_files
from moe_emergence.data.domains import domain_set
from moe_emergence.data.prepare import load_data_tokenizer
from moe_emergence.data.sample.tokenizer import sample_tokenizer_dir
from moe_emergence.data.sources import load_domain
from moe_emergence.data.tokenize import load_tokenizer
from moe_emergence.errors import UserError

REPO = Path(__file__).resolve().parents[2]
WIKI = Path("Salesforce", "wikitext", "wikitext-103-raw-v1", "train-00000-of-00001.parquet")
GSM8K = Path("openai", "gsm8k", "main", "train-00000-of-00001.parquet")
CODE = Path("codeparrot", "codeparrot-clean", "file-000000000001.json.gz")
DEFAULT_SET = domain_set("code_math_prose")


def run_cli(mirror: Path, tokenizer: str, cache_dir: Path | str, capsys) -> str:
    argv = [
        "--size-mb",
        "0.01",
        "--block-size",
        "16",
        "--hub-mirror",
        str(mirror),
        "--tokenizer",
        tokenizer,
        "--cache-dir",
        str(cache_dir),
        "--no-progress",
    ]
    try:
        code = data_cli(argv)
    except SystemExit as exc:  # argparse's parser.error
        code = exc.code
    assert code == 1
    return capsys.readouterr().err


@pytest.fixture
def own_mirror(tmp_path) -> Path:
    """A private mirror (the session's tiny_mirror must stay intact)."""
    return build_hub_mirror(tmp_path / "hub", **default_mirror_content())


def leftovers(cache_dir: Path) -> list[str]:
    """Cache folders (finished or partial) under ``cache_dir``; lock and index files aside."""
    if not cache_dir.is_dir():
        return []
    return sorted(p.name for p in cache_dir.iterdir() if p.is_dir() and p.name != "tokenizers")


# --- 1. --tokenizer: a local path that is missing, a file, empty, or holds broken JSON --------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _tokenizer_case(case: str, tmp_path: Path, tokenizer_dir: Path) -> tuple[str, list[str]]:
    """(--tokenizer value, needles of the error line) for ``case``."""
    if case == "missing":
        value = str(tmp_path / "no-such-tokenizer")
        return value, [value, "does not exist", "tokenizer.json", "'gpt2'"]
    if case == "relative missing":
        return "./no-such-tokenizer", ["'./no-such-tokenizer'", "does not exist"]
    if case == "file":
        value = str(tmp_path / "tok.txt")
        Path(value).write_text("not a folder")
        return value, [value, "is a file", "tokenizer.json"]
    if case == "empty":
        (tmp_path / "empty").mkdir()
        return str(tmp_path / "empty"), [str(tmp_path / "empty"), "empty folder"]
    if case == "no tokenizer files":
        folder = tmp_path / "config-only"
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        return str(folder), [str(folder), "no tokenizer.json"]
    folder = Path(shutil.copytree(tokenizer_dir, tmp_path / "broken-tok"))
    if case == "tokenizer.json of another shape":  # valid JSON, not a tokenizer
        (folder / "tokenizer.json").write_text('{"model": {"type": "nothing"}, "version": 3}')
        return str(folder), [str(folder), "Cannot load tokenizer", "tokenizer.json"]
    name = "tokenizer.json" if case == "bad tokenizer.json" else "tokenizer_config.json"
    (folder / name).write_text("{bad")
    return str(folder), [str(folder / name), "not valid JSON", "line 1 column 2"]


TOKENIZER_CASES = [
    "missing",
    "relative missing",
    "file",
    "empty",
    "no tokenizer files",
    "bad tokenizer.json",
    "bad tokenizer_config.json",
    "tokenizer.json of another shape",
]


@pytest.mark.parametrize("case", TOKENIZER_CASES)
def test_cli_bad_local_tokenizer(case, tiny_mirror, tiny_tokenizer_dir, tmp_path, capsys):
    value, needles = _tokenizer_case(case, tmp_path, tiny_tokenizer_dir)
    err = run_cli(tiny_mirror, value, tmp_path / "cache", capsys)
    line = assert_one_error_line(err, *needles)
    assert "hf download" not in line  # no download hint for a local path
    assert leftovers(tmp_path / "cache") == []


def test_hub_name_missing_from_the_mirror_keeps_the_download_hint(tiny_mirror, tmp_path, capsys):
    err = run_cli(tiny_mirror, "org/tok", tmp_path / "cache", capsys)
    assert_one_error_line(err, "'org/tok'", "hf download org/tok")


def test_tokenizer_in_home_folder_is_expanded(tiny_tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(tiny_tokenizer_dir, tmp_path / "tok")
    assert load_tokenizer("~/tok").eos_token_id is not None


# --- 2. damaged data files in the mirror -------------------------------------------------------


def _not_parquet(path: Path) -> None:
    path.write_text("this is not a parquet file\n" * 20)


def _zero_row_parquet(path: Path) -> None:
    schema = pq.read_schema(path)
    pq.write_table(schema.empty_table(), path)


def _zero_row_gzip(path: Path) -> None:
    with gzip.open(path, "wt", encoding="utf-8"):
        pass


# (file, damage, words of the error, domain that streams it)
DAMAGES = {
    "truncated parquet": (WIKI, _truncate, "truncated", "prose"),
    "not parquet": (GSM8K, _not_parquet, "not a parquet file", "math"),
    "zero-row parquet": (WIKI, _zero_row_parquet, "holds no rows", "prose"),
    "truncated json.gz": (CODE, _truncate, "truncated", "code"),
    "zero-row json.gz": (CODE, _zero_row_gzip, "holds no rows", "code"),
}


def _damage(mirror: Path, case: str) -> tuple[Path, list[str], str]:
    rel, damage, words, domain = DAMAGES[case]
    damage(mirror / rel)
    dataset = "/".join(rel.parts[:2])
    fix = f"hf download {dataset} --repo-type dataset --local-dir {mirror / dataset}"
    return rel, [str(mirror / rel), words, fix], domain


@pytest.mark.parametrize("case", list(DAMAGES))
def test_cli_damaged_mirror_file(case, own_mirror, tiny_tokenizer_dir, tmp_path, capsys):
    _, needles, _ = _damage(own_mirror, case)
    cache_dir = tmp_path / "cache"
    err = run_cli(own_mirror, str(tiny_tokenizer_dir), cache_dir, capsys)
    assert_one_error_line(err, *needles)
    assert leftovers(cache_dir) == []  # found before streaming; nothing partial kept


def _a_line_that_is_not_json(path: Path) -> None:
    with gzip.open(path, "at", encoding="utf-8") as f:
        f.write("this line is not JSON\n")


def _renamed_column(path: Path) -> None:
    table = pq.read_table(path)
    pq.write_table(
        table.rename_columns(["body" if c == "text" else c for c in table.column_names]), path
    )


# Intact files of another shape: (file, change, domain that streams it, words of the error)
SHAPES = {
    "json.gz line not JSON": (CODE, _a_line_that_is_not_json, "code", "not what this source reads"),
    "parquet column renamed": (WIKI, _renamed_column, "prose", "reads field(s) text, which"),
}


@pytest.mark.parametrize("case", list(SHAPES))
def test_files_of_another_shape_are_one_line(
    case, own_mirror, tiny_tokenizer_dir, tmp_path, capsys
):
    rel, change, domain, words = SHAPES[case]
    change(own_mirror / rel)
    with pytest.raises(UserError) as excinfo:
        load_domain(
            domain, DEFAULT_SET[domain], 1.0, hub_mirror=str(own_mirror), show_progress=False
        )
    message = str(excinfo.value)
    assert "\n" not in message and words in message
    err = run_cli(own_mirror, str(tiny_tokenizer_dir), tmp_path / "cache", capsys)
    # The CLI ends with one line (datasets logs its own parse error before it).
    [line] = [x for x in err.splitlines() if x.startswith("error: ")]
    assert words in line and err.rstrip().endswith(line)


def _field_error(mirror: Path) -> str:
    with pytest.raises(UserError) as excinfo:
        load_domain("prose", DEFAULT_SET["prose"], 1.0, hub_mirror=str(mirror), show_progress=False)
    return str(excinfo.value)


@pytest.mark.parametrize("copy", ["another copy", "the same copy"])
def test_field_check_reads_the_files_not_the_arrow_cache(copy, tmp_path, monkeypatch):
    """A ``datasets`` cache warmed by a non-streaming load of a mirror (same dataset name and
    config) does not answer for a copy whose parquet column was renamed since: the field check
    gives a fresh copy's message (naming the field), and a template over the new column
    streams."""
    import datasets

    content = default_mirror_content()
    fresh = build_hub_mirror(tmp_path / "fresh", **content)
    _renamed_column(fresh / WIKI)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    expected = _field_error(fresh)
    assert "reads field(s) text, which" in expected and "fields are body" in expected

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "warm-cache"))
    warm = build_hub_mirror(tmp_path / "warm", **content)
    datasets.load_dataset(str(warm / "Salesforce" / "wikitext"), WIKI.parts[2], split="train")
    edited = warm if copy == "the same copy" else build_hub_mirror(tmp_path / "b", **content)
    _renamed_column(edited / WIKI)
    assert _field_error(edited) == expected
    body = [replace(DEFAULT_SET["prose"][0], text="{body}")]
    texts, _ = load_domain("prose", body, 0.001, hub_mirror=str(edited), show_progress=False)
    assert texts and texts[0] in content["wiki"]


@pytest.mark.parametrize("case", list(DAMAGES))
def test_damage_found_while_streaming_names_the_file(case, own_mirror, monkeypatch):
    """Without the up-front check (or past its cheap limits), the streaming failure itself is
    traced back to the file."""
    _, needles, domain = _damage(own_mirror, case)
    with pytest.raises(DataFileError) as excinfo:
        load_domain(
            domain,
            DEFAULT_SET[domain],
            1.0,
            hub_mirror=str(own_mirror),
            show_progress=False,
            check_files=False,
        )
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message
    assert excinfo.value.__cause__ is not None  # the library's error is kept as the cause


def test_large_truncated_gzip_is_left_to_streaming(own_mirror, monkeypatch):
    """The up-front check reads only small compressed files whole."""
    from moe_emergence.data import damage

    _damage(own_mirror, "truncated json.gz")
    monkeypatch.setattr(damage, "SMALL_FILE_BYTES", 0)
    check_local_files(DEFAULT_SET["code"], str(own_mirror))  # too big to read: passes
    with pytest.raises(DataFileError, match="truncated"):
        load_domain(
            "code", DEFAULT_SET["code"], 1.0, hub_mirror=str(own_mirror), show_progress=False
        )


def test_intact_mirror_passes_the_check(tiny_mirror):
    sources = [s for group in DEFAULT_SET.values() for s in group]
    check_local_files(sources, str(tiny_mirror))


# --- 3. --cache-dir: a file, or not writable / full during a build ------------------------------


@pytest.mark.parametrize("below", [False, True])
def test_cli_cache_dir_that_is_a_file(below, tiny_mirror, tiny_tokenizer_dir, tmp_path, capsys):
    file = tmp_path / "cache-file"
    file.write_text("x")
    cache_dir = file / "sub" if below else file
    err = run_cli(tiny_mirror, str(tiny_tokenizer_dir), cache_dir, capsys)
    assert_one_error_line(err, "--cache-dir", str(cache_dir), "is a file", "pass a folder")


def test_sample_tokenizer_with_a_cache_dir_that_is_a_file(tmp_path):
    file = tmp_path / "cache-file"
    file.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        load_data_tokenizer("sample_bpe", cache_dir=str(file))


@pytest.mark.parametrize(
    ("code", "fix"),
    [
        (errno.ENOSPC, "free disk space"),
        (errno.EACCES, "make it writable"),
        (errno.EROFS, "writable disk"),
    ],
)
def test_cli_cache_write_failure_removes_the_partial_build(
    code, fix, tiny_mirror, tiny_tokenizer_dir, tmp_path, capsys, monkeypatch
):
    calls = {"n": 0}
    write = cache_module._HashingWriter.write

    def failing_write(self, array):
        calls["n"] += 1
        if calls["n"] > 3:  # part of the cache is written first
            raise OSError(code, "simulated")
        write(self, array)

    monkeypatch.setattr(cache_module._HashingWriter, "write", failing_write)
    cache_dir = tmp_path / "cache"
    err = run_cli(tiny_mirror, str(tiny_tokenizer_dir), cache_dir, capsys)
    assert_one_error_line(err, f"'{cache_dir}'", fix, "--cache-dir")
    assert calls["n"] > 3
    assert leftovers(cache_dir) == []  # neither the entry nor its .tmp-* folder


def test_read_error_outside_the_cache_is_not_blamed_on_it(tmp_path):
    root = tmp_path / "cache"
    with pytest.raises(PermissionError), cache_module.writing_cache(root):
        raise PermissionError(errno.EACCES, "denied", str(tmp_path / "mirror" / "x.parquet"))


# --- 4. a damaged sample_bpe folder is retrained -----------------------------------------------


def test_damaged_sample_tokenizer_is_retrained(tmp_path):
    cache_dir = str(tmp_path / "cache")
    first = load_data_tokenizer("sample_bpe", cache_dir=cache_dir)
    (sample_tokenizer_dir(cache_dir) / "tokenizer.json").write_text("{bad")
    again = load_data_tokenizer("sample_bpe", cache_dir=cache_dir)
    assert len(again) == len(first) and again.eos_token_id == first.eos_token_id


# --- through train.py ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["bad tokenizer", "damaged file", "cache file"])
@pytest.mark.usefixtures("restore_log_handlers")
def test_train_script_one_line(case, own_mirror, tiny_tokenizer_dir, tmp_path, capsys, monkeypatch):
    tokenizer, cache_dir = str(tiny_tokenizer_dir), tmp_path / "cache"
    if case == "bad tokenizer":
        tokenizer, needles = _tokenizer_case("bad tokenizer.json", tmp_path, tiny_tokenizer_dir)
    elif case == "damaged file":
        _, needles, _ = _damage(own_mirror, "not parquet")
    else:
        cache_dir.write_text("x")
        needles = ["data.cache_dir", str(cache_dir), "is a file"]
    code = run_train_script(
        monkeypatch,
        "experiment=debug",
        f"data.hub_mirror={own_mirror}",
        f"data.tokenizer={tokenizer}",
        f"data.cache_dir={cache_dir}",
        "data.block_size=16",
        "data.size_mb=0.01",
        f"hydra.run.dir={tmp_path / 'run'}",
        "trainer.max_steps=1",
    )
    assert code == 1
    assert_one_error_line(capsys.readouterr().err, *needles)
