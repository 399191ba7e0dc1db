"""A run folder: the guard that keeps a new run out of a folder holding one (and holds a
continued run's earlier record until its start is settled), the folder checks, and the run's
``summary.json`` (:class:`RunSummary`).

A run folder (``outputs/runs/<date>/<time>``, or a sweep job's folder: ``${unique_dir:...}``,
:mod:`moe_emergence.runs.unique_dir`) holds ``.hydra/`` (``config.yaml``, ``overrides.yaml``,
``hydra.yaml``), ``checkpoints/`` (``step*.ckpt``, ``last.ckpt``, each with a ``.sha256``
sidecar), ``csv/``, ``routing/``, ``data_report.json`` and ``summary.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf

from moe_emergence.errors import UserError, report_user_errors
from moe_emergence.model.module import DISPATCH_KEY
from moe_emergence.runs.checkpoint import CHECKPOINTS_DIR
from moe_emergence.runs.record import HYDRA_CONFIG, RECORD_FILES, split_override
from moe_emergence.versions import library_versions

SUMMARY_FILE = "summary.json"


def remove_partial_writes(folder: Path) -> list[Path]:
    """Delete the temporary files of writes that a killed process left in ``folder``
    (``.<name>.<id>.tmp``, :func:`moe_emergence.files.atomic_path`); return them. Only the
    folder's own run writes there (:class:`RunFolderGuard`)."""
    found = sorted(p for p in folder.glob(".*.tmp") if p.is_file()) if folder.is_dir() else []
    for path in found:
        path.unlink(missing_ok=True)
    return found


