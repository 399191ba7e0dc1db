"""One measurement core: the training callback and ``analyze`` route the same probe through the
same model with the same function, score it with the same function and build the rows of
counts.csv and trajectory.csv with the same function, so their files are equal byte for byte;
and those rows are what the columns of tables.py say."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers.callback import stub_trainer, two_document_probe
from helpers.moe import tiny_module

from moe_emergence.analysis import callback as callback_module
from moe_emergence.analysis.analyze import write_run_tables
from moe_emergence.analysis.callback import RoutingAnalysis
from moe_emergence.analysis.evaluate import evaluate_checkpoint, route_and_score, specialisation
from moe_emergence.analysis.probe import (
    make_probe,
    route_blocks,
    score_probe_routing,
    size_matched,
)
from moe_emergence.analysis.results import RunResult
from moe_emergence.analysis.scores import score_layer
from moe_emergence.analysis.settings import ProbeSettings
from moe_emergence.analysis.tables import (
    COUNTS,
    SPECIALISATION_TABLES,
    TRAJECTORY,
    read_table,
    routing_rows,
    specialisation_rows,
    write_table,
)
from moe_emergence.errors import UserError

STEP = 3
SETTINGS = {"batch_size": 4, "null_permutations": 19, "null_seed": 5}


def test_callback_and_analyze_write_the_same_routing_tables(tmp_path, monkeypatch):
    torch.manual_seed(0)
    module = tiny_module(moe={"layers": [0, 1], "n_experts": 4, "top_k": 2})
    probe = two_document_probe(module.domains, vocab_size=32, block_size=8)

    # Training time: the callback's own hooks, on one rank, with this probe.
    monkeypatch.setattr(callback_module, "build_probe", lambda *args, **kwargs: probe)
    trainer = stub_trainer(tmp_path, global_step=STEP)
    callback = RoutingAnalysis(**SETTINGS, out_dir=str(tmp_path / "callback"))
    callback.setup(trainer, module, "fit")
    callback.on_train_start(trainer, module)  # a fresh run: analyses the probe at STEP

    # analyze: the same model as a loaded checkpoint of that step.
    loaded = SimpleNamespace(model=module.model, step=STEP)
    result = evaluate_checkpoint(loaded, probe, None, SETTINGS, torch.device("cpu"))
    run = RunResult(
        name="run",
        run_dir=tmp_path,
        group="(no overrides)",
        seed=None,
        overrides=[],
        moe=True,
        domains=tuple(module.domains),
        layers=[0, 1],
        n_experts=4,
        probe=probe.kind,
        probe_blocks={},
        checkpoints=[result],
    )
    write_run_tables(run, tmp_path / "analyze")

    for name in ("counts.csv", "trajectory.csv"):
        trained = (tmp_path / "callback" / name).read_bytes()
        analysed = (tmp_path / "analyze" / name).read_bytes()
        assert trained == analysed, name
    # the field's metrics at the analysis step: analyze's function on analyze's routing
    _, experts = route_and_score(loaded, probe, None, SETTINGS, torch.device("cpu"))
    metrics = specialisation(probe, experts, None, 4, SETTINGS)
    expected = specialisation_rows(STEP, probe.kind, module.domains, result.counts, metrics)
    for (name, columns), rows in zip(SPECIALISATION_TABLES.items(), expected, strict=True):
        write_table(tmp_path / "expected" / f"{name}.csv", columns, rows)
        trained = (tmp_path / "callback" / f"{name}.csv").read_bytes()
        assert trained == (tmp_path / "expected" / f"{name}.csv").read_bytes(), name
    plain = {type(v) for rows in expected for row in rows for v in row.values()}
    assert plain <= {int, float, str}  # the callback's state loads with weights_only
    spec = read_table(tmp_path / "callback" / "specialisation.csv")
    assert len(spec) == 2 and all(r["saturation_top1"] == "nan" for r in spec)  # analyze's
    assert all(0 < float(r["coactivation_uniform"]) < 1 for r in spec)  # top-2: 1/3
    counts = read_table(tmp_path / "analyze" / "counts.csv")
    assert len(counts) == 2 * len(module.domains) * 4  # layers x domains x experts
    assert sum(int(r["tokens"]) for r in counts) == 2 * probe.input_ids.size * 2  # top-2
    assert {r["step"] for r in counts} == {str(STEP)}


def test_routing_rows_follow_the_columns_and_the_tables():
    domains = ("code", "math", "prose")
    probe = two_document_probe(domains, vocab_size=32, block_size=8)
    module = tiny_module(moe={"layers": [1], "n_experts": 3})
    routed = route_blocks(module.model, torch.from_numpy(probe.input_ids), 4)
    experts = {layer: e.numpy() for layer, e in routed.experts.items()}
    entropy = {layer: float(s) / probe.input_ids.size for layer, s in routed.entropy_sum.items()}
    scored = score_probe_routing(probe, experts, entropy, 3, n_permutations=9, seed=0)
    counts = {layer: table for layer, (table, _) in scored.items()}
    scores = {layer: s for layer, (_, s) in scored.items()}

    count_rows, trajectory_rows = routing_rows(7, probe.kind, domains, counts, scores)

    assert all(tuple(row) == COUNTS for row in count_rows)
    assert all(tuple(row) == TRAJECTORY for row in trajectory_rows)
    assert [(r["domain"], r["expert"]) for r in count_rows] == [
        (d, e) for d in domains for e in range(3)
    ]
    table = counts[1]
    assert [r["tokens"] for r in count_rows] == table.reshape(-1).tolist()
    assert trajectory_rows[0]["nmi"] == scores[1].nmi and trajectory_rows[0]["step"] == 7


def test_route_blocks_probs_are_the_router_distribution():
    module = tiny_module(moe={"layers": [1], "n_experts": 3, "top_k": 2})
    ids = torch.randint(0, 32, (5, 8), generator=torch.Generator().manual_seed(1))
    routed = route_blocks(module.model, ids, 2, with_probs=True)
    probs = routed.probs[1]
    assert probs.shape == (5, 8, 3) and probs.dtype == torch.float32
    assert torch.allclose(probs.sum(-1), torch.ones(5, 8))
    top = probs.topk(2, dim=-1).indices.sort(-1).values
    assert (top == routed.experts[1].sort(-1).values).all()  # eval mode: the top-k experts
    assert route_blocks(module.model, ids, 2).probs is None


# ----------------------------------------------------------------------------- size-matched probes


def _uneven_probe():
    """Block size 4; domain a: documents of 8 and 3 tokens (block 1 holds the 3-token document
    and the first token of a 1-token one); domain b: one document of 6 tokens and one of 2."""
    texts = np.array(
        [
            [0, 0, 0, 0],
            [0, 0, 0, 0],
            [1, 1, 1, 2],
            [5, 5, 5, 5],
            [5, 5, 6, 6],
        ]
    )
    ids = np.arange(20).reshape(5, 4)
    return make_probe(ids, np.array([0, 0, 0, 1, 1]), ("a", "b"), "held_out", texts)


def test_size_matched_keeps_as_many_documents_and_tokens_per_domain_as_it_can():
    probe = _uneven_probe()
    matched = size_matched(probe)
    # m = 1 document x min(8, 6) = 6 tokens per domain: 12 tokens; m = 2: min(3, 2) = 2: 8.
    assert matched.matching["documents_per_domain"] == 1
    assert matched.matching["tokens_per_document"] == 6
    kept = matched.scored
    assert kept.sum() == 12
    # Each domain's largest document, its first 6 tokens; the block of short documents goes.
    assert matched.input_ids[kept].tolist() == [0, 1, 2, 3, 4, 5, 12, 13, 14, 15, 16, 17]
    assert matched.input_ids.shape == (4, 4)
    assert matched.describe()["tokens"] == {"a": 6, "b": 6}
    assert matched.describe()["documents"] == {"a": 1, "b": 1}
    assert matched.matching["dropped"] == {
        "a": {"documents": 2, "tokens": 6},
        "b": {"documents": 1, "tokens": 2},
    }
    line = matched.summary()
    assert "size-matched: 1 documents per domain x 6 tokens" in line and "a 2 documents" in line
    assert "not size-matched" in probe.summary()
    assert matched.digest != probe.digest
    assert replace(probe, token_mask=np.ones((5, 4), dtype=bool)).digest == probe.digest
    with pytest.raises(ValueError):
        size_matched(matched)
    one_domain = make_probe(np.zeros((2, 4), dtype=np.int64), np.zeros(2), ("a", "b"), "held_out")
    with pytest.raises(UserError, match="size_matched"):
        size_matched(one_domain)


def test_a_size_matched_probe_is_scored_on_its_kept_tokens_only():
    matched = size_matched(_uneven_probe())
    rng = np.random.default_rng(0)
    experts = rng.integers(0, 3, (*matched.input_ids.shape, 2))
    scored = score_probe_routing(matched, {4: experts}, {4: 0.1}, 3, n_permutations=9, seed=1)
    table, scores = scored[4]
    assert table.sum() == 12 * 2  # the kept tokens, both slots
    assert scores.n_tokens == 12 and scores.n_documents == 2
    keep = matched.scored
    assert scores == score_layer(
        matched.input_ids,
        matched.token_docs,
        matched.doc_domains,
        experts,
        2,
        3,
        9,
        1,
        router_entropy=0.1,
        mask=keep,
    )


def test_size_matched_is_a_probe_setting_analyze_rebuilds():
    assert "size_matched" in ProbeSettings.PROBE_KEYS
    assert ProbeSettings().size_matched is False  # runs recorded before the key: unmatched


def test_the_callback_says_its_cost_first_shows_progress_and_times_each_analysis(
    tmp_path, monkeypatch, caplog, capfd
):
    # A new user's first run must not look hung: before the first analysis one line says what
    # each one routes and draws, a bar moves over the probe blocks and the null draws (rank 0,
    # when the trainer shows its own bar), and each analysis says its time when done.
    module = tiny_module(moe={"layers": [0, 1], "n_experts": 4})
    probe = two_document_probe(module.domains, vocab_size=32, block_size=8)
    monkeypatch.setattr(callback_module, "build_probe", lambda *args, **kwargs: probe)
    trainer = stub_trainer(tmp_path, max_steps=450, progress_bar=object())
    callback = RoutingAnalysis(**SETTINGS, every_n_steps=200)
    callback.setup(trainer, module, "fit")
    with caplog.at_level("INFO", logger=callback_module.log.name):
        callback.on_train_start(trainer, module)
    text = caplog.text
    assert "4 analyses in 450 steps" in text  # steps 0, 200, 400 and the end
    assert f"{probe.input_ids.shape[0]:,} blocks x 8 tokens" in text
    assert "19 permutations a null for 2 MoE layers" in text
    assert "Routing analysis at step 0:" in text and "s scoring" in text
    bars = capfd.readouterr().err
    assert "routing analysis, step 0: probe" in bars and "routing analysis, step 0: nulls" in bars

    trainer.progress_bar_callback = None  # no bar of its own (enable_progress_bar=False): none
    quiet = RoutingAnalysis(**SETTINGS, out_dir=str(tmp_path / "quiet"))
    quiet.setup(trainer, module, "fit")
    quiet.on_train_start(trainer, module)
    assert (tmp_path / "quiet" / "trajectory.csv").exists()  # it did analyse step 0
    assert "routing analysis" not in capfd.readouterr().err
