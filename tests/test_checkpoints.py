"""Resumes that can be trusted, end to end through ``train()`` with the tiny MoE model (router
noise on): losses after a resume equal the uninterrupted run's, step for step; a changed data
setting, seed, a damaged or missing checkpoint are refused in one line; ``ckpt_path=<run dir>``
and ``last``; ``init_from`` starts a new run from a checkpoint's weights; two ``train.py``
started at once write to two run folders."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import lightning as L
import pytest
import torch
from helpers.configs import tiny_overrides
from helpers.script import assert_one_error_line, run_train
from omegaconf import open_dict

from moe_emergence.analysis.loading import load_checkpoint
from moe_emergence.analysis.tables import read_table
from moe_emergence.checkpoints import HashedCheckpointIO, sha256_file, sidecar_path
from moe_emergence.config import compose_config
from moe_emergence.errors import UserError
from moe_emergence.train import train

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 9


class StopAtStep(L.Callback):
    """Interrupts the fit after ``step`` optimizer steps (the LR schedule still spans
    ``trainer.max_steps``, as in the uninterrupted run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def overrides(mirror, tokenizer, run_dir, *extra) -> list[str]:
    return tiny_overrides(
        mirror,
        tokenizer,
        run_dir,
        f"trainer.max_steps={MAX_STEPS}",
        "callbacks.model_checkpoint.every_n_train_steps=1",
        "callbacks.routing_analysis.every_n_steps=1000",
        *extra,
    )


def run(mirror, tokenizer, run_dir: Path, *extra: str, stop_at: int | None = None) -> dict:
    cfg = compose_config(overrides(mirror, tokenizer, run_dir, *extra))
    if stop_at is not None:
        with open_dict(cfg):
            cfg.callbacks.stop = {"_target_": f"{__name__}.StopAtStep", "step": stop_at}
    return train(cfg)


def lm_losses(run_dir: Path) -> dict[int, str]:
    """``train/lm_loss`` per global step, as written (exact strings)."""
    with (run_dir / "csv" / "metrics.csv").open() as f:
        return {int(r["step"]): r["train/lm_loss"] for r in csv.DictReader(f) if r["train/lm_loss"]}


@pytest.fixture(scope="module")
def runs(tiny_mirror, tiny_tokenizer_dir, tmp_path_factory):
    """An uninterrupted run of 9 steps, and the same run interrupted after step 4 (a checkpoint
    after every step); the token cache is shared by the module's runs."""
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MOE_CACHE_DIR", str(root / "cache"))
        run(tiny_mirror, tiny_tokenizer_dir, root / "full")
        run(tiny_mirror, tiny_tokenizer_dir, root / "first", stop_at=4)
    return root


@pytest.fixture
def ctx(runs, tiny_mirror, tiny_tokenizer_dir, monkeypatch):
    monkeypatch.setenv("MOE_CACHE_DIR", str(runs / "cache"))

    def go(run_dir: Path, *extra: str, stop_at: int | None = None) -> dict:
        return run(tiny_mirror, tiny_tokenizer_dir, run_dir, *extra, stop_at=stop_at)

    return runs, go


def ckpt(runs: Path, step: int) -> Path:
    return runs / "first" / "checkpoints" / f"step{step:06d}.ckpt"


def test_losses_after_a_mid_epoch_resume_equal_the_uninterrupted_run(ctx, tmp_path, monkeypatch):
    runs, go = ctx
    full = lm_losses(runs / "full")
    assert sorted(full) == list(range(MAX_STEPS))
    first = lm_losses(runs / "first")
    assert sorted(first) == [0, 1, 2, 3] and all(first[s] == full[s] for s in first)
    reads = []  # our reads of the checkpoint (memory-mapped); Lightning's own load maps nothing
    torch_load = torch.load

    def counting_load(f, *args, **kwargs):
        if kwargs.get("mmap"):
            reads.append(Path(f))
        return torch_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    out = go(tmp_path / "second", f"ckpt_path={ckpt(runs, 4)}")
    assert reads == [ckpt(runs, 4)]  # the resume checks read it once, before Lightning loads it
    assert out["global_step"] == MAX_STEPS and out["resumed_from"] == ckpt(runs, 4)
    resumed = lm_losses(tmp_path / "second")
    assert sorted(resumed) == list(range(4, MAX_STEPS))
    assert resumed == {s: full[s] for s in resumed}  # bit for bit, router noise included
    # The final per-domain losses cover the whole run's last steps, not the resumed ones only.
    uninterrupted = json.loads((runs / "full" / "summary.json").read_text())["domain_losses"]
    assert out["domain_losses"] == pytest.approx(uninterrupted, rel=1e-12)


def test_losses_after_resumes_at_an_epoch_boundary_with_validation_are_equal(
    tiny_mirror, tiny_tokenizer_dir, tmp_path
):
    """Four batches of 64 blocks per epoch, a held-out split validated after every epoch: the
    loaders start their iterators (and validation runs) at other moments in a resumed run.
    Resumes after step 4 (the end of epoch 0) and step 5 (the first step of epoch 1)."""
    extra = ("data.batch_size=64", "data.eval_fraction=0.1")
    run(tiny_mirror, tiny_tokenizer_dir, tmp_path / "full", *extra)
    full = lm_losses(tmp_path / "full")
    run(tiny_mirror, tiny_tokenizer_dir, tmp_path / "first", *extra, stop_at=5)
    for step in (4, 5):
        checkpoint = tmp_path / "first" / "checkpoints" / f"step{step:06d}.ckpt"
        second = tmp_path / f"second{step}"
        run(tiny_mirror, tiny_tokenizer_dir, second, *extra, f"ckpt_path={checkpoint}")
        resumed = lm_losses(second)
        assert sorted(resumed) == list(range(step, MAX_STEPS))
        assert resumed == {s: full[s] for s in resumed}
    # Continued in its own folder: the full run's rows, none twice. The stopped run also
    # validated when it stopped (step 4, mid-epoch: the full run never did); that row is its
    # history and stays.
    in_place = tmp_path / "in_place"
    shutil.copytree(tmp_path / "first", in_place)
    run(tiny_mirror, tiny_tokenizer_dir, in_place, *extra, "ckpt_path=last")
    merged, uninterrupted = metric_cells(in_place), metric_cells(tmp_path / "full")
    assert len({(step, key) for step, key, _ in merged}) == len(merged)  # none twice
    assert set(uninterrupted) <= set(merged)
    extra_cells = set(merged) - set(uninterrupted)
    assert extra_cells and extra_cells <= set(metric_cells(tmp_path / "first"))
    assert {(step, key.split("/")[0]) for step, key, _ in extra_cells} == {(4, "val")}


def test_losses_after_a_two_rank_ddp_spawn_resume_are_equal(
    tiny_mirror, tiny_tokenizer_dir, tmp_path
):
    """Every rank draws its own router noise: each gets its own random states back (gathered
    into the checkpoint by rank)."""
    extra = ("trainer.devices=2", "trainer.strategy=ddp_spawn", "trainer.max_steps=6")
    run(tiny_mirror, tiny_tokenizer_dir, tmp_path / "full", *extra)
    run(tiny_mirror, tiny_tokenizer_dir, tmp_path / "first", *extra, stop_at=3)
    checkpoint = tmp_path / "first" / "checkpoints" / "step000003.ckpt"
    states = torch.load(checkpoint, weights_only=True)["callbacks"]["RandomStates"]["ranks"]
    assert len(states) == 2  # one per rank (the ranks are seeded alike today)
    run(tiny_mirror, tiny_tokenizer_dir, tmp_path / "second", *extra, f"ckpt_path={checkpoint}")
    full, resumed = lm_losses(tmp_path / "full"), lm_losses(tmp_path / "second")
    assert sorted(resumed) == [3, 4, 5]
    assert resumed == {s: full[s] for s in resumed}
    # Each rank's recent per-domain losses come back too: the summed final losses are the
    # uninterrupted run's (summary.json: the spawned ranks' result).
    losses = [
        json.loads((tmp_path / r / "summary.json").read_text())["domain_losses"]
        for r in ("full", "second")
    ]
    assert losses[1] == pytest.approx(losses[0], rel=1e-12)


def test_every_checkpoint_has_a_matching_sidecar(runs):
    files = sorted((runs / "first" / "checkpoints").glob("*.ckpt"))
    assert {p.name for p in files} >= {"last.ckpt", "step000004.ckpt"}
    for path in files:
        recorded = sidecar_path(path).read_text().split()
        assert recorded == [sha256_file(path), path.name]


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["data.batch_size=8"], ["data.batch_size: checkpoint 4, now 8"]),
        (["data.seed=7"], ["data.seed: checkpoint 42, now 7"]),
        (["data.balance_tokens=true"], ["data.balance_tokens: checkpoint False, now True"]),
        (["data.block_size=16"], ["data.block_size: checkpoint 32, now 16"]),
        (["data.eval_fraction=0.1"], ["the training data"]),
        (["data.size_mb=0.005"], ["the training data"]),
        (["seed=7"], ["seed: checkpoint 42, now 7"]),
        (
            ["trainer.devices=2", "trainer.strategy=ddp_spawn"],  # refused before spawning
            ["world size (trainer.devices x trainer.num_nodes): checkpoint 1, now 2"],
        ),
        (["model.n_embd=64"], ["model.n_embd: checkpoint 128, now 64"]),
        # What trains without changing a shape (#29): the optimizer, the schedule, the loss
        # weights, the router noise, dropout; each change named with both values.
        (["model.optimizer.lr=5e-3"], ["model.optimizer.lr: checkpoint 0.001, now 0.005"]),
        (
            ["model.optimizer.betas=[0.9,0.99]", "+model.optimizer.eps=1e-6"],
            [
                "model.optimizer.betas: checkpoint [0.9, 0.95], now [0.9, 0.99]",
                "model.optimizer.eps: checkpoint 1e-08, now 1e-06",
            ],
        ),
        (
            ["model.optimizer.weight_decay=0.1", "model.optimizer._target_=torch.optim.Adam"],
            [
                "model.optimizer.weight_decay: checkpoint 0.01, now 0.1",
                "model.optimizer.decoupled_weight_decay: checkpoint True, now False",
            ],
        ),
        (
            ["model.warmup_steps=5", "model.min_lr_ratio=0.5"],
            [
                "model.warmup_steps: checkpoint 2, now 5",
                "model.min_lr_ratio: checkpoint 0.1, now 0.5",
            ],
        ),
        (
            ["model.lb_coef=0.5", "model.z_coef=0", "model.lb_scope=global"],
            [
                "model.lb_coef: checkpoint 0.01, now 0.5",
                "model.z_coef: checkpoint 0.001, now 0",
                "model.lb_scope: checkpoint 'batch', now 'global'",
            ],
        ),
        (
            ["model.moe.noise_std=0.5", "model.moe.noise_anneal_steps=50", "model.dropout=0.1"],
            [
                "model.moe.noise_std: checkpoint 1.0, now 0.5",
                "model.moe.noise_anneal_steps: checkpoint 200, now 50",
                "model.dropout: checkpoint 0.0, now 0.1",
            ],
        ),
        (  # not in Lightning's checkpoint: recorded by each start (history.StartRecord)
            [
                "trainer.gradient_clip_val=0.5",
                "trainer.accumulate_grad_batches=2",
                "trainer.precision=bf16-mixed",
            ],
            [
                "trainer.gradient_clip_val: checkpoint 1.0, now 0.5",
                "trainer.accumulate_grad_batches: checkpoint 1, now 2",
                "trainer.precision: checkpoint '32-true', now 'bf16-mixed'",
            ],
        ),
    ],
)
def test_a_resume_with_a_changed_setting_is_refused(ctx, tmp_path, extra, needles):
    runs, go = ctx
    checkpoint = ckpt(runs, 4)
    with pytest.raises(UserError) as caught:
        go(tmp_path / "run", f"ckpt_path={checkpoint}", *extra)
    message = str(caught.value)
    assert "\n" not in message
    for needle in [*needles, f"init_from={checkpoint}"]:
        assert needle in message, message


