"""``python -m moe_emergence.analyze`` on a tiny 2-condition x 2-seed sweep trained here: the
summary files with n = 2 and finite intervals, routing, router saturation and held-out loss equal
to what the run measured during training, a single run dir and a single checkpoint, a gone token
cache, and one-line errors for bad paths."""

from __future__ import annotations

import json
import lzma
import math
import shlex
import shutil
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
from helpers.configs import tiny_overrides
from helpers.old_layout import write_per_expert_copy
from helpers.script import assert_one_error_line, train_in

from moe_emergence.analysis.analyze import main
from moe_emergence.analysis.tables import SATURATION, read_table
from moe_emergence.checkpoints import write_sidecar
from moe_emergence.errors import UserError
from moe_emergence.runs import find_runs, run_overrides

STEPS = 4
LAYERS = ("2", "3")  # tiny_moe's MoE layers
DOMAINS = ("code", "math", "prose")


@pytest.fixture(scope="module")
def sweep(tiny_mirror, tiny_tokenizer_dir, tmp_path_factory) -> Path:
    """``train.py -m condition=top1,dense seed=1,2``: tiny_moe and its dense twin, 4 steps, a
    checkpoint every 2, validation and routing analysis every 2, 20% of texts held out."""
    root = tmp_path_factory.mktemp("analyze")
    args = tiny_overrides(tiny_mirror, tiny_tokenizer_dir, None)  # each job's own folder
    return train_in(
        root,
        "-m",
        "condition=top1,dense",
        "seed=1,2",
        *args,
        f"trainer.max_steps={STEPS}",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "data.eval_fraction=0.2",
        "trainer.val_check_interval=2",
        "trainer.check_val_every_n_epoch=null",
        "callbacks.routing_analysis.every_n_steps=2",
    )


