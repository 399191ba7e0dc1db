"""Token-level inspection: token-type tables (known answers), routing of one text, the CLI's
plain and coloured output, its HTML page (parsed) and its one-line errors."""

from __future__ import annotations

import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.configs import short_demo_overrides
from helpers.old_layout import write_per_expert_copy

from moe_emergence.analysis.inspect import encode, load_checkpoint, main, route_text
from moe_emergence.analysis.probe import route_blocks
from moe_emergence.analysis.token_types import (
    CATEGORIES,
    format_type_table,
    token_categories,
    token_type_table,
)
from moe_emergence.checkpoints import write_sidecar

CODE = "def f(x):\n    return x + 1\n"
LAYERS = (2, 3)  # tiny_moe's MoE layers
N_EXPERTS = 4


# ---------------------------------------------------------------------- token types (pure)


def _spans(text: str, pieces: list[str]) -> list[tuple[int, int]]:
    assert "".join(pieces) == text
    ends = np.cumsum([len(p) for p in pieces])
    return [(int(e - len(p)), int(e)) for p, e in zip(pieces, ends, strict=True)]


def test_token_categories_known_answers():
    text = "def f(x): return 1  # c"
    pieces = ["def", " f", "(", "x", "):", " return", " 1", "  ", "# c"]
    assert token_categories(text, _spans(text, pieces)) == [
        "keyword",
        "name",
        "operator",
        "name",
        "operator",
        "keyword",
        "number",
        "whitespace",
        "comment",
    ]
    experts = np.array([0, 1, 2, 2, 2, 0, 3, 3, 1])
    table = token_type_table(text, _spans(text, pieces), experts, N_EXPERTS)
    row = {c: table[i].tolist() for i, c in enumerate(CATEGORIES)}
    assert row["keyword"] == [2, 0, 0, 0]
    assert row["name"] == [0, 1, 1, 0]
    assert row["operator"] == [0, 0, 2, 0]
    assert row["number"] == [0, 0, 0, 1]
    assert row["comment"] == [0, 1, 0, 0]
    assert row["whitespace"] == [0, 0, 0, 1]
    assert row["string"] == row["other"] == [0, 0, 0, 0]
    text_table = format_type_table(table, "layer 2:")
    assert text_table.splitlines()[0] == "layer 2:"
    assert "string" not in text_table and re.search(r"keyword\s+2\s+0\s+0\s+0\s+2", text_table)


def test_token_types_strings_newlines_and_top_k():
    text = "s = f\"a{b}\" + 'c'\nif s:\n    pass\n"
    pieces = [
        "s",
        " =",
        ' f"a',
        "{b}",
        '"',
        " +",
        " 'c'",
        "\n",
        "if",
        " s",
        ":",
        "\n   ",
        " pass",
        "\n",
    ]
    cats = token_categories(text, _spans(text, pieces))
    assert cats[2:5] == ["string"] * 3 and cats[6] == "string"
    assert cats[7] == cats[11] == cats[13] == "whitespace" and cats[8] == "keyword"
    top2 = np.tile([[0, 1]], (len(pieces), 1))
    table = token_type_table(text, _spans(text, pieces), top2, 2)
    assert table.sum() == 2 * len(pieces) and (table[:, 0] == table[:, 1]).all()


def test_token_types_tolerate_partial_code():
    for text in ("def f(x:\n    return [1,", "if x:\n  'abc", "  x = 1\n y = $\n", ""):
        spans = [(i, i + 1) for i in range(len(text))]
        cats = token_categories(text, spans)
        assert len(cats) == len(text) and set(cats) <= set(CATEGORIES)
    text = "x = $y"
    assert token_categories(text, _spans(text, ["x", " =", " $", "y"])) == [
        "name",
        "operator",
        "other",
        "name",
    ]


def test_empty_span_takes_the_previous_category():
    text = "# é\n"
    assert token_categories(text, [(0, 1), (1, 3), (3, 3), (3, 4)]) == [
        "comment",
        "comment",
        "comment",
        "whitespace",
    ]


# ---------------------------------------------------------------------- a demo checkpoint


@pytest.fixture(scope="module")
def demo_ckpt(tmp_path_factory, sample_cache) -> Path:
    """A 3-step tiny_moe run on the sample corpus (block 64 = n_positions)."""
    from moe_emergence.config import compose_config
    from moe_emergence.train import train

    run_dir = tmp_path_factory.mktemp("inspect-run")
    cfg = compose_config(short_demo_overrides(sample_cache, run_dir, "~callbacks.routing_analysis"))
    train(cfg)
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def demo_tokenizer(sample_cache, demo_ckpt):
    from moe_emergence.data.prepare import load_data_tokenizer

    return load_data_tokenizer("sample_bpe", cache_dir=sample_cache)


