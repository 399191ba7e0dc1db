"""train.py end to end on a fixture mirror with the tiny model: loss falls, resume continues the
step count, routing outputs are written, sweeps share one tokenization, ddp under -m is refused."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from omegaconf import open_dict

from moe_emergence.config import compose_config
from moe_emergence.train import check_launch, train

REPO = Path(__file__).resolve().parents[1]


def tiny_overrides(mirror, tokenizer, run_dir, *extra):
    return [
        "model=tiny_moe",
        "trainer=cpu",
        f"data.hub_mirror={mirror}",
        f"data.tokenizer={tokenizer}",
        "data.block_size=32",
        "data.batch_size=4",
        "data.show_progress=false",
        f"paths.run_dir={run_dir}",
        "trainer.enable_progress_bar=false",
        "~callbacks.progress_bar",
        "trainer.log_every_n_steps=1",
        "model.warmup_steps=2",
        *extra,
    ]


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "csv" / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_thirty_steps_lower_the_loss_and_write_routing(tiny_mirror, tiny_tokenizer_dir, tmp_path):
    cfg = compose_config(tiny_overrides(tiny_mirror, tiny_tokenizer_dir, tmp_path,
                                        "trainer.max_steps=30"))  # fmt: skip
    out = train(cfg)
    assert out["global_step"] == 30
    losses = [float(r["train/lm_loss"]) for r in read_metrics(tmp_path) if r.get("train/lm_loss")]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    for domain in ("code", "math", "prose"):
        assert f"train/loss_{domain}" in out["final_metrics"]
    with (tmp_path / "routing.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["layer"], r["domain"]) for r in rows] == [
        (layer, d) for layer in ("2", "3") for d in ("code", "math", "prose")
    ]
    for r in rows:
        shares = [float(r[f"expert_{e}"]) for e in range(4)]
        assert abs(sum(shares) - 1) < 1e-3 and int(r["assignments"]) > 0
    assert (tmp_path / "routing.png").stat().st_size > 0
    assert (tmp_path / "data_report.json").exists()


class RecordBatches(L.Callback):
    """Writes (global step, first ids of every block) of each training batch to ``path``."""

    def __init__(self, path: str) -> None:
        self.path, self.seen = path, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append([trainer.global_step, batch["input_ids"][:, :4].tolist()])

    def on_train_end(self, trainer, pl_module) -> None:
        Path(self.path).write_text(json.dumps(self.seen))


def run_recorded(overrides: list[str], record: Path) -> dict:
    cfg = compose_config(overrides)
    with open_dict(cfg):
        cfg.callbacks.record = {"_target_": f"{__name__}.RecordBatches", "path": str(record)}
    return train(cfg)


def test_resume_mid_epoch_continues_step_and_batches(tiny_mirror, tiny_tokenizer_dir, tmp_path):
    """Like an uninterrupted run: same global steps, and the same batches after the restore."""
    base = lambda run_dir, *extra: tiny_overrides(  # noqa: E731
        tiny_mirror, tiny_tokenizer_dir, run_dir,
        "callbacks.model_checkpoint.every_n_train_steps=3", *extra,
    )  # fmt: skip
    run_recorded(base(tmp_path / "full", "trainer.max_steps=9"), tmp_path / "full.json")
    run_recorded(base(tmp_path / "first", "trainer.max_steps=6"), tmp_path / "first.json")
    checkpoint = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert checkpoint.exists()
    out = run_recorded(
        base(tmp_path / "second", "trainer.max_steps=9", f"ckpt_path={checkpoint}"),
        tmp_path / "second.json",
    )
    assert out["global_step"] == 9
    full = json.loads((tmp_path / "full.json").read_text())
    resumed = json.loads((tmp_path / "second.json").read_text())
    assert [step for step, _ in resumed] == [6, 7, 8]
    assert resumed == full[6:]  # the batches an uninterrupted run saw at steps 6-8
    steps = [int(r["step"]) for r in read_metrics(tmp_path / "second") if r.get("train/lm_loss")]
    assert min(steps) >= 6


def test_ddp_inside_multirun_is_refused():
    cfg = compose_config(["trainer=ddp"])
    with pytest.raises(ValueError, match="ddp_spawn"):
        check_launch(cfg, multirun=True)
    check_launch(cfg, multirun=False)
    check_launch(compose_config(["trainer=ddp", "trainer.strategy=ddp_spawn"]), multirun=True)
    slurm = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    check_launch(cfg, multirun=True, launcher=slurm)


def run_train(*args, cwd, env_extra=None, timeout=600):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_multirun_of_two_jobs_tokenizes_once(tiny_mirror, tiny_tokenizer_dir, tmp_path):
    args = [a for a in tiny_overrides(tiny_mirror, tiny_tokenizer_dir, "x") if "run_dir" not in a]
    proc = run_train("-m", "seed=1,2", "data/size=1mb", *args, "trainer.max_steps=2",
                     f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert log.count("Token cache written") == 1
    assert "Found token cache" in log
    jobs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert len(jobs) == 2
    assert jobs[0].startswith("0_") and "seed=1" in jobs[0]
    assert jobs[1].startswith("1_") and "seed=2" in jobs[1]
    assert "data-size=1mb" in jobs[0]  # a group override does not nest folders
    for job in jobs:
        assert (tmp_path / "sweep" / job / "routing.csv").exists()


def test_multirun_with_ddp_exits_with_the_hint(tmp_path):
    proc = run_train("-m", "trainer=ddp", "seed=1,2", cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "ddp_spawn" in proc.stderr
