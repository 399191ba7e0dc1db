"""A real single-device fit over two epochs: a new block order in epoch 2, and resumes (in the
middle of epoch 2, at the end of epoch 1) that see the same batches as the uninterrupted run;
a resume with another batch size, data or world size is refused by the loader's state."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers.data import tiny_datamodule_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint

from moe_emergence.data import MixedDomainDataModule
from moe_emergence.data.loader import LOADER_STATE_VERSION, ResumableDataLoader
from moe_emergence.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")

BATCH = 16
Record = tuple[int, int, list[list[int]]]  # (global step, epoch, input_ids of the batch)


class RecordBatches(L.LightningModule):
    """Trains nothing; records (global step, epoch, input_ids) of every training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[Record] = []

    def training_step(self, batch, batch_idx):
        ids = batch["input_ids"].tolist()
        self.seen.append((self.trainer.global_step, self.current_epoch, ids))
        return (self.weight * 0).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit(settings: dict, root: Path, callbacks=(), ckpt_path=None) -> list[Record]:
    module = RecordBatches()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=False,
        default_root_dir=str(root),
        callbacks=list(callbacks),
        enable_checkpointing=bool(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=MixedDomainDataModule(**settings), ckpt_path=ckpt_path)
    return module.seen


@dataclass
class FullRun:
    settings: dict
    seen: list[Record]
    steps_per_epoch: int
    checkpoints: Path

    def checkpoint(self, step: int, kind: str = "step") -> Path:
        (path,) = (self.checkpoints / kind).glob(f"epoch=*-step={step}.ckpt")
        return path


@pytest.fixture(scope="module")
def full_run(tiny_mirror, tiny_tokenizer_dir, tmp_path_factory) -> FullRun:
    """Two uninterrupted epochs of ~7 batches of 16 blocks of 64 tokens; a checkpoint after
    every step (ckpt/step) and at the end of every epoch (ckpt/epoch)."""
    root = tmp_path_factory.mktemp("full")
    settings = tiny_datamodule_kwargs(
        tiny_mirror, tiny_tokenizer_dir, root / "cache", 64, batch_size=BATCH
    )
    checkpoints = [
        ModelCheckpoint(dirpath=root / "ckpt" / "step", every_n_train_steps=1, save_top_k=-1),
        ModelCheckpoint(dirpath=root / "ckpt" / "epoch", every_n_epochs=1, save_top_k=-1),
    ]
    seen = fit(settings, root, checkpoints)
    steps_per_epoch = sum(1 for _, epoch, _ in seen if epoch == 0)
    return FullRun(settings, seen, steps_per_epoch, root / "ckpt")


def test_second_epoch_has_the_same_blocks_in_a_new_order(full_run):
    n = full_run.steps_per_epoch
    assert n >= 4
    assert [(step, epoch) for step, epoch, _ in full_run.seen] == [
        (s, s // n) for s in range(2 * n)
    ]
    epochs = [
        [ids for _, e, batch in full_run.seen if e == epoch for ids in batch] for epoch in (0, 1)
    ]
    assert Counter(map(tuple, epochs[0])) == Counter(map(tuple, epochs[1]))  # each block once
    assert epochs[0] != epochs[1]  # in another order
    assert epochs[0][:BATCH] != epochs[1][:BATCH]


@pytest.mark.parametrize(
    ("where", "num_workers"),
    [("mid_epoch_2", 0), ("last_step_of_epoch_1", 0), ("epoch_1_end", 0), ("mid_epoch_2", 2)],
)
def test_resume_sees_the_uninterrupted_runs_batches(full_run, where, num_workers, tmp_path):
    n = full_run.steps_per_epoch
    step = n + n // 2 if where == "mid_epoch_2" else n
    checkpoint = full_run.checkpoint(step, "epoch" if where == "epoch_1_end" else "step")
    settings = {**full_run.settings, "num_workers": num_workers}
    resumed = fit(settings, tmp_path, ckpt_path=checkpoint)
    assert resumed[0][:2] == (step, step // n)
    assert resumed == full_run.seen[step:]  # same steps, epochs and batches, batch for batch


def test_resume_with_another_batch_size_or_data_is_refused_in_one_line(full_run, tmp_path):
    """Through Lightning's restore of the loader state (a plain Trainer, no train.py checks)."""
    checkpoint = full_run.checkpoint(full_run.steps_per_epoch // 2)
    with pytest.raises(UserError) as caught:
        fit({**full_run.settings, "batch_size": 8}, tmp_path / "a", ckpt_path=checkpoint)
    message = str(caught.value)
    assert "\n" not in message
    assert f"data.batch_size: checkpoint {BATCH}, now 8" in message
    assert f"init_from={checkpoint}" in message
    with pytest.raises(UserError, match="the training data"):
        fit({**full_run.settings, "eval_fraction": 0.2}, tmp_path / "b", ckpt_path=checkpoint)


def _loader(identity: dict) -> ResumableDataLoader:
    return ResumableDataLoader(
        list(range(8)), batch_size=2, identity=identity, checkpoint=lambda: "run/last.ckpt"
    )


IDENTITY = {
    "batch_size": 2,
    "world_size": 1,
    "seed": 42,
    "balance_tokens": False,
    "block_size": 64,
    "data_fingerprint": "0123456789abcdef",
}


def test_loader_state_carries_version_and_identity():
    state = _loader(IDENTITY).state_dict()
    assert state == {"version": LOADER_STATE_VERSION, "epoch": 0, "batches_done": 0, **IDENTITY}
    _loader(IDENTITY).load_state_dict({**state, "batches_done": 1})  # unchanged: accepted


WORLD = "world size (trainer.devices x trainer.num_nodes)"


@pytest.mark.parametrize(
    ("changes", "needles"),
    [
        ({"world_size": 2}, [f"{WORLD}: checkpoint 2, now 1"]),
        (
            {"seed": 1, "balance_tokens": True},
            ["data.seed: checkpoint 1, now 42", "data.balance_tokens: checkpoint True, now False"],
        ),
        (
            {"data_fingerprint": "fedcba9876543210"},
            ["the training data", "checkpoint fedcba987654, now 0123456789ab"],
        ),
    ],
)
def test_loader_refuses_a_changed_identity(changes, needles):
    state = {**_loader(IDENTITY).state_dict(), **changes}
    with pytest.raises(UserError) as caught:
        _loader(IDENTITY).load_state_dict(state)
    message = str(caught.value)
    assert "\n" not in message and "init_from=run/last.ckpt" in message
    for needle in needles:
        assert needle in message, message


def test_loader_refuses_a_state_without_a_format_version():
    with pytest.raises(UserError, match="no format version"):
        _loader(IDENTITY).load_state_dict({"epoch": 1, "batches_done": 2})
