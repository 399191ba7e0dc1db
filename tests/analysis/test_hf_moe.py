"""``analyze --model``: a Hugging Face MoE measured on a domain set (tiny random-initialised
models of each supported family, built from the library's configs and saved with
``save_pretrained``; the tiny hub mirror's texts and its tokenizer, no network).

(a) the experts captured from the model's own forward equal each family's routing rule
    recomputed from the router's input, and for DeepSeek-V3 differ from top-k of the logits;
(b) a planted router comes out far above its document-level null; an untouched random router
    on two exchangeable domains does not;
(c) an unsupported MoE, a dense model, a model without a tokenizer, a set the tokenizer cannot
    encode: one line each, nothing written.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.hf_moe import FAMILIES, routing_rule, save_tiny_model
from helpers.mirror import _write_configs_readme, _write_parquet

from moe_emergence.analysis import external
from moe_emergence.analysis.analyze import main as analyze
from moe_emergence.analysis.hf_routing import (
    RoutingCapture,
    load_config,
    load_model,
    route_probe,
)
from moe_emergence.analysis.intervals import holm
from moe_emergence.analysis.probe import score_probe_routing
from moe_emergence.analysis.tables import read_table
from moe_emergence.errors import UserError

PERMUTATIONS = "99"  # the calibration tests' nulls (smallest p 0.01)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-models")
    return {t: save_tiny_model(root / t, t, tiny_tokenizer_dir) for t in FAMILIES}


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One token cache for the module: every model here shares the tiny tokenizer."""
    return tmp_path_factory.mktemp("token-cache")


def run_analyze(capsys, model: Path, out: Path, *extra: str, mirror: Path, cache: Path):
    capsys.readouterr()  # what building the model printed
    code = analyze(
        [
            "--model", str(model), "--hub-mirror", str(mirror), "--cache-dir", str(cache),
            "--size-mb", "0.05", "--block-size", "32", "--batch-size", "64",
            "--permutations", "19", "--out", str(out), "--no-progress", *extra,
        ]
    )  # fmt: skip
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------- (a) capture


@pytest.mark.parametrize("model_type", FAMILIES)
def test_captured_experts_follow_the_familys_rule(models, model_type):
    folder = models[model_type]
    loaded = load_model(model_type, str(folder), load_config("m", str(folder), False), "cpu", None)
    inputs: dict[int, torch.Tensor] = {}
    hooks = [
        m.router.register_forward_pre_hook(
            lambda mod, args, i=m.index: inputs.__setitem__(i, args[0].reshape(-1, 32))
        )
        for m in loaded.layers
    ]
    ids = torch.randint(0, 400, (3, 40), generator=torch.Generator().manual_seed(1))
    with RoutingCapture(loaded.layers, loaded.family) as capture, torch.no_grad():
        loaded.model(input_ids=ids)
        seen = capture.take()
    for hook in hooks:
        hook.remove()
    assert [m.index for m in loaded.layers] == [0, 1] and sorted(seen) == [0, 1]
    for m in loaded.layers:
        captured = seen[m.index]
        assert captured.ids.shape == (120, 2)
        assert torch.equal(captured.ids, routing_rule(m.router, model_type, inputs[m.index]))
        assert (captured.weights[:, 0] >= captured.weights[:, 1]).all()  # slot 0: first choice
        logits = torch.nn.functional.linear(inputs[m.index].float(), m.router.weight.float())
        top = logits.topk(2, dim=-1)[1].sort(-1)[0]
        differs = (captured.ids.sort(-1)[0] != top).any(-1).float().mean().item()
        if model_type == "deepseek_v3":  # group-limited choice on sigmoid + bias
            assert differs > 0.5
        elif model_type != "gpt_oss":  # (GPT-OSS's router adds a bias to these logits)
            assert differs == 0.0
        assert not m.experts._forward_pre_hooks and not m.router._forward_hooks