def test_a_resume_may_change_how_it_runs_and_what_it_shows(ctx, tmp_path):
    """The settings meant to change on a resume (resume.MAY_CHANGE: the experts' dispatch, the
    logging and checkpoint cadence, the progress bar) are taken, and the losses stay the
    uninterrupted run's, bit for bit."""
    runs, go = ctx
    out = go(
        tmp_path / "second",
        f"ckpt_path={ckpt(runs, 4)}",
        "model.moe.dispatch=loop",
        "trainer.log_every_n_steps=2",
        "callbacks.model_checkpoint.every_n_train_steps=3",
        "trainer.enable_progress_bar=true",
        "trainer.precision=32",  # Lightning's short name of the same precision
    )
    assert out["global_step"] == MAX_STEPS
    full, resumed = lm_losses(runs / "full"), lm_losses(tmp_path / "second")
    assert sorted(resumed) == [5, 7] and resumed == {s: full[s] for s in resumed}  # every 2nd


def test_a_damaged_checkpoint_is_refused(ctx, tmp_path):
    runs, go = ctx
    damaged = tmp_path / "damaged.ckpt"
    shutil.copy(ckpt(runs, 4), damaged)
    shutil.copy(sidecar_path(ckpt(runs, 4)), sidecar_path(damaged))
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4] = b"\xff\xff\x7f\x7f"  # a float becomes 3.4e38
    damaged.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"does not match its checksum in damaged\.ckpt\.sha256"):
        go(tmp_path / "run", f"ckpt_path={damaged}")


