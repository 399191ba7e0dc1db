"""Token-level inspection: token-type tables (known answers), routing of one text, the CLI's
plain and coloured output, its HTML page (parsed) with the per-expert token lists that analyze
writes for the same checkpoint, and its one-line errors."""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.configs import short_demo_overrides
from helpers.old_layout import write_per_expert_copy

from moe_emergence.analysis.analyze import main as analyze_main
from moe_emergence.analysis.inspect import encode, load_checkpoint, main, render_html, route_text
from moe_emergence.analysis.probe import route_blocks
from moe_emergence.analysis.specialisation import ExpertTokens
from moe_emergence.analysis.tables import read_table
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
    """Per ``<section>``: the class, title and text of each token span (``tok``) and listed
    token (``listed``), the section's paragraphs, and per table row its header cell (the
    expert) and the listed tokens in it."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, list[dict]] = {}
        self.paragraphs: dict[str, list[str]] = {}
        self.rows: dict[str, dict[str, list[dict]]] = {}
        self._section: str | None = None
        self._span: dict | None = None
        self._text: list[str] | None = None
        self._row: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = attrs.get("class", "").split()
        if tag == "section":
            self._section = attrs["id"]
            self.sections[self._section] = []
            self.paragraphs[self._section] = []
            self.rows[self._section] = {}
        elif tag == "span" and {"tok", "listed"} & set(classes):
            self._span = {"class": classes, "title": attrs["title"], "text": ""}
            self.sections[self._section].append(self._span)
            if "listed" in classes:
                self.rows[self._section][self._row].append(self._span)
        elif self._section is not None and (tag == "p" or (tag == "th" and classes)):
            self._text = []  # a caption, or an expert's row header

    def handle_endtag(self, tag):
        if tag == "span":
            self._span = None
        elif tag == "p" and self._text is not None:
            self.paragraphs[self._section].append("".join(self._text))
            self._text = None
        elif tag == "th" and self._text is not None:
            self._row = "".join(self._text)
            self.rows[self._section][self._row] = []
            self._text = None
        elif tag == "section":
            self._section = None

    def handle_data(self, data):
        if self._span is not None:
            self._span["text"] += data
        if self._text is not None:
            self._text.append(data)


def _listed(span: dict) -> tuple[str, str, str, bool]:
    """(token as repr, lift, count, replicated) of a listed token's text ``'tok' 1.23 (45) ✓``."""
    found = re.fullmatch(r"(.+) (\d+\.\d\d) \((\d+)\)( \u2713)?", span["text"], re.S)
    assert found, span
    assert ("rep" in span["class"]) == bool(found[4])
    return found[1], found[2], found[3], bool(found[4])


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
    assert list(parser.sections) == [f"{s}-{i}" for i in LAYERS for s in ("layer", "expert-tokens")]
    routing = route_text(load_checkpoint(demo_ckpt).model, ids)
    seen = set()
    for layer in LAYERS:
        found = parser.sections[f"layer-{layer}"]
        assert len(found) == len(ids)  # one span per token
        assert "".join(s["text"] for s in found) == CODE  # whitespace kept, nothing else
        experts, probs = routing[layer]
        for t, span in enumerate(found):
            assert span["class"][:2] == ["tok", f"e{experts[t, 0]}"]
            shares = re.findall(r"e\d (\d\.\d\d)", span["title"].split("|")[1])
            np.testing.assert_allclose([float(x) for x in shares], probs[t], atol=0.006)
            seen.add(span["class"][1])
    assert seen and all(re.fullmatch(r"e[0-3]", c) for c in seen)