def test_gpt_oss_experts_called_by_keyword_are_captured(models):
    folder = models["gpt_oss"]
    loaded = load_model("g", str(folder), load_config("g", str(folder), False), "cpu", None)
    layer = loaded.layers[0]
    layer.experts.config._experts_implementation = "eager"  # its own forward and argument names
    hidden = torch.randn(5, 32)
    index = torch.tensor([[1, 2], [3, 4], [5, 6], [7, 0], [2, 1]])
    weights = torch.tensor([[0.4, 0.6], [0.9, 0.1], [0.5, 0.5], [0.2, 0.8], [0.7, 0.3]])
    with RoutingCapture(loaded.layers[:1], loaded.family) as capture, torch.no_grad():
        layer.experts(hidden, router_indices=index, routing_weights=weights)
        seen = capture.take()[layer.index]
    assert seen.ids.tolist() == [[2, 1], [3, 4], [5, 6], [0, 7], [2, 1]]  # by weight, stable


def test_experts_that_never_ran_are_refused(models):
    folder = models["olmoe"]
    loaded = load_model("o", str(folder), load_config("o", str(folder), False), "cpu", None)
    with (
        RoutingCapture(loaded.layers, loaded.family) as capture,
        pytest.raises(UserError, match="did not run"),
    ):
        capture.take()


# ---------------------------------------------------------------------- the command, per family


# One family per capture path: softmax top-k (Mixtral; OLMoE and Qwen share it), unsorted
# group-limited choice with a bias (DeepSeek-V3; V2 shares the layout), other argument names and
# a router bias (GPT-OSS). Every family's capture is checked above.
COMMAND_FAMILIES = ("mixtral", "deepseek_v3", "gpt_oss")


def test_the_command_writes_a_trained_runs_outputs(
    models, tiny_mirror, shared_cache, tmp_path, capsys
):
    for model_type in COMMAND_FAMILIES:
        folder = models[model_type]
        out = tmp_path / model_type
        code, printed, err = run_analyze(
            capsys, folder, out, "--save-routing", mirror=tiny_mirror, cache=shared_cache
        )
        assert code == 0, err
        for name in (
            "summary.md", "summary.json", "scores.csv", "counts.csv", "specialisation.csv",
            "repetition.csv", "relative_load.csv", "coactivation.csv", "expert_tokens.csv",
            "expert_tokens.md", "losses.csv", "heatmap.png", "probe.json", "data_report.json",
            "token_types.txt", "inspect/code.html", "inspect/math.html", "inspect/prose.html",
        ):  # fmt: skip
            assert (out / name).is_file(), (model_type, name)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["model_type"] == model_type and summary["moe_layers"] == [0, 1]
        assert "layer 1: NMI" in printed and "tokens/s" in printed and "peak" in printed
        # counts.csv is the captured routing's domain x expert table on the scored tokens
        saved = np.load(out / "routing.npz")
        rows = read_table(out / "counts.csv")
        domains = json.loads((out / "probe.json").read_text())["tokens"]
        for layer in (0, 1):
            experts, mask = saved[f"experts_{layer}"], saved["token_mask"]
            for d, domain in enumerate(domains):
                mine = mask & (saved["block_domains"] == d)[:, None]
                expected = np.bincount(experts[mine].ravel(), minlength=8)
                got = [
                    int(r["tokens"])
                    for r in rows
                    if r["layer"] == str(layer) and r["domain"] == domain
                ]
                assert got == expected.tolist()
            assert np.allclose(
                saved[f"weights_{layer}"][..., 0] >= saved[f"weights_{layer}"][..., 1], True
            )
    # every model here has the same tokenizer: one token-cache entry, reused
    assert len([p for p in shared_cache.iterdir() if (p / "manifest.json").is_file()]) == 1