def _checkpoint_like(tmp_path: Path, runs: Path, kind: str) -> Path:
    source = ckpt(runs, 4)
    path = tmp_path / f"{kind}.ckpt"
    if kind == "missing":
        return path
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "weights_dict":
        torch.save({"weight": torch.zeros(2)}, path)
    elif kind == "no_sidecar":
        shutil.copy(source, path)
    return path


@pytest.mark.parametrize("option", ["ckpt_path", "init_from"])
@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("missing", "does not exist"),
        ("directory", "is a folder without checkpoints/last.ckpt"),
        ("empty", "is empty (0 bytes)"),
        ("truncated", "is not a readable checkpoint"),
        ("text", "is not a readable checkpoint"),
        ("weights_dict", "is not a Lightning checkpoint"),
        ("no_sidecar", "sha256sum no_sidecar.ckpt > no_sidecar.ckpt.sha256"),
    ],
)
def test_a_bad_checkpoint_path_is_one_line_before_any_work(
    runs, tmp_path, option, kind, needle, monkeypatch
):
    path = _checkpoint_like(tmp_path, runs, kind)
    cfg = compose_config(
        ["model=tiny_moe", f"paths.run_dir={tmp_path / 'run'}", f"{option}={path}"]
    )
    monkeypatch.setattr("moe_emergence.train.instantiate", None)  # nothing may be built
    with pytest.raises(UserError) as caught:
        train(cfg)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{option}=") and needle in message, message


