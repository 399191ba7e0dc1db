"""train.py end to end on a fixture mirror with the tiny model: loss falls, resume continues the
step count, routing outputs are written, sweeps share one tokenization, ddp under -m is refused."""

from __future__ import annotations

import csv
import json
import platform
import warnings
from importlib import metadata
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers.configs import tiny_overrides
from helpers.old_layout import write_per_expert_copy
from helpers.script import run_train
from hydra.utils import instantiate
from omegaconf import open_dict

from moe_emergence.analysis.tables import read_table
from moe_emergence.checkpoints import load_initial_weights, load_mapped
from moe_emergence.config import compose_config
from moe_emergence.errors import UserError, user_error_in
from moe_emergence.train import build_module, check_launch, train

REPO = Path(__file__).resolve().parents[1]


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "csv" / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_thirty_steps_lower_the_loss_and_write_routing(tiny_mirror, tiny_tokenizer_dir, tmp_path):
    cfg = compose_config(
        tiny_overrides(
            tiny_mirror,
            tiny_tokenizer_dir,
            tmp_path,
            "trainer.max_steps=30",
            "callbacks.routing_analysis.every_n_steps=20",
        )
    )
    out = train(cfg)
    assert out["global_step"] == 30
    losses = [float(r["train/lm_loss"]) for r in read_metrics(tmp_path) if r.get("train/lm_loss")]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    for domain in ("code", "math", "prose"):
        assert f"train/loss_{domain}" in out["final_metrics"]
    assert set(out["domain_losses"]) == {"code", "math", "prose"}

    routing = tmp_path / "routing"
    assert out["routing"] == routing
    trajectory = read_table(routing / "trajectory.csv")
    assert [(r["step"], r["layer"]) for r in trajectory] == [
        (step, layer) for step in ("0", "20", "30") for layer in ("2", "3")
    ]  # a fresh run starts at step 0; every 20 steps; and the end
    assert {r["probe"] for r in trajectory} == {"train_sample"}  # no held-out split here
    for r in trajectory:
        assert 0 <= float(r["nmi"]) <= 1 and float(r["null_p95"]) >= float(r["null_mean"]) >= 0
    counts = read_table(routing / "counts.csv")
    probe = json.loads((routing / "probe.json").read_text())
    for step in ("0", "20", "30"):
        for layer in ("2", "3"):
            for domain in ("code", "math", "prose"):
                key = (step, layer, domain)
                cells = [
                    int(r["tokens"]) for r in counts if (r["step"], r["layer"], r["domain"]) == key
                ]
                assert len(cells) == 4 and sum(cells) == probe["tokens"][domain]  # top-1
    windows = read_table(routing / "train_window_counts.csv")
    assert {(r["step_start"], r["step_end"]) for r in windows} == {("0", "20"), ("20", "30")}
    per_window = {}
    for r in windows:
        key = (r["step_start"], r["layer"])
        per_window[key] = per_window.get(key, 0) + int(r["assignments"])
    assert per_window[("0", "2")] == 20 * 4 * 32 and per_window[("20", "3")] == 10 * 4 * 32
    for name in ("heatmap.png", "emergence.png"):
        assert (routing / name).stat().st_size > 0
    assert (tmp_path / "data_report.json").exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["global_step"] == 30
    versions = summary["library_versions"]  # what the run was made with, as installed
    assert versions["python"] == platform.python_version()
    libraries = ["torch", "lightning", "transformers", "tokenizers", "datasets", "hydra-core"]
    for name in [*libraries, "omegaconf", "numpy", "moe_emergence"]:
        assert versions[name] == metadata.version(name), name


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
        tiny_mirror,
        tiny_tokenizer_dir,
        run_dir,
        "callbacks.model_checkpoint.every_n_train_steps=3",
        *extra,
    )
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


def test_multirun_of_two_jobs_tokenizes_once(tiny_mirror, tiny_tokenizer_dir, tmp_path):
    args = tiny_overrides(tiny_mirror, tiny_tokenizer_dir, None)  # each job's own folder
    proc = run_train(
        "-m",
        "seed=1,2",
        "data/size=1mb",
        *args,
        "trainer.max_steps=2",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
    )
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
        assert (tmp_path / "sweep" / job / "routing" / "counts.csv").exists()