def test_a_set_whose_file_names_a_tokenizer_is_read_with_the_models_own(
    models, tiny_mirror, tmp_path, capsys
):
    """#29 item 8: ``sample``'s file also sets ``tokenizer: sample_bpe``; here the model's own
    tokenizer reads it (the set's source is told by its datasets), not a one-line refusal."""
    out = tmp_path / "sample"
    code, _, err = run_analyze(
        capsys, models["mixtral"], out, "--domain-set", "sample",
        mirror=tiny_mirror, cache=tmp_path / "cache",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["domain_set"] == "sample"


def test_another_tokenizer_is_another_cache_entry_and_max_tokens_caps_the_probe(
    tiny_mirror, tiny_tokenizer_dir, shared_cache, tmp_path, capsys
):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    tokenizer.save_pretrained(tmp_path / "tok")
    folder = save_tiny_model(tmp_path / "model", "olmoe", tmp_path / "tok")
    cache = tmp_path / "cache"
    code, _, err = run_analyze(
        capsys, folder, tmp_path / "out", "--max-tokens", "1000", mirror=tiny_mirror, cache=cache
    )
    assert code == 0, err
    probe = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert sum(probe["blocks"].values()) * 32 <= 1000
    [entry] = [p for p in cache.iterdir() if (p / "manifest.json").is_file()]
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["tokenizer"]["vocab_size"] == len(tokenizer)


# ---------------------------------------------------------------------- (b) calibration


def load_probe(mirror: Path, tokenizer: Path, cache: Path, spec: str, size_mb: float):
    args = argparse.Namespace(
        size_mb=size_mb, block_size=32, hub_mirror=str(mirror), cache_dir=str(cache),
        no_progress=True, max_tokens=None,
    )  # fmt: skip
    return external.load_probe(args, spec, str(tokenizer))


def layer_scores(folder: Path, probe) -> dict[int, object]:
    """The scores of each MoE layer of the model in ``folder`` on ``probe`` (99 permutations)."""
    loaded = load_model("m", str(folder), load_config("m", str(folder), False), "cpu", None)
    routing = route_probe(
        loaded.model,
        loaded.layers,
        loaded.family,
        probe.input_ids,
        64,
        progress=False,
        with_loss=False,
    )
    entropy = {i: s / probe.input_ids.size for i, s in routing.entropy_sum.items()}
    scored = score_probe_routing(probe, routing.experts, entropy, 8, int(PERMUTATIONS), 0)
    return {layer: s for layer, (_, s) in scored.items()}


def plant(ids: np.ndarray):
    """Send the tokens ``ids`` to expert 0 in every MoE layer: their embeddings get a large
    coordinate 0 (every other token a small negative one) and each gate's expert-0 row reads
    only that coordinate."""

    def change(model: torch.nn.Module) -> None:
        with torch.no_grad():
            embedding = model.get_input_embeddings().weight
            embedding[:, 0] = -0.1
            embedding[torch.as_tensor(ids), 0] = 1.0
            for layer in model.model.layers:
                layer.mlp.gate.weight[0] = 0.0
                layer.mlp.gate.weight[0, 0] = 20.0

    return change


def test_a_planted_router_is_far_above_its_null_and_a_random_one(real_hub, tmp_path):
    tokenizer = real_hub / "gpt2"
    datamodule, probe = load_probe(real_hub, tokenizer, tmp_path / "cache", "code_math_prose", 0.1)
    # code's frequent tokens, on the training texts (the probe is held out)
    counts = {
        d: np.bincount(datamodule.train_packed.domain_blocks(d).ravel(), minlength=50257)
        for d in datamodule.domains
    }
    code = counts["code"] / counts["code"].sum()
    other = counts["math"] + counts["prose"]
    ids = np.flatnonzero((code > 4 * other / other.sum()) & (counts["code"] >= 5))
    for seed in (0, 1):
        planted = layer_scores(
            save_tiny_model(tmp_path / f"p{seed}", "mixtral", tokenizer, seed, plant(ids)), probe
        )
        random = layer_scores(
            save_tiny_model(tmp_path / f"r{seed}", "mixtral", tokenizer, seed), probe
        )
        for layer, s in planted.items():
            assert s.null_p == pytest.approx(0.01) and s.domain_gain_p == pytest.approx(0.01)
            assert s.nmi > 4 * s.null_p95 and s.nmi_low > s.null_p95
            assert s.nmi > 5 * random[layer].nmi, (seed, layer)


def test_an_untouched_random_router_on_exchangeable_domains_is_not_above_its_null(
    tiny_tokenizer_dir, tmp_path
):
    """Two domains drawn from one word generator: the document-label null is true, and no
    seed's model passes the MI test after Holm over its layers."""
    words = ["alpha", "beta", "gamma", "delta", "sum", "value", "river", "stone", "light", "x"]
    repo = tmp_path / "mirror" / "local" / "words"
    _write_configs_readme(repo, ["a", "b"])
    for config, seed in (("a", 1), ("b", 2)):
        rng = np.random.default_rng(seed)
        rows = [{"text": " ".join(rng.choice(words, rng.integers(40, 80)))} for _ in range(40)]
        _write_parquet(repo / config / "train-00000-of-00001.parquet", rows, ["text"])
    spec = tmp_path / "words.yaml"
    spec.write_text(
        "domain_set:\n"
        + "".join(
            f"  {c}:\n    - dataset: local/words\n      configs: [{c}]\n      text: '{{text}}'\n"
            for c in ("a", "b")
        )
    )
    _, probe = load_probe(
        tmp_path / "mirror", tiny_tokenizer_dir, tmp_path / "cache", str(spec), 0.05
    )
    assert probe.domains == ("a", "b") and probe.matching["documents_per_domain"] >= 18
    for seed in (0, 1, 2, 3):
        folder = save_tiny_model(tmp_path / f"r{seed}", "mixtral", tiny_tokenizer_dir, seed)
        scores = layer_scores(folder, probe)
        assert min(holm([s.null_p for s in scores.values()])) > 0.05, seed
        assert all(s.nmi < 2 * s.null_p95 for s in scores.values()), seed


# ---------------------------------------------------------------------- (c) refusals


def word_level_tokenizer(out: Path) -> Path:
    """A fast word-level tokenizer that knows three words: every text of the mirror is [UNK]."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<eos>": 1, "apple": 2, "pear": 3, "plum": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<eos>")
    fast.save_pretrained(out)
    return out


def refused_model(case: str, root: Path, tokenizer_dir: Path) -> Path:
    from transformers import AutoConfig, AutoTokenizer

    folder = root / case
    if case == "unsupported":  # an MoE family whose routing is not captured here
        AutoConfig.for_model("phimoe", num_local_experts=4, hidden_size=32).save_pretrained(folder)
    elif case == "dense":
        AutoConfig.for_model("llama", hidden_size=32).save_pretrained(folder)
    elif case == "no_tokenizer":
        save_tiny_model(folder, "mixtral", None)
    elif case == "other_tokenizer":  # 400 ids in the model, 410 in the tokenizer
        save_tiny_model(folder, "mixtral", None)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        tokenizer.add_tokens([f"extra{i}" for i in range(10)])
        tokenizer.save_pretrained(folder)
    elif case == "long_blocks":
        save_tiny_model(folder, "mixtral", tokenizer_dir)
    else:
        save_tiny_model(folder, "mixtral", word_level_tokenizer(root / "words"))
    return folder


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unsupported", "model type 'phimoe' .* is an MoE whose routing cannot be captured"),
        ("dense", "model type 'llama' .* is a dense model"),
        ("no_tokenizer", "its folder holds no tokenizer .* or pass --tokenizer"),
        ("other_tokenizer", "has 410 ids but the model only 400: it is not the model's"),
        ("long_blocks", "--block-size 1024 exceeds --model .*'s 512 positions"),
        ("unencodable", "the tokenizer cannot encode domain 'code' \\(100% of its probe tokens"),
    ],
)
def test_models_and_sets_it_cannot_measure_are_refused_in_one_line(
    case, message, tiny_mirror, tiny_tokenizer_dir, tmp_path, capsys
):
    folder = refused_model(case, tmp_path / "models", tiny_tokenizer_dir)
    out = tmp_path / "out"
    extra = ["--block-size", "1024"] if case == "long_blocks" else []
    code, printed, err = run_analyze(
        capsys, folder, out, *extra, mirror=tiny_mirror, cache=tmp_path / "c"
    )
    assert code == 1 and printed == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --"), err
    assert re.search(message, lines[0]), lines[0]
    if case in ("unsupported", "dense"):
        assert "supported MoE families: Mixtral (mixtral), OLMoE (olmoe)" in lines[0]
        assert "GPT-OSS (gpt_oss)" in lines[0]
    assert not out.exists()


def test_path_and_model_exclude_each_other(tmp_path, capsys):
    for argv, said in (
        ([str(tmp_path), "--model", str(tmp_path)], "exclude each other"),
        ([], "pass PATH"),
        ([str(tmp_path), "--domain-set", "sample"], "--domain-set only go with --model"),
    ):
        with pytest.raises(SystemExit) as exit_:
            analyze(argv)
        assert exit_.value.code == 2 and said in capsys.readouterr().err