def test_html_lists_each_experts_tokens_as_analyze_does(demo_ckpt, tmp_path, capsys):
    """Per MoE layer, a section with each expert's over-represented tokens on the run's probe:
    the rows of analyze's expert_tokens.csv for this checkpoint (text, lift, count, replicated),
    a caption with the chance reading and how many replicated; in the text, a token is
    underlined exactly where its expert's replicated list holds its id. The run's record sets
    the lists' settings (vocab_min_count, null_seed: the halves) away from the defaults, and
    few nulls for analyze (which the lists do not read)."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("last.ckpt", "last.ckpt.sha256"):
        shutil.copy(demo_ckpt.parent / name, run / "checkpoints" / name)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text(
        "callbacks:\n  routing_analysis:\n    vocab_min_count: 6\n    null_seed: 3\n"
        "    null_permutations: 9\n"
    )
    demo_ckpt = run / "checkpoints" / "last.ckpt"
    assert analyze_main([str(run), "--out", str(tmp_path / "an"), "--no-knockout"]) == 0
    capsys.readouterr()
    [folder] = (tmp_path / "an" / "runs").iterdir()
    expected = read_table(folder / "expert_tokens.csv")
    assert expected  # the demo run lists tokens, some replicated, some not
    assert {r["replicated"] for r in expected} == {"True", "False"}
    text = " the cat\n" + "".join(r["token"] for r in expected)  # listed tokens occur in it
    out = tmp_path / "tokens.html"
    assert main([str(demo_ckpt), "--text", text, "--html", str(out), "--color", "never"]) == 0
    printed = capsys.readouterr().out
    parser = _TokenSpans()
    parser.feed(out.read_text(encoding="utf-8"))
    ids, _ = encode(load_run_tokenizer_of(demo_ckpt), text)
    routing = route_text(load_checkpoint(demo_ckpt).model, ids)
    marked = 0
    for layer in LAYERS:
        mine = [r for r in expected if r["layer"] == str(layer)]
        rows = parser.rows[f"expert-tokens-{layer}"]
        assert list(rows) == [f"e{e}" for e in range(N_EXPERTS)]
        for e in range(N_EXPERTS):
            want = [
                (repr(r["token"]), f"{float(r['lift']):.2f}", r["count"], r["replicated"] == "True")
                for r in mine
                if r["expert"] == str(e)
            ]
            assert [_listed(span) for span in rows[f"e{e}"]] == want
        hits = sum(r["replicated"] == "True" for r in mine)
        [caption] = parser.paragraphs[f"expert-tokens-{layer}"]
        assert "lift = p(token | expert) / p(token) (1: as frequent on the expert as on" in caption
        assert caption.endswith(f" {hits} of {len(mine)} listed tokens replicated.")
        assert f"layer {layer}: {hits} of {len(mine)} listed tokens replicated" in printed
        replicated = {(r["expert"], r["token_id"]) for r in mine if r["replicated"] == "True"}
        for t, span in enumerate(parser.sections[f"layer-{layer}"]):
            listed = (str(routing[layer][0][t, 0]), str(ids[t])) in replicated
            assert ("rep" in span["class"]) == listed
            marked += listed
    assert marked  # the text holds tokens on their listed experts
    assert "Per-expert token lists on the run's probe: Probe (held_out)" in printed


def load_run_tokenizer_of(ckpt: Path):
    """The tokenizer the checkpoint records (the demo's sample_bpe)."""
    from moe_emergence.analysis.inspect import load_run_tokenizer, parse_args

    return load_run_tokenizer(load_checkpoint(ckpt), parse_args([str(ckpt), "--text", "x"]))


def test_listed_tokens_are_escaped_and_marked():
    """A listed token's text is HTML-escaped (shown as its repr); the text's tokens on an
    expert whose replicated list holds them carry class rep, others not."""
    lists = ExpertTokens(
        expert=np.array([0, 0, 1]),
        token_id=np.array([7, 8, 9]),
        count=np.array([12, 5, 4]),
        lift=np.array([3.5, 1.25, 2.0]),
        check_count=np.array([9, 0, 6]),
        check_lift=np.array([2.0, 0.0, 1.5]),
        replicated=np.array([True, False, True]),
        text=("<", '&"', "</pre><b>"),
    )
    tokens = ["<", "x", "</pre><b>", "<"]
    token_ids = [7, 1, 9, 7]
    experts = np.array([[0], [0], [0], [1]])  # id 9 is listed on e1, routed here to e0
    routing = {2: (experts, np.full((4, 2), 0.5, dtype=np.float32))}
    page = render_html(tokens, routing, 2, "t", token_lists={2: lists}, token_ids=token_ids)
    assert "<b>" not in page and "'<'" not in page and "&#x27;&lt;&#x27;" in page
    parser = _TokenSpans()
    parser.feed(page)
    rows = parser.rows["expert-tokens-2"]
    assert [_listed(s) for s in rows["e0"]] == [
        ("'<'", "3.50", "12", True),
        ("'&\"'", "1.25", "5", False),
    ]
    assert [_listed(s) for s in rows["e1"]] == [("'</pre><b>'", "2.00", "4", True)]
    assert parser.paragraphs["expert-tokens-2"][0].endswith(" 2 of 3 listed tokens replicated.")
    spans = parser.sections["layer-2"]
    assert "".join(s["text"] for s in spans) == "".join(tokens)
    assert ["rep" in s["class"] for s in spans] == [True, False, False, False]
    plain = render_html(tokens, routing, 2, "t")
    assert "expert-tokens" not in plain and " rep" not in plain


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
    # No data settings: no probe to list tokens on; --no-token-lists leaves them out.
    html_out = tmp_path / "t.html"
    assert main([str(bare), "--text", "x = 1", "--html", str(html_out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "records no data settings" in err
    assert "Or pass --no-token-lists." in err and not html_out.exists()
    assert main([str(bare), "--text", "x = 1", "--html", str(html_out), "--no-token-lists"]) == 0
    assert "token lists" not in capsys.readouterr().out
    page = html_out.read_text(encoding="utf-8")
    assert 'id="layer-3"' in page and "expert-tokens" not in page and "Underlined" not in page


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


def test_a_tokenizer_of_the_same_size_with_other_ids_is_refused(
    demo_ckpt, demo_tokenizer, sample_cache, tmp_path, capsys
):
    """Two ids swapped: the same vocabulary size, but each id names another token. Refused in
    one line against the identity the run recorded (its data_report.json, else the token cache
    entry holding the checkpoint's data); an unchanged copy of the run's tokenizer passes
    (#29 item 8)."""
    same, swapped = tmp_path / "same", tmp_path / "swapped"
    demo_tokenizer.save_pretrained(same)
    demo_tokenizer.save_pretrained(swapped)
    definition = json.loads((swapped / "tokenizer.json").read_text())
    vocab = definition["model"]["vocab"]
    names = {i: token for token, i in vocab.items()}
    vocab[names[100]], vocab[names[101]] = 101, 100
    (swapped / "tokenizer.json").write_text(json.dumps(definition))
    text = ["--text", "def f(x):\n    return x + 1\n"]
    assert main([str(demo_ckpt), *text, "--tokenizer", str(same)]) == 0
    capsys.readouterr()
    assert main([str(demo_ckpt), *text, "--tokenizer", str(swapped)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "is not the run's" in err and "data_report.json" in err and "--tokenizer" in err

    loose = tmp_path / "loose" / "last.ckpt"  # no run dir: the token cache tells
    loose.parent.mkdir()
    shutil.copy(demo_ckpt, loose)
    write_sidecar(loose)
    assert main([str(loose), *text, "--tokenizer", str(swapped)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not the run's" in err and str(sample_cache) in err, err
    assert main([str(loose), *text, "--tokenizer", str(same)]) == 0


def test_html_where_no_file_can_be_written_is_one_line(demo_ckpt, tmp_path, capsys, monkeypatch):
    """A read-only folder is refused before the checkpoint is loaded; a write that fails at the
    end (a full disk) is one line naming --html, not a traceback (#29 item 8)."""
    import errno

    from moe_emergence.analysis import inspect as inspect_module

    page = tmp_path / "page.html"

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    def no_work(*args, **kwargs):
        raise AssertionError("the work began")

    with monkeypatch.context() as patched:
        patched.setattr(inspect_module.tempfile, "mkstemp", read_only)
        patched.setattr(inspect_module, "load_checkpoint", no_work)
        assert main([str(demo_ckpt), "--text", "x = 1", "--html", str(page)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --html ") and err.count("\n") == 1, err
    assert "Read-only file system" in err and "writable folder" in err

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(inspect_module, "write_atomic", full)
    argv = [str(demo_ckpt), "--text", "x = 1", "--html", str(page), "--no-token-lists"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --html ") and err.count("\n") == 1, err
    assert "No space left on device" in err and not page.exists()


def test_the_token_lists_rebuild_hint_names_a_domain_set_file_that_stays(
    demo_ckpt, tmp_path, capsys
):
    """Data that cannot be rebuilt here (its mirror is gone) for a run of a domain set that no
    conf/data/domains file holds: the hint names --domain-set with a file written for it, and
    that file is still there after inspect ends (#29 item 8)."""
    from moe_emergence.data.domains import read_domain_set

    spec = {k: v for k, v in read_domain_set("code_math_prose").items() if k != "prose"}

    def other_data(checkpoint):
        data = checkpoint["datamodule_hyper_parameters"]
        data.update(source="hub", hub_mirror=str(tmp_path / "gone"), domain_set=spec)

    ckpt = _edited_copy(demo_ckpt, tmp_path / "run" / "checkpoints", other_data)
    assert main([str(ckpt), "--text", "x = 1", "--html", str(tmp_path / "t.html")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Per-expert token lists") and err.count("\n") == 1, err
    found = re.search(r"--domain-set (\S+domain_set\.yaml)", err)
    assert found and Path(found.group(1)).is_file(), err
    shutil.rmtree(Path(found.group(1)).parent)