def _analyze(capsys, *args: str) -> tuple[int, str, str]:
    code = main([*map(str, args), "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def _run_dirs(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir())


def test_sweep_summary_has_two_seeds_per_condition(sweep, tmp_path, capsys):
    code, out, err = _analyze(capsys, sweep, "--out", tmp_path)
    assert code == 0, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["groups"]) == 2
    moe = next(g for g, info in summary["groups"].items() if info["moe"])
    dense = next(g for g, info in summary["groups"].items() if not info["moe"])
    assert "condition=top1" in moe and "condition=dense" in dense
    assert "seed" not in moe and "hub_mirror" not in moe  # grouped without seed and places
    assert summary["groups"][moe]["seeds"] == [1, 2]
    assert summary["groups"][moe]["final_steps"] == [STEPS, STEPS]
    assert summary["groups"][moe]["dense_twin"] == dense

    rows = summary["rows"]
    # every row with a value rests on both seeds (a score field the runs lack reads NaN: n 0)
    assert rows and {r["n"] for r in rows if r["mean"] is not None} == {2}
    for group, metric, layer, method in [
        (moe, "nmi", 2, "t"),
        (moe, "token_id_nmi", 3, "t"),
        (moe, "nmi_change", 2, "t"),
        (moe, "nmi_change_low", 2, "t"),  # each run's document-paired interval
        (moe, "nmi_change_high", 3, "t"),
        (moe, "nmi_step0", 3, "t"),
        (moe, "loss_code", None, "t"),
        (dense, "loss_prose", None, "t"),
        (moe, "loss_minus_dense", None, "paired_t"),
    ]:
        key = (group, metric, layer)
        row = next(r for r in rows if (r["group"], r["metric"], r["layer"]) == key)
        assert row["method"] == method
        assert math.isfinite(row["ci_low"]) and math.isfinite(row["ci_high"])
        assert row["ci_low"] <= row["mean"] <= row["ci_high"]
    fold = next(
        r for r in rows if (r["group"], r["metric"], r["layer"]) == (moe, "nmi_fold_change", 2)
    )
    assert (fold["method"], fold["family"], fold["n"]) == ("log_t", "fold_change", 2)
    low, high, change = (
        next(r for r in rows if (r["group"], r["metric"], r["layer"]) == (moe, m, 2))["values"]
        for m in ("nmi_change_low", "nmi_change_high", "nmi_change")
    )
    assert all(lo <= c <= hi for lo, c, hi in zip(low, change, high, strict=True))
    # the knock-out readings of the final checkpoint, over both seeds; own domain tested
    own = next(
        r
        for r in rows
        if (r["group"], r["metric"], r["layer"]) == (moe, "knockout_excess_code_on_code", 2)
    )
    assert (own["n"], own["method"], own["family"]) == (2, "t", "knockout_own")
    family = next(f for f in summary["families"] if f["name"] == "knockout_own")
    assert family["m"] == len(LAYERS) * len(DOMAINS)
    assert not any(r["metric"].startswith("knockout") for r in rows if r["group"] == dense)
    # each seed's initial model once (the dense runs have no routing)
    assert [m["seeds"] for m in summary["initial_models"].values()] == [[1, 2]]
    csv_rows = read_table(tmp_path / "summary.csv")
    assert len(csv_rows) == len(rows)
    md = (tmp_path / "summary.md").read_text()
    assert (
        "| layer" in md and "## Holm families" in md and "## Step 0, once per initial model" in md
    )
    for figure in ("emergence.png", "heatmaps.png", "saturation.png", "held_out_loss.png"):
        assert (tmp_path / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"\n  {figure}\n" in out  # listed with the summary's other outputs
    assert "summary.md" in out and "NMI" in out


def test_a_frozen_twin_gives_the_primary_row_and_shares_its_step_0(sweep, tmp_path, capsys):
    """The top-1 runs and a copy of them recorded as ``condition=frozen_router`` (the same
    checkpoints: the same initial model per seed): the top-1 - frozen router rows come first,
    step 0 is counted once per seed, and every tested row is in one declared family."""
    twins = tmp_path / "sweep"
    for run in (p for p in _run_dirs(sweep) if "condition=top1" in p.name):
        shutil.copytree(run, twins / run.name)
        frozen = twins / run.name.replace("condition=top1", "condition=frozen_router")
        shutil.copytree(run, frozen)
        record = frozen / ".hydra" / "overrides.yaml"
        record.write_text(record.read_text().replace("condition=top1", "condition=frozen_router"))
        for copy in (twins / run.name, frozen):  # step 0 and the final step are enough (time)
            for path in (copy / "checkpoints").glob("step000002.ckpt*"):
                path.unlink()
    code, _, err = _analyze(capsys, twins, "--out", tmp_path / "out", "--no-knockout")
    assert code == 0, err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    [(label, (top1, frozen))] = summary["primary"].items()
    assert "condition=top1" in top1 and "condition=frozen_router" in frozen
    rows = summary["rows"]
    primary = [r for r in rows if r["group"] == label]
    assert {(r["metric"], r["layer"]) for r in primary} == {
        (m, int(layer)) for m in ("nmi", "domain_gain") for layer in LAYERS
    }
    nmi = next(r for r in primary if (r["metric"], r["layer"]) == ("nmi", 2))
    assert (nmi["method"], nmi["family"], nmi["values"]) == ("paired_t", "primary_nmi", [0, 0])
    [model] = summary["initial_models"].values()  # one per seed, not one per condition
    assert sorted(model["groups"]) == sorted([top1, frozen]) and model["seeds"] == [1, 2]
    family = next(f for f in summary["families"] if f["name"] == "step0_above_null")
    assert family["m"] == 2 * len(LAYERS)  # seeds x layers, not conditions x seeds x layers
    tested = [(r["group"], r["layer"], r["metric"]) for r in rows if r["family"]]
    assert len(tested) == len(set(tested))
    md = (tmp_path / "out" / "summary.md").read_text()
    assert md.split("\n## ")[1].startswith("Primary: top-1 - frozen router")


def test_routing_and_loss_equal_the_runs_own_measurements(sweep, tmp_path, capsys):
    """The analysis of a checkpoint repeats the training-time analysis of that step exactly:
    same probe, same eval-mode routing (counts equal cell for cell), and the held-out loss is
    the logged ``val/loss_<domain>`` of that step."""
    moe_run = next(p for p in _run_dirs(sweep) if "condition=top1" in p.name)
    code, _, err = _analyze(capsys, moe_run, "--out", tmp_path)
    assert code == 0, err
    [folder] = (tmp_path / "runs").iterdir()
    analysed = read_table(folder / "counts.csv")
    trained = read_table(moe_run / "routing" / "counts.csv")
    steps = sorted({r["step"] for r in analysed}, key=int)
    assert steps == ["0", "2", "4"]  # step 0 and every checkpoint (last.ckpt: not twice)
    for step in steps:
        mine = {
            (r["layer"], r["domain"], r["expert"]): r["tokens"]
            for r in analysed
            if r["step"] == step
        }
        theirs = {
            (r["layer"], r["domain"], r["expert"]): r["tokens"]
            for r in trained
            if r["step"] == step
        }
        assert mine == theirs and len(mine) == len(LAYERS) * len(DOMAINS) * 4
    trajectory = read_table(folder / "trajectory.csv")
    trained_scores = {
        (r["step"], r["layer"]): r for r in read_table(moe_run / "routing" / "trajectory.csv")
    }
    assert len(trajectory) == len(trained_scores) == 3 * len(LAYERS)
    for row in trajectory:  # every score, its nulls and controls, cell for cell
        assert row["probe"] == "held_out"
        assert row == trained_scores[row["step"], row["layer"]]
    # router saturation measured at the end of fit == analyze's against the last checkpoint
    analysed_spec = {(r["step"], r["layer"]): r for r in read_table(folder / "specialisation.csv")}
    saturation = read_table(moe_run / "routing" / "saturation.csv")
    assert [(r["step"], r["layer"]) for r in saturation] == list(analysed_spec)
    for row in saturation:
        assert row["final_step"] == str(STEPS)
        for name in SATURATION[4:]:
            assert row[name] == analysed_spec[row["step"], row["layer"]][name], (row, name)

    logged = {}
    for r in read_table(moe_run / "csv" / "metrics.csv"):
        for domain in DOMAINS:
            if r.get(f"val/loss_{domain}"):
                logged[r["step"], domain] = float(r[f"val/loss_{domain}"])
    losses = read_table(folder / "losses.csv")
    assert {r["domain"] for r in losses} == set(DOMAINS)
    for r in [r for r in losses if r["step"] != "0"]:  # training validates from step 2 on
        # Lightning logs validation at the step count before the step that ran it.
        before = (str(int(r["step"]) - 1), r["domain"])
        expected = logged.get(before, logged.get((r["step"], r["domain"])))
        assert float(r["loss"]) == pytest.approx(expected, rel=1e-5)
        assert float(r["perplexity"]) == pytest.approx(math.exp(float(r["loss"])))
    summary = json.loads((tmp_path / "summary.json").read_text())
    # one run: values, no intervals (a score field the run lacks reads NaN: n 0)
    assert {r["n"] for r in summary["rows"] if r["mean"] is not None} == {1}
    assert all(r["ci_low"] is None for r in summary["rows"])
    assert (folder / "token_types.txt").read_text().count("layer ") == len(LAYERS)
    # knock-out: every layer x removed x measured domain; the intact loss is losses.csv's
    knockout = read_table(folder / "knockout.csv")
    assert len(knockout) == len(LAYERS) * len(DOMAINS) ** 2 * 3  # preferred, control, difference
    final_loss = {r["domain"]: float(r["loss"]) for r in losses if r["step"] == str(STEPS)}
    for r in knockout:
        assert r["step"] == str(STEPS) and r["layer"] in LAYERS
        assert float(r["intact"]) == pytest.approx(final_loss[r["measured"]], rel=1e-9)
        if r["role"] == "preferred" and r["removed"] == r["measured"]:
            assert float(r["ci_low"]) <= float(r["change"]) <= float(r["ci_high"])


def test_single_checkpoint_and_a_gone_cache(sweep, tmp_path, capsys):
    run = next(p for p in _run_dirs(sweep) if "condition=top1" in p.name)
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    code, _, err = _analyze(
        capsys, copy / "checkpoints" / "step000002.ckpt", "--out", tmp_path / "one"
    )
    assert code == 0, err
    [folder] = (tmp_path / "one" / "runs").iterdir()
    assert {r["step"] for r in read_table(folder / "counts.csv")} == {"2"}
    before = read_table(folder / "counts.csv")

    assert (folder / "knockout.csv").is_file()

    # The token cache is gone: analyze rebuilds it from the checkpoint's data settings.
    shutil.rmtree(sweep.parent / "cache")
    code, _, err = _analyze(
        capsys,
        copy / "checkpoints" / "step000002.ckpt",
        "--out",
        tmp_path / "again",
        "--no-knockout",
    )
    assert code == 0, err
    [folder] = (tmp_path / "again" / "runs").iterdir()
    assert read_table(folder / "counts.csv") == before
    assert not (folder / "knockout.csv").exists()
    summary = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert not any(r["metric"].startswith("knockout") for r in summary["rows"])


def test_overrides_group_without_seed_and_places(tmp_path):
    hydra = tmp_path / ".hydra"
    hydra.mkdir()
    (hydra / "overrides.yaml").write_text(
        "- condition=top2\n- seed=3\n- data.hub_mirror=/m\n- paths.run_dir=/r\n"
        "- trainer.enable_progress_bar=false\n- +model.lb_window=4\n- experiment=study_cpu\n"
    )
    assert run_overrides(tmp_path) == (
        ["+model.lb_window=4", "condition=top2", "experiment=study_cpu"],
        3,
    )
    assert run_overrides(None) == ([], None)


@pytest.mark.parametrize("case", ["missing", "empty_dir", "no_checkpoints", "damaged", "not_ckpt"])
def test_bad_paths_give_one_line_errors(case, sweep, tmp_path, capsys):
    run = next(p for p in _run_dirs(sweep) if "condition=dense" in p.name)
    if case == "missing":
        path, needle = tmp_path / "nope", "does not exist"
    elif case == "empty_dir":
        path, needle = tmp_path, "holds no run dir"
    elif case == "no_checkpoints":
        path = tmp_path / "sweep"
        shutil.copytree(run / ".hydra", path / "0_job" / ".hydra")
        needle = "holds a checkpoint"
    elif case == "damaged":
        path = tmp_path / "run"
        shutil.copytree(run, path)
        (path / "checkpoints" / "step000002.ckpt.sha256").write_text("0" * 64 + "\n")
        needle = "does not match its checksum"
    else:
        path = tmp_path / "notes.ckpt"
        path.write_text("not a checkpoint")
        needle = "not a readable checkpoint"
    code, _, err = _analyze(capsys, path, "--out", tmp_path / "out")
    assert code == 1
    assert_one_error_line(err, needle)


def test_find_runs_skips_runs_without_checkpoints(sweep, tmp_path):
    shutil.copytree(_run_dirs(sweep)[0], tmp_path / "a")
    shutil.copytree(_run_dirs(sweep)[0] / ".hydra", tmp_path / "b" / ".hydra")
    runs, notes = find_runs(tmp_path, "PATH")
    assert [r.name for r in runs] == ["a"] and notes == ["b: no checkpoints, skipped"]
    names = ["step000000.ckpt", "step000002.ckpt", "step000004.ckpt"]
    assert [p.name for p in runs[0].checkpoints] == names
    with pytest.raises(UserError, match="does not exist"):
        find_runs(tmp_path / "gone", "PATH")


def test_per_expert_checkpoints_analyse_like_their_stacked_originals(sweep, tmp_path, capsys):
    """A run whose checkpoints hold experts in the per-expert layout (before stacked experts)
    analyses to the counts and scores the run measured while training."""
    moe_run = next(p for p in _run_dirs(sweep) if "condition=top1" in p.name)
    old_run = tmp_path / "old" / moe_run.name
    shutil.copytree(moe_run, old_run)
    for ckpt in sorted((old_run / "checkpoints").glob("*.ckpt")):
        write_per_expert_copy(ckpt, ckpt)
    code, out, err = _analyze(capsys, old_run, "--out", tmp_path / "analysis")
    assert code == 0, err
    assert "MoE dispatch at training: loop (per-expert layout) (1 run)" in out
    [folder] = (tmp_path / "analysis" / "runs").iterdir()
    key = lambda r: (r["step"], r["layer"], r["domain"], r["expert"])  # noqa: E731
    analysed = {key(r): r["tokens"] for r in read_table(folder / "counts.csv")}
    trained = {key(r): r["tokens"] for r in read_table(moe_run / "routing" / "counts.csv")}
    assert analysed == trained and len(analysed) == 3 * len(LAYERS) * len(DOMAINS) * 4
    trained_scores = read_table(moe_run / "routing" / "trajectory.csv")
    assert read_table(folder / "trajectory.csv") == trained_scores


def _copy_of_top1_run(sweep: Path, tmp_path: Path) -> Path:
    run = next(p for p in _run_dirs(sweep) if "condition=top1" in p.name)
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def test_a_changed_probe_is_refused_in_one_line(sweep, tmp_path, capsys):
    copy = _copy_of_top1_run(sweep, tmp_path)
    probe_file = copy / "routing" / "probe.json"
    described = json.loads(probe_file.read_text())
    described["digest"] = "0" * 64
    probe_file.write_text(json.dumps(described))
    code, out, err = _analyze(capsys, copy, "--out", tmp_path / "out")
    assert code == 1 and not out
    assert_one_error_line(err, "probe rebuilt here differs from the training-time one")
    assert "000000000000" in err and "probe.json" in err


def test_other_data_than_the_runs_is_refused_in_one_line(sweep, tmp_path, capsys):
    """A checkpoint whose train loader recorded another data fingerprint (as after the mirror
    or the cache changed in place) is refused before anything is scored."""
    copy = _copy_of_top1_run(sweep, tmp_path)
    for path in sorted((copy / "checkpoints").glob("*.ckpt")):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        loops = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
        for state in loops.get("combined_loader") or []:
            state["data_fingerprint"] = "f" * 16
        torch.save(checkpoint, path)
        write_sidecar(path)
    code, out, err = _analyze(capsys, copy, "--out", tmp_path / "out")
    assert code == 1 and not out
    assert_one_error_line(err, "not the data the run trained on", "fingerprint ffffffffffff")
    assert not (tmp_path / "out" / "summary.json").exists()


def test_a_moved_token_cache_is_found_with_cache_dir(sweep, tmp_path, capsys):
    copy = _copy_of_top1_run(sweep, tmp_path)
    code, _, err = _analyze(capsys, copy, "--out", tmp_path / "here")
    assert code == 0, err
    moved = tmp_path / "moved-cache"
    shutil.copytree(sweep.parent / "cache", moved)
    code, _, err = _analyze(capsys, copy, "--out", tmp_path / "moved", "--cache-dir", moved)
    assert code == 0, err
    [here] = (tmp_path / "here" / "runs").iterdir()
    [there] = (tmp_path / "moved" / "runs").iterdir()
    assert read_table(there / "counts.csv") == read_table(here / "counts.csv")
    report = json.loads((there / "data_report.json").read_text())
    assert report["cache"]["from_cache"] is True and str(moved) in report["cache"]["path"]


def test_out_must_be_a_folder_and_one_analysis_writes_into_it_at_a_time(
    sweep, tmp_path, capsys, monkeypatch
):
    run = _run_dirs(sweep)[0]
    a_file = tmp_path / "report.txt"
    a_file.write_text("")
    code, out, err = _analyze(capsys, run, "--out", a_file)
    assert code == 1 and not out
    assert_one_error_line(err, "is a file")

    from moe_emergence.analysis import analyze as analyze_module

    held = []
    real_locked = analyze_module.locked

    def recording_locked(path, holder):
        held.append(path)
        return real_locked(path, holder)

    monkeypatch.setattr(analyze_module, "locked", recording_locked)
    code, _, err = _analyze(capsys, run, "--out", tmp_path / "out")
    assert code == 0, err
    assert held == [tmp_path / "out" / analyze_module.LOCK_FILE]


def test_a_warm_cache_analyses_offline_without_the_mirror(sweep, tmp_path, capsys):
    """``--hub-mirror null``: no mirror at all (HF_HUB_OFFLINE is set for the tests); the warm
    token cache alone gives the run's data, as its fingerprint proves."""
    copy = _copy_of_top1_run(sweep, tmp_path)
    code, _, err = _analyze(capsys, copy, "--out", tmp_path / "mirror")
    assert code == 0, err
    code, _, err = _analyze(capsys, copy, "--out", tmp_path / "cache", "--hub-mirror", "null")
    assert code == 0, err
    [with_mirror] = (tmp_path / "mirror" / "runs").iterdir()
    [cache_only] = (tmp_path / "cache" / "runs").iterdir()
    assert read_table(cache_only / "counts.csv") == read_table(with_mirror / "counts.csv")


def test_a_damaged_run_record_is_one_line(sweep, tmp_path, capsys):
    copy = _copy_of_top1_run(sweep, tmp_path)
    (copy / ".hydra" / "config.yaml").write_text("data: [unclosed\n  tokenizer: x: y\n")
    code, out, err = _analyze(capsys, copy, "--out", tmp_path / "out")
    assert code == 1 and not out
    assert_one_error_line(err, "config.yaml is damaged", "restore it")


def test_the_fields_specialisation_metrics_are_in_analyzes_outputs(sweep, tmp_path, capsys):
    """Every checkpoint's specialisation metrics beside their chance levels, the final's
    co-activation pairs and token lists, the saturation figure, and the summary's rows."""
    moe_run = next(p for p in _run_dirs(sweep) if "condition=top1" in p.name)
    code, _, err = _analyze(capsys, moe_run, "--out", tmp_path)
    assert code == 0, err
    [folder] = (tmp_path / "runs").iterdir()
    rows = read_table(folder / "specialisation.csv")
    assert [(r["step"], r["layer"]) for r in rows] == [(s, la) for s in "024" for la in LAYERS]
    final = [r for r in rows if r["step"] == "4"]
    assert all(float(r["saturation_top1"]) == 1.0 for r in final)  # the final against itself
    for r in rows:
        assert 0 <= float(r["repetition"]) <= 1 and 0 < float(r["repetition_chance"]) <= 1
        assert 0 < float(r["saturation_top1_chance"]) <= 1
    repeats = read_table(folder / "repetition.csv")
    assert len(repeats) == 3 * len(LAYERS) * len(DOMAINS)
    loads = read_table(folder / "relative_load.csv")
    counts = read_table(folder / "counts.csv")
    assert len(loads) == len(counts)
    for domain in DOMAINS:  # load / balanced load averages 1 over the experts
        mine = [
            float(r["relative_load"])
            for r in loads
            if (r["step"], r["layer"], r["domain"]) == ("4", "2", domain)
        ]
        assert sum(mine) == pytest.approx(len(mine))
    assert read_table(folder / "coactivation.csv") == []  # top-1: no pairs
    tokens = read_table(folder / "expert_tokens.csv")
    assert all(r["token"] for r in tokens)  # decoded
    assert "## layer 2" in (folder / "expert_tokens.md").read_text()
    assert (folder / "saturation.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((tmp_path / "summary.json").read_text())
    metrics = {(r["metric"], r["layer"]) for r in summary["rows"]}
    for metric in ("repetition", "repetition_chance", "vocab_spec", "vocab_spec_chance"):
        assert (metric, 2) in metrics
    assert ("saturation_top1_mid", 3) in metrics
    assert "specialisation metrics" in (tmp_path / "summary.md").read_text()


def test_help_says_95_percent_once(capsys):
    """argparse formats help strings with %, not the description: '95%%' printed as written."""
    from moe_emergence.analysis.analyze import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = capsys.readouterr().out
    assert "95% intervals" in out and "%%" not in out


def _split_sweep(sweep: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The sweep as two sittings: the top-1 runs in ``first/``, the dense ones in ``second/``."""
    first, second = tmp_path / "first", tmp_path / "second"
    for run in _run_dirs(sweep):
        shutil.copytree(run, (first if "condition=top1" in run.name else second) / run.name)
    return first, second


def test_several_sweep_folders_are_one_study(sweep, tmp_path, capsys):
    """Sweeps run in two sittings analyse as one: the groups, seeds and dense twin of the
    one-folder analysis, the runs named by their folder."""
    first, second = _split_sweep(sweep, tmp_path)
    code, _, err = _analyze(capsys, first, second, "--out", tmp_path / "out", "--no-knockout")
    assert code == 0, err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    moe = next(g for g, info in summary["groups"].items() if info["moe"])
    dense = next(g for g, info in summary["groups"].items() if not info["moe"])
    assert summary["groups"][moe]["seeds"] == summary["groups"][dense]["seeds"] == [1, 2]
    assert summary["groups"][moe]["dense_twin"] == dense
    runs = sorted(p.name for p in (tmp_path / "out" / "runs").iterdir())
    assert len(runs) == 4 and {r.split("__")[0] for r in runs} == {"first", "second"}


def test_several_folders_need_out_and_hold_a_seed_once(sweep, tmp_path, capsys):
    first, second = _split_sweep(sweep, tmp_path)
    code, _, err = _analyze(capsys, first, second)
    assert code == 1
    assert_one_error_line(err, "2 PATHs: pass --out")
    again = tmp_path / "again"
    shutil.copytree(first, again)
    code, _, err = _analyze(capsys, first, again, "--out", tmp_path / "out")
    assert code == 1
    assert_one_error_line(err, "the same condition")
    shutil.copytree(second, tmp_path / "x" / "first")
    code, _, err = _analyze(capsys, first, tmp_path / "x" / "first", "--out", tmp_path / "out")
    assert code == 1
    assert_one_error_line(err, "share a name")


def _rewrite_result(file: Path, **changes) -> None:
    record = json.loads(lzma.decompress(file.read_bytes()))
    file.write_bytes(lzma.compress(json.dumps({**record, **changes}).encode()))


def test_an_earlier_analysis_is_summarised_again_bit_for_bit(sweep, tmp_path, capsys):
    """An analysis's folder as PATH: its runs are read from their result files, not measured
    again (their checkpoints may be gone), and the summary is the one their analysis wrote, byte
    for byte, knock-out included; the run folders come along."""
    first = tmp_path / "first"
    code, _, err = _analyze(capsys, sweep, "--out", first)
    assert code == 0, err
    again = tmp_path / "again"
    with patch("moe_emergence.analysis.analyze.evaluate_run", side_effect=AssertionError):
        code, out, err = _analyze(capsys, first, "--out", again)
    assert code == 0, err
    assert "4 run(s) reused from earlier analyses" in out and "other analysis code" not in out
    for name in ("summary.json", "summary.csv", "summary.md"):
        assert (again / name).read_bytes() == (first / name).read_bytes(), name
    copied = sorted(p.name for p in (again / "runs").iterdir())
    assert copied == sorted(p.name for p in (first / "runs").iterdir()) and len(copied) == 4
    assert (again / "runs" / copied[0] / "trajectory.csv").is_file()


def test_a_reused_analysis_and_a_new_sitting_are_one_study(sweep, tmp_path, capsys):
    """The first sitting's analysis (checkpoints gone) and the second sitting's sweep: the groups,
    seeds and dense twin of analysing both sweeps at once; a seed twice and a missing --out are
    refused; the notes name runs measured by other analysis code."""
    first, second = _split_sweep(sweep, tmp_path)
    earlier = tmp_path / "earlier"
    code, _, err = _analyze(capsys, first, "--out", earlier, "--no-knockout")
    assert code == 0, err
    shutil.rmtree(first)
    code, out, err = _analyze(capsys, earlier, second, "--out", tmp_path / "out", "--no-knockout")
    assert code == 0, err
    assert "2 run(s) reused" in out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    moe = next(g for g, info in summary["groups"].items() if info["moe"])
    dense = next(g for g, info in summary["groups"].items() if not info["moe"])
    assert summary["groups"][moe]["seeds"] == summary["groups"][dense]["seeds"] == [1, 2]
    assert summary["groups"][moe]["dense_twin"] == dense
    assert (
        next(r for r in summary["rows"] if (r["group"], r["metric"]) == (moe, "loss_minus_dense"))[
            "n"
        ]
        == 2
    )

    code, _, err = _analyze(capsys, earlier, sweep, "--out", tmp_path / "x")
    assert code == 1
    assert_one_error_line(err, "the same condition", "leave one of the folders out")
    code, _, err = _analyze(capsys, earlier, tmp_path / "out", "--out", tmp_path / "x")
    assert code == 1
    assert_one_error_line(err, "two runs are named", "leave one of the folders out")
    code, _, err = _analyze(capsys, earlier)
    assert code == 1
    assert_one_error_line(err, "is an analysis: pass --out")

    result = next((earlier / "runs").glob("*/result.json.xz"))
    _rewrite_result(result, analysis_code="0" * 64)
    code, out, err = _analyze(capsys, earlier, "--out", tmp_path / "y")
    assert code == 0, err
    assert "1 of them measured by other analysis code" in out and result.parent.name in out
    _rewrite_result(result, format=0)
    code, _, err = _analyze(capsys, earlier, "--out", tmp_path / "y")
    assert code == 1
    assert_one_error_line(err, "format 0", "analyse the run again from its checkpoints")
    for file in (earlier / "runs").glob("*/result.json.xz"):
        file.unlink()
    code, _, err = _analyze(capsys, earlier, second, "--out", tmp_path / "y")
    assert code == 1
    assert_one_error_line(err, "an analysis without run results", "pass the runs' own folders")


def test_a_seed_that_is_not_a_number_is_one_line_before_any_work(sweep, tmp_path, capsys):
    """``seed=abc`` in the run's ``.hydra/overrides.yaml``: one line naming the file and the
    value, before any checkpoint is routed (#29 item 8)."""
    copy = _copy_of_top1_run(sweep, tmp_path)
    record = copy / ".hydra" / "overrides.yaml"
    record.write_text(
        "\n".join(
            "- seed=abc" if line.startswith("- seed=") else line
            for line in record.read_text().splitlines()
        )
        + "\n"
    )
    assert "- seed=abc" in record.read_text()
    with patch("moe_emergence.analysis.analyze.evaluate_run", side_effect=AssertionError):
        code, out, err = _analyze(capsys, copy, "--out", tmp_path / "out")
    assert code == 1 and not out
    assert_one_error_line(err, str(record), "seed='abc'", "not an integer")


def test_an_out_holding_other_runs_is_refused_before_any_work(sweep, tmp_path, capsys):
    """Two studies into one --out would leave a summary of the second beside the first's run
    folders: refused in one line naming them and the fixes; the earlier analysis passed as a
    PATH too joins its runs to the study (#29 item 8)."""
    first, second = _split_sweep(sweep, tmp_path)
    out = tmp_path / "out"
    code, _, err = _analyze(capsys, first, "--out", out, "--no-knockout")
    assert code == 0, err
    earlier = sorted(p.name for p in (out / "runs").iterdir())
    with patch("moe_emergence.analysis.analyze.evaluate_run", side_effect=AssertionError):
        code, out_text, err = _analyze(capsys, second, "--out", out, "--no-knockout")
    assert code == 1 and not out_text
    assert_one_error_line(err, "holds 2 run(s)", earlier[0], "a new --out", f"{out} as a PATH")
    code, _, err = _analyze(capsys, out, second, "--out", out, "--no-knockout")
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert all(info["seeds"] == [1, 2] for info in summary["groups"].values())
    assert len(list((out / "runs").iterdir())) == 4


@pytest.mark.parametrize("named", [True, False])
def test_the_rebuild_hint_names_the_runs_own_domain_set(named, tiny_tokenizer_dir, tmp_path):
    """Data that cannot be rebuilt (no mirror here): the hint's command names the run's domain
    set, by its name when conf/data/domains holds it, else as a YAML file written beside the
    report, so that following it builds the run's own data, not the default set (#29 item 8)."""
    from moe_emergence.analysis.evaluate import load_data
    from moe_emergence.data.domains import read_domain_set
    from moe_emergence.data.settings import DataSettings

    spec = read_domain_set("gsm8k_vs_math")
    if not named:
        spec = {k: v for k, v in read_domain_set("code_math_prose").items() if k != "prose"}
    settings = {
        "size_mb": 1.0,
        "block_size": 32,
        "source": "hub",
        "tokenizer": str(tiny_tokenizer_dir),
        "hub_mirror": str(tmp_path / "gone-mirror"),
        "cache_dir": str(tmp_path / "cache"),
        "domain_set": spec,
    }
    report = tmp_path / "report"
    report.mkdir()
    with pytest.raises(UserError, match="cannot be read or rebuilt here") as caught:
        load_data("run", settings, report)
    command = shlex.split(str(caught.value).split("rebuild it with: ")[1])
    given = command[command.index("--domain-set") + 1]
    if named:
        assert given == "gsm8k_vs_math"
    else:
        assert given == str(report / "domain_set.yaml")
    rebuilt = DataSettings(source="hub", domain_set=given).domain_sources
    assert rebuilt == DataSettings(source="hub", domain_set=spec).domain_sources


def test_offline_the_runs_own_cache_entry_is_taken_before_a_newer_one(sweep, tmp_path, capsys):
    """Offline with no mirror the datasets cannot be identified, so every cache entry built
    from the same settings matches; a newer one holding other data (as after the Hub data
    moved on) must not hide the run's own, whose data fingerprint the checkpoint records
    (#29 item 8)."""
    from moe_emergence.data.cache import fingerprint
    from moe_emergence.files import sha256_file

    copy = _copy_of_top1_run(sweep, tmp_path)
    cache = tmp_path / "cache"
    shutil.copytree(sweep.parent / "cache", cache)
    [own] = [p for p in cache.iterdir() if (p / "manifest.json").is_file()]
    manifest = json.loads((own / "manifest.json").read_text())
    manifest["inputs"]["sources"]["code"][0]["content"] = {"hub_revision": "f" * 40}
    manifest["fingerprint"] = fingerprint(manifest["inputs"])
    manifest["created_at"] = "2999-01-01T00:00:00+00:00"
    newer = cache / manifest["fingerprint"]
    shutil.copytree(own, newer)
    tokens = newer / "code.tokens.bin"
    data = bytearray(tokens.read_bytes())
    data[0:2], data[2:4] = data[2:4], data[0:2]  # two tokens swapped: other data, same size
    tokens.write_bytes(bytes(data))
    manifest["domains"]["code"]["tokens_sha256"] = sha256_file(tokens)
    (newer / "manifest.json").write_text(json.dumps(manifest))
    assert data != bytearray((own / "code.tokens.bin").read_bytes())

    args = ("--out", tmp_path / "out", "--cache-dir", cache, "--hub-mirror", "null")
    code, _, err = _analyze(capsys, copy, *args, "--no-knockout")
    assert code == 0, err
    [folder] = (tmp_path / "out" / "runs").iterdir()
    report = json.loads((folder / "data_report.json").read_text())
    assert report["cache"]["path"] == str(own)