def _edited_copy(ckpt: Path, folder: Path, edit) -> Path:
    """A copy of ``ckpt`` changed by ``edit(checkpoint dict)``, with its sidecar."""
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    edit(checkpoint)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "edited.ckpt"
    torch.save(checkpoint, out)
    write_sidecar(out)
    return out


class _TokenSpans(HTMLParser):
    """Per ``<section>``: the class and title of each token span and the page's text."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, list[dict]] = {}
        self._section: str | None = None
        self._span: dict | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self._section = attrs["id"]
            self.sections[self._section] = []
        elif tag == "span" and "tok" in attrs.get("class", "").split():
            self._span = {"class": attrs["class"].split(), "title": attrs["title"], "text": ""}
            self.sections[self._section].append(self._span)

    def handle_endtag(self, tag):
        if tag == "span":
            self._span = None

    def handle_data(self, data):
        if self._span is not None:
            self._span["text"] += data


def test_inspect_prints_experts_and_writes_html(demo_ckpt, demo_tokenizer, tmp_path, capsys):
    out = tmp_path / "tokens.html"
    assert main([str(demo_ckpt), "--text", CODE, "--html", str(out), "--color", "never"]) == 0
    printed = capsys.readouterr().out
    ids, _ = encode(demo_tokenizer, CODE)
    assert f"{len(ids)} tokens; MoE layers 2, 3 (4 experts, top-1)" in printed
    assert re.search(r"#\s+token\s+layer 2\s+layer 3", printed)
    rows = [line for line in printed.splitlines() if re.match(r"\s+\d+  '", line)]
    assert len(rows) == len(ids)
    for t, row in enumerate(rows):
        assert re.fullmatch(rf"\s+{t}  .+\s+e[0-3] [01]\.\d\d\s+e[0-3] [01]\.\d\d", row)
    assert "'def'" in rows[0] and "x1B" not in printed and "\x1b[" not in printed
    assert re.search(r"layer 2: e0 \d+, e1 \d+, e2 \d+, e3 \d+", printed)

    parser = _TokenSpans()
    parser.feed(out.read_text(encoding="utf-8"))
    assert list(parser.sections) == [f"layer-{i}" for i in LAYERS]
    routing = route_text(load_checkpoint(demo_ckpt).model, ids)
    seen = set()
    for layer in LAYERS:
        found = parser.sections[f"layer-{layer}"]
        assert len(found) == len(ids)  # one span per token
        assert "".join(s["text"] for s in found) == CODE  # whitespace kept, nothing else
        experts, probs = routing[layer]
        for t, span in enumerate(found):
            assert span["class"] == ["tok", f"e{experts[t, 0]}"]
            shares = re.findall(r"e\d (\d\.\d\d)", span["title"].split("|")[1])
            np.testing.assert_allclose([float(x) for x in shares], probs[t], atol=0.006)
            seen.add(span["class"][1])
    assert seen and all(re.fullmatch(r"e[0-3]", c) for c in seen)


def test_route_text_matches_route_blocks_and_windows(demo_ckpt, demo_tokenizer):
    model = load_checkpoint(demo_ckpt).model
    n = model.config.n_positions
    ids, _ = encode(demo_tokenizer, CODE * 14)
    assert 2 * n < len(ids) < 3 * n
    routing = route_text(model, ids)
    last = route_text(model, ids[2 * n :])  # the third window, routed by itself
    assert sorted(routing) == list(LAYERS)
    first = route_blocks(model, torch.as_tensor(ids[:n])[None], batch_size=1)
    for layer, (experts, probs) in routing.items():
        assert experts.shape == (len(ids), 1) and probs.shape == (len(ids), N_EXPERTS)
        np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-5)
        assert (experts[:, 0] == probs.argmax(-1)).all()  # eval mode: no noise
        assert (experts[:n] == first.experts[layer][0].numpy()).all()
        assert (experts[2 * n :] == last[layer][0]).all()  # windows see no earlier context
    assert all(not m.training for m in model.modules())


def test_inspect_python_file_colour_and_long_text(demo_ckpt, tmp_path, capsys):
    source = tmp_path / "snippet.py"
    source.write_text("import os\n\n\ndef g(a, b=2):\n    return a * b  # twice\n" * 4)
    assert main([str(demo_ckpt), "--file", str(source), "--color", "always"]) == 0
    printed = capsys.readouterr().out
    assert "\x1b[48;5;" in printed and "layer 3  " in printed
    assert "exceed n_positions=64: routed in" in printed
    for layer in LAYERS:
        assert f"Python token types x expert, layer {layer}:" in printed
    assert re.search(r"keyword(\s+\d+){5}", printed) and re.search(r"comment(\s+\d+){5}", printed)

    assert main([str(demo_ckpt), "--text", "x = 1  # one", "--code", "--color", "never"]) == 0
    assert "Python token types x expert, layer 2:" in capsys.readouterr().out
    assert main([str(demo_ckpt), "--text", "x = 1", "--color", "never"]) == 0
    assert "token types" not in capsys.readouterr().out


def test_tokenizer_from_the_run_config_or_the_option(demo_ckpt, sample_cache, tmp_path, capsys):
    def drop_data(checkpoint):
        checkpoint.pop("datamodule_hyper_parameters")

    run = tmp_path / "run"
    bare = _edited_copy(demo_ckpt, run / "checkpoints", drop_data)
    assert main([str(bare), "--text", "x = 1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no tokenizer recorded" in err and "--tokenizer" in err
    argv = [str(bare), "--text", "x = 1", "--tokenizer", "sample_bpe", "--cache-dir"]
    assert main([*argv, str(sample_cache)]) == 0
    assert "layer 2" in capsys.readouterr().out
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text(
        "seed: 1\ndata:\n  tokenizer: sample_bpe\n  hub_mirror: null\n"
        f"  cache_dir: {sample_cache}\n  seed: ${{seed}}\n"
    )
    assert main([str(bare), "--text", "x = 1"]) == 0
    assert "layer 3" in capsys.readouterr().out


def test_inspect_mistakes_are_one_line(demo_ckpt, tiny_tokenizer_dir, tmp_path, capsys):
    def dense(checkpoint):
        checkpoint["hyper_parameters"]["moe"] = None

    dense_ckpt = _edited_copy(demo_ckpt, tmp_path / "dense", dense)
    unsigned = tmp_path / "unsigned" / "last.ckpt"
    unsigned.parent.mkdir()
    shutil.copy(demo_ckpt, unsigned)
    cases = [
        ([str(tmp_path / "nope.ckpt"), "--text", "x"], "does not exist"),
        ([str(unsigned), "--text", "x"], "no checksum file"),
        ([str(dense_ckpt), "--text", "x"], "dense model"),
        ([str(demo_ckpt), "--text", ""], "is empty"),
        ([str(demo_ckpt), "--file", str(tmp_path / "missing.py")], "does not exist"),
        ([str(demo_ckpt), "--text", "x", "--html", str(tmp_path / "no" / "x.html")], "create it"),
        ([str(demo_ckpt), "--text", "x", "--tokenizer", str(tmp_path / "none")], "none"),
        # A smaller vocabulary fits the embedding but names other tokens by the same ids.
        ([str(demo_ckpt), "--text", "x", "--tokenizer", str(tiny_tokenizer_dir)], "another vocab"),
    ]
    for argv, expected in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert expected in err, err
    with pytest.raises(SystemExit):
        main([str(demo_ckpt)])  # neither --text nor --file


def test_pretrained_model_is_rebuilt_from_its_config_only(demo_ckpt, tmp_path):
    """A run from pretrained weights: only config.json is read (no weights downloaded)."""
    reference = load_checkpoint(demo_ckpt).model
    folder = tmp_path / "tiny-gpt2"
    reference.config.save_pretrained(folder)  # config.json, no weights

    def pretrained(checkpoint):
        checkpoint["hyper_parameters"].update(pretrained=str(folder), n_head=12)

    loaded = load_checkpoint(_edited_copy(demo_ckpt, tmp_path / "run", pretrained))
    assert loaded.model.config.n_head == reference.config.n_head
    ids = np.arange(20)
    expected = route_text(reference, ids)
    for layer, (experts, probs) in route_text(loaded.model, ids).items():
        np.testing.assert_array_equal(experts, expected[layer][0])
        np.testing.assert_allclose(probs, expected[layer][1], atol=1e-6)


def test_a_per_expert_checkpoint_inspects_like_its_stacked_original(
    demo_ckpt, demo_tokenizer, tmp_path, capsys
):
    """A checkpoint of the per-expert layout (experts as separate modules, no dispatch path
    recorded) is converted to stacked weights on loading: the same logits and routing."""
    old = write_per_expert_copy(demo_ckpt, tmp_path / "old" / "last.ckpt")
    new_model, old_loaded = load_checkpoint(demo_ckpt), load_checkpoint(old)
    assert new_model.dispatch == "loop" and old_loaded.dispatch == "loop (per-expert layout)"
    ids, _ = encode(demo_tokenizer, CODE)
    batch = torch.tensor([ids[:64]])
    with torch.no_grad():
        assert torch.equal(old_loaded.model(batch).logits, new_model.model(batch).logits)
    assert main([str(old), "--text", CODE, "--color", "never"]) == 0
    printed = capsys.readouterr().out
    assert "trained with dispatch loop (per-expert layout)" in printed
    assert main([str(demo_ckpt), "--text", CODE, "--color", "never"]) == 0
    assert printed.split("\n", 1)[1] == capsys.readouterr().out.split("\n", 1)[1]