def test_ckpt_path_and_init_from_together_are_refused(runs, tmp_path):
    cfg = compose_config([f"ckpt_path={ckpt(runs, 4)}", f"init_from={ckpt(runs, 4)}"])
    with pytest.raises(UserError, match="pass only one"):
        train(cfg)


def test_ckpt_path_last_and_run_dir_resolve_to_the_newest_last_ckpt(ctx, tmp_path):
    runs, go = ctx
    from moe_emergence.runs import resolve_checkpoint

    last = runs / "first" / "checkpoints" / "last.ckpt"
    assert resolve_checkpoint(str(runs / "first"), "ckpt_path") == last
    assert resolve_checkpoint("last", "ckpt_path", runs / "first") == last
    with pytest.raises(UserError, match=r"ckpt_path=last: no checkpoints/last\.ckpt in this run"):
        go(tmp_path / "fresh", "ckpt_path=last")
    # Continue the interrupted run in its own folder: ckpt_path=last there.
    inplace = tmp_path / "inplace"
    shutil.copytree(runs / "first", inplace)
    out = go(inplace, "ckpt_path=last")
    assert out["global_step"] == MAX_STEPS
    assert out["resumed_from"] == inplace / "checkpoints" / "last.ckpt"


def test_init_from_last_hints_a_form_that_starts_the_run(ctx, tmp_path):
    """#29 item 8: init_from=last in a new run's folder hinted ``hydra.run.dir=<run dir>
    init_from=last``, which is refused (that folder already holds a run). Its hint, followed
    with the run's folder, starts a new run from that run's weights."""
    runs, go = ctx
    with pytest.raises(UserError) as caught:
        go(tmp_path / "fresh", "init_from=last")
    message = str(caught.value)
    assert "\n" not in message and "init_from=last" not in message.split(";", 1)[1], message
    hint = re.search(r"init_from=<run dir>", message)
    assert hint is not None, message
    followed = hint.group(0).replace("<run dir>", str(runs / "first"))
    out = go(tmp_path / "new", followed, "trainer.max_steps=1")
    assert out["global_step"] == 1
    assert out["init_from"] == runs / "first" / "checkpoints" / "last.ckpt"


def test_a_symlinked_last_ckpt_is_verified_through_its_target(ctx, tmp_path):
    runs, _ = ctx
    from moe_emergence.runs import resolve_checkpoint

    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    target = folder / "step000004.ckpt"
    shutil.copy(ckpt(runs, 4), target)
    shutil.copy(sidecar_path(ckpt(runs, 4)), sidecar_path(target))
    (folder / "last.ckpt").symlink_to(target.name)
    assert resolve_checkpoint(str(tmp_path / "run"), "ckpt_path") == folder / "last.ckpt"


def test_init_from_starts_at_step_zero_with_the_checkpoints_weights(
    ctx, tiny_mirror, tiny_tokenizer_dir, tmp_path
):
    runs, _ = ctx
    init = f"init_from={runs / 'first'}"
    cfg = compose_config(
        overrides(tiny_mirror, tiny_tokenizer_dir, tmp_path / "new", init, "trainer.max_steps=2")
    )
    with open_dict(cfg):
        cfg.callbacks.capture = {"_target_": f"{__name__}.CaptureStart"}
    out = train(cfg)
    last = runs / "first" / "checkpoints" / "last.ckpt"
    assert out["global_step"] == 2 and out["init_from"] == last
    assert CaptureStart.seen["step"] == 0
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 4
    weights = CaptureStart.seen["weights"]
    assert weights.keys() == saved["state_dict"].keys()
    for key, value in saved["state_dict"].items():
        assert torch.equal(weights[key], value), key
    assert sorted(lm_losses(tmp_path / "new")) == [0, 1]
    assert (tmp_path / "new" / "routing" / "trajectory.csv").exists()  # a fresh run's step 0


class CaptureStart(L.Callback):
    """Keeps the global step and the weights at the start of training (class attribute)."""

    seen: ClassVar[dict] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        CaptureStart.seen = {
            "step": trainer.global_step,
            "weights": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
        }