def test_multirun_with_ddp_exits_with_the_hint(tmp_path):
    proc = run_train("-m", "trainer=ddp", "seed=1,2", cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "ddp_spawn" in proc.stderr


class RecordTrainingModes(L.Callback):
    """Writes to ``path``, for every training forward of the GPT-2, whether every module of
    the LightningModule was in train mode."""

    def __init__(self, path: str) -> None:
        self.path, self.modes = path, []

    def on_fit_start(self, trainer, pl_module) -> None:
        def hook(module, args):
            self.modes.append(all(m.training for m in pl_module.modules()))

        pl_module.model.register_forward_pre_hook(hook)

    def on_train_end(self, trainer, pl_module) -> None:
        Path(self.path).write_text(json.dumps(self.modes))


def test_pretrained_folder_trains_in_train_mode(tiny_mirror, tiny_tokenizer_dir, tmp_path):
    """from_pretrained returns eval mode; every module must still train in train mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    pretrained = tmp_path / "tiny-gpt2"
    config = GPT2Config(vocab_size=512, n_positions=64, n_embd=32, n_layer=4, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(pretrained)
    cfg = compose_config(
        tiny_overrides(
            tiny_mirror,
            tiny_tokenizer_dir,
            tmp_path / "run",
            f"model.pretrained={pretrained}",
            "model.dropout=0.1",
            "trainer.max_steps=3",
        )
    )
    modes = tmp_path / "modes.json"
    with open_dict(cfg):
        cfg.callbacks.record = {"_target_": f"{__name__}.RecordTrainingModes", "path": str(modes)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg)
    # Training forwards only: the probe routes through model.transformer, not the hooked root.
    assert json.loads(modes.read_text()) == [True, True, True]
    assert not [str(w.message) for w in caught if "eval mode" in str(w.message)]


def test_ddp_spawn_summary_reports_the_true_step_and_losses(
    tiny_mirror, tiny_tokenizer_dir, tmp_path
):
    """Under ddp_spawn the parent's trainer never sees the steps: the summary comes from rank 0."""
    cfg = compose_config(
        tiny_overrides(
            tiny_mirror,
            tiny_tokenizer_dir,
            tmp_path,
            "trainer.max_steps=3",
            "trainer.devices=2",
            "trainer.strategy=ddp_spawn",
        )
    )
    out = train(cfg)
    assert out["global_step"] == 3
    assert set(out["domain_losses"]) == {"code", "math", "prose"}
    assert all(0 < v < 20 for v in out["domain_losses"].values())
    assert (tmp_path / "routing" / "trajectory.csv").exists()


def test_progress_bar_off_needs_only_the_trainer_flag(tiny_mirror, tiny_tokenizer_dir, tmp_path):
    """``trainer.enable_progress_bar=false`` alone turns the bar off (Lightning refuses a bar
    callback with it, so train() leaves the configured one out)."""
    cfg = compose_config(
        tiny_overrides(tiny_mirror, tiny_tokenizer_dir, tmp_path, "trainer.max_steps=1")
    )
    assert cfg.callbacks.progress_bar is not None and cfg.trainer.enable_progress_bar is False
    assert train(cfg)["global_step"] == 1


def test_per_expert_checkpoint_starts_a_run_but_cannot_resume(
    tiny_mirror, tiny_tokenizer_dir, tmp_path
):
    """A checkpoint of the per-expert layout: ``init_from`` takes its weights (converted to
    stacked experts, the same values as its stacked original); ``ckpt_path`` is refused in
    one line that names ``init_from``, before any data or model is built."""
    train(
        compose_config(
            tiny_overrides(
                tiny_mirror, tiny_tokenizer_dir, tmp_path / "first", "trainer.max_steps=2"
            )
        )
    )
    stacked = tmp_path / "first" / "checkpoints" / "last.ckpt"
    old = write_per_expert_copy(stacked, tmp_path / "old" / "step2.ckpt")
    modules = []
    for path in (stacked, old):
        cfg = compose_config(tiny_overrides(tiny_mirror, tiny_tokenizer_dir, tmp_path / "x"))
        module = build_module(cfg.model, instantiate(cfg.data))
        assert load_initial_weights(module, load_mapped(path, "init_from"), path) == 2
        modules.append(module.state_dict())
    assert modules[0].keys() == modules[1].keys()
    assert all(torch.equal(modules[0][k], modules[1][k]) for k in modules[0])

    with pytest.raises(UserError) as refused:
        train(
            compose_config(
                tiny_overrides(
                    tiny_mirror, tiny_tokenizer_dir, tmp_path / "resume", f"ckpt_path={old}"
                )
            )
        )
    message = str(refused.value)
    assert "\n" not in message and f"init_from={old}" in message and "per-expert" in message
    assert not (tmp_path / "resume").exists()
    start = tiny_overrides(
        tiny_mirror, tiny_tokenizer_dir, tmp_path / "new", f"init_from={old}", "trainer.max_steps=1"
    )
    out = train(compose_config(start))
    assert out["global_step"] == 1 and out["init_from"] == old


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("seed=4294967296", "seed must be an integer in [0, 4294967296)"),
        ("data.block_size=4611686018427387904", "overflow the packing's int64 offsets"),
    ],
)
def test_values_past_the_libraries_limits_are_one_line_errors(override, needle, tmp_path):
    with pytest.raises(Exception) as refused:  # Hydra wraps the datamodule's error
        train(compose_config(["experiment=debug", f"paths.run_dir={tmp_path}", override]))
    assert needle in str(user_error_in(refused.value))  # the one line train.py prints


def test_the_closing_lines_name_what_the_logger_wrote(tmp_path):
    """The CSV logger's metrics.csv, else the logger's folder (TensorBoard's event files)."""
    from moe_emergence.train import _metrics_location

    class Logger:
        log_dir = str(tmp_path)

    assert _metrics_location(Logger()) == tmp_path
    (tmp_path / "metrics.csv").write_text("step\n")
    assert _metrics_location(Logger()) == tmp_path / "metrics.csv"
    assert _metrics_location(None) is None