def check_writable(folder: Path) -> None:
    """Refuse (one line) a run folder, or the folder run folders go under, that cannot be
    made or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check."):
            pass
    except OSError as exc:
        raise UserError(
            f"{folder} cannot be written ({exc.strerror or type(exc).__name__}): pass a writable "
            f"folder (hydra.run.dir=<folder>, or paths.output_dir=<folder> for new runs)."
        ) from None


def holds_a_run(folder: Path) -> bool:
    """Whether ``folder`` already holds a run (its ``.hydra/config.yaml`` or a checkpoint)."""
    return (folder / HYDRA_CONFIG).is_file() or any((folder / CHECKPOINTS_DIR).glob("*.ckpt"))


@dataclass
class HeldRecord:
    """The record of a run continued in place, copied to ``kept`` (``.hydra/start<k>/``)
    before Hydra writes the new start's files over it in ``hydra_dir``; ``existed``: which of
    :data:`RECORD_FILES` the run had."""

    hydra_dir: Path
    kept: Path
    existed: tuple[str, ...]

    def put_back(self) -> None:
        """Undo the start: the run's own files back in ``hydra_dir`` (the refused start's
        removed), ``kept`` removed, so ``.hydra/`` is as it was before the start."""
        for name in RECORD_FILES:
            if name in self.existed:
                os.replace(self.kept / name, self.hydra_dir / name)
            else:
                (self.hydra_dir / name).unlink(missing_ok=True)
        shutil.rmtree(self.kept, ignore_errors=True)


_held_record: HeldRecord | None = None  # set by RunFolderGuard, settled by start_or_put_back


@contextlib.contextmanager
def start_or_put_back() -> Iterator[None]:
    """Around the checks that may refuse a start (train's settings, checkpoints, data): where
    the start continues a run in place and anything in the block raises (a refusal, a bad
    value, an interrupt), the run's ``.hydra/`` is put back as it was (:class:`HeldRecord`),
    so that a refused start leaves no trace in the run's record; where the block ends, the new
    start's record stands and the earlier one stays in ``.hydra/start<k>/``."""
    global _held_record
    try:
        yield
    except BaseException:
        held, _held_record = _held_record, None
        if held is not None:
            held.put_back()
        raise
    _held_record = None


def check_run_folder(run_dir: Path, task_overrides: Sequence[str]) -> Path | None:
    """Before Hydra writes ``.hydra/`` into an explicit ``hydra.run.dir``: refuse (one line) a
    new run in a folder that holds a run (only ``ckpt_path`` continues one there); for a run
    continued in place, keep the earlier start's ``.hydra/*.yaml`` as ``.hydra/start<k>/``
    (k numbers the starts), held until :func:`start_or_put_back` settles the start, and
    return that folder."""
    global _held_record
    if not holds_a_run(run_dir):
        return None
    ckpt = [v for k, v in map(split_override, task_overrides) if k == "ckpt_path"]
    if not ckpt or ckpt[-1] in ("null", "None", ""):
        raise UserError(
            f"hydra.run.dir={run_dir} already holds a run: a new run goes to a new folder "
            f"(leave hydra.run.dir unset, or name an empty folder); to continue that run, add "
            f"ckpt_path=last."
        )
    hydra_dir = run_dir / HYDRA_CONFIG.parent
    starts = len(list(hydra_dir.glob("start*")))
    kept = hydra_dir / f"start{starts + 1}"
    kept.mkdir(parents=True)
    existed = tuple(name for name in RECORD_FILES if (hydra_dir / name).is_file())
    for name in existed:
        shutil.copy2(hydra_dir / name, kept / name)
    _held_record = HeldRecord(hydra_dir, kept, existed)
    return kept


RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID")


def launched_rank() -> int:
    """This process's rank where a launcher set one (Lightning's ddp re-runs ``train.py`` per
    rank with ``LOCAL_RANK`` and ``hydra.run.dir`` set to rank 0's run folder; SLURM sets
    ``SLURM_PROCID``), else 0."""
    ranks = [os.environ.get(name, "0") for name in RANK_VARIABLES]
    return max(int(r) if r.isdigit() else 0 for r in ranks)


class RunFolderGuard(HydraCallback):
    """Hydra callback (``hydra.callbacks`` in conf/config.yaml) running
    :func:`check_run_folder` on an explicit ``hydra.run.dir`` before the job writes its
    ``.hydra/`` files; a refusal is one line (``error: ...``, exit 1)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if status := report_user_errors(lambda: self._check(config)):
            sys.exit(status)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        output = OmegaConf.select(config, "paths.output_dir", default=None)
        if output and (status := report_user_errors(lambda: check_writable(Path(output)))):
            sys.exit(status)

    @staticmethod
    def _check(config: DictConfig) -> None:
        if launched_rank() != 0:  # rank 0 checked (and holds) the folder; it is this run's
            return
        hydra_overrides = OmegaConf.select(config, "hydra.overrides.hydra", default=[]) or []
        given = [v for k, v in map(split_override, hydra_overrides) if k == "hydra.run.dir"]
        if not given:  # a fresh folder from ${unique_dir:...} under paths.output_dir
            try:
                output = OmegaConf.select(config, "paths.output_dir", default=None)
            except Exception:  # an interpolation Hydra resolves later: its own error then
                output = None
            if output:
                check_writable(Path(output))
            return
        check_writable(Path(given[-1]))
        task = OmegaConf.select(config, "hydra.overrides.task", default=[]) or []
        check_run_folder(Path(given[-1]), list(task))


class RunSummary(L.Callback):
    """Writes ``summary.json`` in the run dir at the end of training (rank 0): the final step,
    the per-domain train losses over all ranks, the MoE dispatch path (None for a dense model),
    the last logged metrics and the versions of Python and the libraries the run used
    (:func:`~moe_emergence.versions.library_versions`). Under ddp_spawn the parent process's
    trainer never sees the steps; it reads this file instead."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        losses = getattr(pl_module, "final_domain_losses", dict)()  # collective: every rank
        if not trainer.is_global_zero:
            return
        summary = {
            "global_step": int(trainer.global_step),
            "domain_losses": losses,
            DISPATCH_KEY: getattr(pl_module, "dispatch", None),
            "final_metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "library_versions": library_versions(),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(summary, indent=2))