def test_two_runs_started_at_once_get_two_run_dirs(tiny_mirror, tiny_tokenizer_dir, tmp_path):
    args = [a for a in overrides(tiny_mirror, tiny_tokenizer_dir, "x") if "run_dir" not in a]
    args = [
        *args,
        "trainer.max_steps=1",
        "~callbacks.routing_analysis",
        f"paths.output_dir={tmp_path / 'outputs'}",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, str(REPO / "train.py"), *args]
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs = [subprocess.Popen(command, cwd=tmp_path, env=env, **pipes) for _ in range(2)]
    logs = [p.communicate(timeout=600) for p in procs]
    for proc, (_, err) in zip(procs, logs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    runs = sorted(p for p in (tmp_path / "outputs" / "runs").glob("*/*") if p.is_dir())
    assert len(runs) == 2, runs
    for folder in runs:
        assert (folder / "summary.json").exists() and (folder / "csv" / "metrics.csv").exists()
        assert (folder / "checkpoints" / "last.ckpt").exists()
    named = sorted(re.search(r"Outputs in (\S+):", out).group(1) for out, _ in logs)
    assert named == [str(f) for f in runs]  # each run reports its own folder


def test_unique_dir_claims_a_new_folder_per_caller(tmp_path, monkeypatch):
    from moe_emergence.runs import unique_dir as run_dir

    monkeypatch.setattr(run_dir, "_claimed", {})
    base = str(tmp_path / "runs" / "12-00-00")
    first = run_dir.unique_dir(base)
    assert run_dir.unique_dir(base) == first == base  # the same answer within a process
    monkeypatch.setattr(run_dir, "_claimed", {})  # as another process would
    assert run_dir.unique_dir(base) == f"{base}_1"
    monkeypatch.setattr(run_dir, "_claimed", {})
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert run_dir.unique_dir(base) == f"{base}_job77"  # every rank of the job agrees


def metric_cells(run_dir: Path) -> list[tuple[int, str, str]]:
    """Every logged (step, metric, value) of the run's metrics.csv, timings left out."""
    with (run_dir / "csv" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    return sorted(
        (int(r["step"]), key, value)
        for r in rows
        for key, value in r.items()
        if value and key not in {"step", "epoch", "train/tokens_per_s"}
    )


def test_an_in_place_resume_appends_to_the_runs_history(ctx, tmp_path):
    runs, go = ctx
    run_dir = tmp_path / "run"
    shutil.copytree(runs / "first", run_dir)
    before = (run_dir / "csv" / "metrics.csv").read_text()
    killed = run_dir / "checkpoints" / ".step000005.ckpt.0123456789ab.tmp"  # a write cut short
    killed.write_bytes(b"half a checkpoint")
    out = go(run_dir, "ckpt_path=last")
    assert out["global_step"] == MAX_STEPS and not killed.exists()
    assert metric_cells(run_dir) == metric_cells(runs / "full")  # none lost, none twice
    assert (run_dir / "csv" / "metrics.start1.csv").read_text() == before
    # One history: each checkpoint records the starts it went through; the resumed start's
    # began at step 4. The copied folder's resume wrote last-v1.ckpt beside the first start's
    # last.ckpt (Lightning found the name taken), and analyze still reads one history.
    from moe_emergence.runs.history import check_one_history, lineage_of, read_history

    def lineage(name: str) -> list:
        return lineage_of(torch.load(run_dir / "checkpoints" / name, weights_only=True))

    first = lineage("step000004.ckpt")
    assert len(first) == 1 and first[0][1] == 0
    resumed = lineage(f"step{MAX_STEPS:06d}.ckpt")
    assert resumed[:1] == first and resumed[1][1] == 4 and resumed[1][0] != first[0][0]
    assert lineage("step000005.ckpt") == resumed
    files = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    check_one_history(run_dir, read_history(files, "PATH"), "PATH")


def test_an_in_place_resume_at_an_analysis_step_keeps_its_routing_scalars(ctx, tmp_path):
    """Routing every 2 steps, the run cut after step 4 (an analysis step) and resumed in place:
    metrics.csv holds each analysis's routing scalars once, at the steps trajectory.csv has."""
    _, go = ctx
    run_dir = tmp_path / "run"
    every = "callbacks.routing_analysis.every_n_steps=2"
    go(run_dir, every, stop_at=4)
    go(run_dir, every, "ckpt_path=last")
    logged = [
        (step, key) for step, key, _ in metric_cells(run_dir) if key.startswith("routing/layer")
    ]
    assert len(logged) == len(set(logged))  # none twice
    analysed = {int(r["step"]) for r in read_table(run_dir / "routing" / "trajectory.csv")}
    assert analysed == {0, 2, 4, 6, 8, MAX_STEPS}
    assert {step for step, _ in logged} == analysed
    # Saturation: the first start's cells (against its step 4) are gone; the resumed run's
    # (against the last step) cover every analysis step, the earlier ones from the checkpoint.
    saturation = {
        (int(r["step"]), f"routing/layer{r['layer']}/saturation_top1"): r["saturation_top1"]
        for r in read_table(run_dir / "routing" / "saturation.csv")
    }
    assert {step for step, _ in saturation} == analysed
    cells = {(s, k): v for s, k, v in metric_cells(run_dir) if k.endswith("/saturation_top1")}
    assert cells == saturation


def test_a_run_folder_takes_no_new_run_and_keeps_its_earlier_starts(
    ctx, tiny_mirror, tiny_tokenizer_dir, tmp_path
):
    """``hydra.run.dir=<a run>`` without ``ckpt_path`` is refused before Hydra writes a file;
    with ``ckpt_path=last`` the run continues there and its earlier ``.hydra`` files are kept
    as ``.hydra/start1/``."""
    runs, _ = ctx
    folder = tmp_path / "run"
    shutil.copytree(runs / "first", folder)
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "config.yaml").write_text("# the first start's config\n")
    (folder / ".hydra" / "overrides.yaml").write_text("- seed=42\n")
    args = overrides(tiny_mirror, tiny_tokenizer_dir, None)

    refused = run_train(f"hydra.run.dir={folder}", *args, cwd=tmp_path)  # a subprocess:
    assert refused.returncode == 1  # Hydra's logging set-up outlives an in-process refusal
    assert_one_error_line(refused.stderr, "already holds a run", "ckpt_path=last")
    assert (folder / ".hydra" / "config.yaml").read_text() == "# the first start's config\n"
    assert not (folder / ".hydra" / "start1").exists()

    proc = run_train(
        f"hydra.run.dir={folder}",
        "ckpt_path=last",
        *args,
        cwd=tmp_path,
        env_extra={"MOE_CACHE_DIR": str(runs / "cache")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    kept = folder / ".hydra" / "start1"
    assert (kept / "config.yaml").read_text() == "# the first start's config\n"
    assert (kept / "overrides.yaml").read_text() == "- seed=42\n"
    assert "ckpt_path: last" in (folder / ".hydra" / "config.yaml").read_text()
    assert metric_cells(folder) == metric_cells(runs / "full")


def test_resuming_a_finished_run_says_how_to_train_on(ctx, tmp_path):
    runs, go = ctx
    finished = runs / "full" / "checkpoints" / "last.ckpt"
    with pytest.raises(UserError, match=rf"at step {MAX_STEPS} and trainer\.max_steps={MAX_STEPS}"):
        go(tmp_path / "again", f"ckpt_path={finished}")
    assert not (tmp_path / "again").exists()


def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_file(tmp_path, monkeypatch):
    import errno

    from moe_emergence import files

    real_fsync = files.os.fsync

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full_disk)
    target = tmp_path / "checkpoints" / "step000001.ckpt"
    with pytest.raises(UserError, match=r"step000001\.ckpt failed \(No space left on device\)"):
        HashedCheckpointIO().save_checkpoint({"state_dict": {}}, target)
    monkeypatch.setattr(files.os, "fsync", real_fsync)
    assert sorted(p.name for p in target.parent.iterdir()) == []  # no partial file, no sidecar


def test_a_new_run_is_never_written_into_a_folder_holding_a_run(ctx, tmp_path):
    """Also through paths.run_dir, and also for init_from (the path an earlier hint suggested)."""
    runs, go = ctx
    folder = tmp_path / "run"
    shutil.copytree(runs / "first", folder)
    before = sorted(p.name for p in (folder / "checkpoints").iterdir())
    for extra in ((), (f"init_from={ckpt(runs, 4)}",)):
        with pytest.raises(UserError, match=r"already holds a run's checkpoints.*ckpt_path=last"):
            go(folder, *extra)
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == before


def hydra_snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder/.hydra`` (sub-folders included) and its bytes."""
    root = folder / ".hydra"
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def record_a_run(runs: Path, folder: Path) -> dict[str, bytes]:
    """``runs/first`` copied to ``folder`` with a ``.hydra/`` record of its own start."""
    shutil.copytree(runs / "first", folder)
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "config.yaml").write_text("seed: 42\ncondition: top1\n")
    (folder / ".hydra" / "overrides.yaml").write_text("- condition=top1\n")
    (folder / ".hydra" / "hydra.yaml").write_text("hydra: {}\n")
    return hydra_snapshot(folder)


def reversed_domain_set(tmp_path: Path) -> Path:
    from moe_emergence.data.domains import read_domain_set

    forward = read_domain_set("code_math_prose")
    file = tmp_path / "reversed.yaml"
    file.write_text(json.dumps({"domain_set": dict(reversed(list(forward.items())))}))
    return file


@pytest.mark.parametrize(
    ("refused", "message"),
    [
        (("seed=7",), "seed: checkpoint 42, now 7"),
        (("seed=-1",), "seed must be an integer"),
        (("data.batch_size=8",), "data.batch_size: checkpoint 4, now 8"),
        (("trainer.max_steps=4",), "nothing is left to train"),
        (("domains",), "trained on the domains code, math, prose"),
        (("ckpt_path=/nonexistent.ckpt",), "does not exist"),
        (("rewind",), "is step 2 of this run, whose newest checkpoint is step 4"),
    ],
)
def test_a_refused_start_in_place_leaves_the_runs_record_as_it_was(ctx, tmp_path, refused, message):
    """Each way a start in a run's folder can be refused after Hydra wrote the new start's
    ``.hydra/`` files (RunFolderGuard's hold, then the refusal in ``train()``): the run's
    ``.hydra/`` is byte-equal afterwards, no ``start<k>/`` left behind."""
    from moe_emergence.runs import check_run_folder

    runs, go = ctx
    folder = tmp_path / "run"
    before = record_a_run(runs, folder)
    extra = [f"data.domain_set={reversed_domain_set(tmp_path)}"] if refused == ("domains",) else []
    if refused == ("rewind",):  # an earlier checkpoint of the run's own folder
        extra.append(f"ckpt_path={folder / 'checkpoints' / 'step000002.ckpt'}")
    extra += [e for e in refused if e not in ("domains", "rewind")]
    ckpt_arg = [e for e in extra if e.startswith("ckpt_path=")] or ["ckpt_path=last"]
    check_run_folder(folder, [*ckpt_arg, *extra])  # as RunFolderGuard does before the job
    for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):  # as Hydra does next
        (folder / ".hydra" / name).write_text(f"# the refused start's {name}\n")
    extra = [e for e in extra if not e.startswith("ckpt_path=")]
    with pytest.raises(UserError, match=re.escape(message)):
        go(folder, *ckpt_arg, *extra)
    assert hydra_snapshot(folder) == before


def test_a_refused_resume_through_train_py_keeps_the_runs_record(
    ctx, tiny_mirror, tiny_tokenizer_dir, tmp_path
):
    """The red team's major, end to end: ``hydra.run.dir=<run> ckpt_path=last seed=7`` is
    refused and the run's ``.hydra/`` is byte-equal after it."""
    runs, _ = ctx
    folder = tmp_path / "run"
    before = record_a_run(runs, folder)
    args = overrides(tiny_mirror, tiny_tokenizer_dir, None)
    env = {"MOE_CACHE_DIR": str(runs / "cache")}
    refused = run_train(
        f"hydra.run.dir={folder}", "ckpt_path=last", "seed=7", *args, cwd=tmp_path, env_extra=env
    )
    assert refused.returncode == 1
    assert_one_error_line(refused.stderr, "seed: checkpoint 42, now 7")
    assert hydra_snapshot(folder) == before


def test_analyze_takes_the_seed_a_run_trained_with_from_its_checkpoint(ctx, caplog):
    """``.hydra/overrides.yaml`` can be rewritten (by hand, or by a start before the fix
    above); the checkpoint's RandomStates seed is what the run trained with, and a record that
    disagrees is named in a warning."""
    from moe_emergence.analysis.evaluate import trained_seed
    from moe_emergence.analysis.loading import load_checkpoint

    runs, _ = ctx
    loaded = load_checkpoint(ckpt(runs, 4), require_moe=False)
    assert loaded.seed == 42
    assert trained_seed("run", loaded, None) == 42
    assert not caplog.records
    with caplog.at_level("WARNING"):
        assert trained_seed("run", loaded, 7) == 42
    assert "overrides.yaml says seed=7 but its checkpoints trained with seed 42" in caplog.text


def test_the_folder_guard_leaves_a_ddp_ranks_relaunch_alone(tmp_path, monkeypatch):
    """Lightning's ddp re-runs train.py per rank with ``hydra.run.dir`` = rank 0's folder, which
    by then holds rank 0's record: only rank 0 checks (and holds) the folder."""
    from omegaconf import OmegaConf

    from moe_emergence.runs import RunFolderGuard

    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("seed: 42\n")
    config = OmegaConf.create(
        {"hydra": {"overrides": {"hydra": [f"hydra.run.dir={tmp_path}"], "task": []}}}
    )
    with pytest.raises(UserError, match="already holds a run"):
        RunFolderGuard._check(config)
    monkeypatch.setenv("LOCAL_RANK", "1")
    RunFolderGuard._check(config)
    assert not (tmp_path / ".hydra" / "start1").exists()


def test_a_rewind_in_the_runs_own_folder_is_refused_before_any_work(ctx, tmp_path, monkeypatch):
    """Resuming in place from a checkpoint older than the folder's newest would write a second
    history beside the later steps (#29): one line naming the newest step, the checkpoint
    given and the forms that work, before anything is built or written."""
    from moe_emergence.runs.history import check_no_rewind

    runs, go = ctx
    folder = tmp_path / "run"
    shutil.copytree(runs / "first", folder)
    before = sorted(p.name for p in folder.rglob("*"))
    earlier = folder / "checkpoints" / "step000002.ckpt"
    monkeypatch.setattr("moe_emergence.train.instantiate", None)  # nothing may be built
    with pytest.raises(UserError) as caught:
        go(folder, f"ckpt_path={earlier}")
    message = str(caught.value)
    assert "\n" not in message
    for needle in (
        f"ckpt_path={earlier} is step 2 of this run, whose newest checkpoint is step 4 "
        "(step000004.ckpt)",
        "Continue the run with ckpt_path=last",
        f"ckpt_path={earlier} continues its history there, init_from={earlier} (instead of "
        "ckpt_path) starts a new run from its weights",
    ):
        assert needle in message, message
    assert sorted(p.name for p in folder.rglob("*")) == before
    check_no_rewind(folder / "checkpoints" / "step000004.ckpt", 4)  # the newest: continues
    # Without a last.ckpt at the newest step, the newest file is named instead.
    (folder / "checkpoints" / "last.ckpt").unlink()
    with pytest.raises(UserError, match=r"Continue the run with ckpt_path=\S+step000004\.ckpt"):
        check_no_rewind(earlier, 2)


def mixed_folder(runs: Path, folder: Path, *files: tuple[Path, str], record: bool = True) -> Path:
    """``runs/first`` (steps 0-4, one start) as a run folder, with ``files`` added to its
    checkpoints under the names given (their sidecars too); ``record=False``: every checkpoint
    without its start record, as written before it existed."""
    shutil.copytree(runs / "first", folder)
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "config.yaml").write_text("seed: 42\n")
    for source, name in files:
        shutil.copy(source, folder / "checkpoints" / name)
    for target in (folder / "checkpoints").glob("*.ckpt"):
        if not record:
            checkpoint = torch.load(target, weights_only=True)
            del checkpoint["callbacks"]["StartRecord"]
            torch.save(checkpoint, target)
        sidecar_path(target).write_text(f"{sha256_file(target)}  {target.name}\n")
    return folder


def test_analyze_refuses_a_folder_whose_checkpoints_come_from_two_starts(ctx, tmp_path):
    """Two histories in one folder (a rewind in place by an earlier version, or files copied in)
    are refused in one line naming the files: one step in two files (Lightning's -v<n> name)
    that are not one start's, or checkpoints whose recorded starts are not one history.
    Checkpoints without a record are one start."""
    from moe_emergence.runs import find_runs

    runs, _ = ctx

    def refused(folder: Path) -> str:
        with pytest.raises(UserError) as caught:
            find_runs(folder, "PATH")
        assert "\n" not in str(caught.value)
        return str(caught.value)

    other = runs / "full" / "checkpoints"  # another start's history of the same settings
    twice = mixed_folder(runs, tmp_path / "v", (other / "step000004.ckpt", "step000004-v1.ckpt"))
    assert "step000004-v1.ckpt, step000004.ckpt all hold step 4" in refused(twice)
    before = mixed_folder(
        runs, tmp_path / "old", (ckpt(runs, 4), "step000004-v1.ckpt"), record=False
    )
    assert "step000004-v1.ckpt, step000004.ckpt all hold step 4" in refused(before)
    later = mixed_folder(runs, tmp_path / "two", (other / "step000006.ckpt", "step000006.ckpt"))
    message = refused(later)
    assert "step000004.ckpt at step 4 is not the history of step000006.ckpt at step 6" in message
    assert "start 1 (from step 0): step000000.ckpt, step000001.ckpt" in message
    assert "start 2 (from step 0): step000006.ckpt" in message
    for folder in (
        mixed_folder(runs, tmp_path / "one"),
        mixed_folder(runs, tmp_path / "unrecorded", record=False),
    ):
        assert [len(r.checkpoints) for r in find_runs(folder, "PATH")[0]] == [5]  # one history


def test_weights_only_checkpoints_analyse_and_start_runs_but_do_not_resume(ctx, tmp_path):
    """``save_weights_only=true``: a third of the size (no optimizer moments); analyze and
    inspect load it, init_from starts a run from it, a resume is refused in one line naming
    init_from."""
    runs, go = ctx
    light = tmp_path / "light"
    go(light, "callbacks.model_checkpoint.save_weights_only=true", stop_at=2)
    file = light / "checkpoints" / "step000002.ckpt"
    assert "optimizer_states" not in torch.load(file, map_location="cpu", weights_only=False)
    assert file.stat().st_size < ckpt(runs, 2).stat().st_size / 2
    assert load_checkpoint(file).step == 2
    with pytest.raises(UserError, match=r"holds weights only .* init_from="):
        go(tmp_path / "resumed", f"ckpt_path={file}")
    go(tmp_path / "branch", f"init_from={file}", stop_at=1)
    assert (tmp_path / "branch" / "checkpoints" / "step000001.ckpt").is_file()
