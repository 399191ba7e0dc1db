"""The runs ``analyze`` measures: a ``.ckpt`` file, a run dir or a folder of run dirs (a
multirun dir), each with its checkpoint files (one per optimizer step, one history) and its
record (:class:`~moe_emergence.runs.record.RunRecord`), read once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from moe_emergence.checkpoints import load_mapped, verify_sidecar
from moe_emergence.errors import UserError
from moe_emergence.runs.checkpoint import CHECKPOINTS_DIR
from moe_emergence.runs.history import CheckpointStart, check_one_history, read_history
from moe_emergence.runs.record import HYDRA_CONFIG, RunRecord


@dataclass
class RunCheckpoints:
    """A run to analyse: its folder (None for a lone checkpoint file), its name within the
    analysis and its checkpoint files, one per optimizer step, oldest first (see
    :func:`checkpoint_steps`)."""

    name: str
    run_dir: Path | None
    checkpoints: list[Path]

    @cached_property
    def record(self) -> RunRecord:
        """The run's ``.hydra/`` record (each file read once; an empty one without a run
        dir)."""
        return RunRecord(self.run_dir)


def checkpoint_run_dir(path: Path) -> Path | None:
    """The run dir of a ``.ckpt`` file: its folder's parent when that holds ``.hydra/``."""
    run_dir = path.resolve().parent.parent
    return run_dir if (run_dir / HYDRA_CONFIG).is_file() else None


def find_runs(path: Path, option: str) -> tuple[list[RunCheckpoints], list[str]]:
    """The runs that ``option=path`` names: a ``.ckpt`` file, a run dir (holding ``.hydra/``)
    or a folder of run dirs (a multirun dir); and notes on runs skipped for having no
    checkpoint. One-line :class:`UserError` when it names none, or none with a checkpoint, or
    a run dir whose checkpoints are not one history (:func:`.history.check_one_history`)."""
    if not path.exists():
        raise UserError(
            f"{option}={path} does not exist: pass a run dir, a multirun dir or a .ckpt file."
        )
    if path.is_file():
        load_mapped(path, option)  # a readable checkpoint, else a one-line error
        return [RunCheckpoints(path.stem, checkpoint_run_dir(path), [path])], []
    if (path / HYDRA_CONFIG).is_file():
        run_dirs = [path]
    else:
        run_dirs = sorted(p.parent.parent for p in path.rglob(str(HYDRA_CONFIG)))
    if not run_dirs:
        raise UserError(
            f"{option}={path} holds no run dir (no {HYDRA_CONFIG} in it or below it): pass a "
            f"run dir (outputs/runs/<date>/<time>), a multirun dir or a .ckpt file."
        )
    runs, notes = [], []
    for run_dir in run_dirs:
        name = run_dir.name if run_dir == path else str(run_dir.relative_to(path))
        files = sorted((run_dir / CHECKPOINTS_DIR).glob("*.ckpt"))
        if files:
            history = read_history(files, option)
            check_one_history(run_dir, history, option)
            steps = checkpoint_steps(history)
            runs.append(RunCheckpoints(name, run_dir, [p for _, p in steps]))
        else:
            notes.append(f"{name}: no checkpoints, skipped")
    if not runs:
        raise UserError(
            f"{option}={path}: none of its {len(run_dirs)} run dir(s) holds a checkpoint "
            f"({CHECKPOINTS_DIR}/*.ckpt): train with callbacks.model_checkpoint on (the "
            f"default) and analyse again."
        )
    return runs, notes


def checkpoint_steps(history: Sequence[CheckpointStart]) -> list[tuple[int, Path]]:
    """One file per optimizer step, by step: a ``step*.ckpt`` wins over ``last.ckpt`` of the
    same step (``history``: :func:`moe_emergence.runs.history.read_history`)."""
    by_step: dict[int, Path] = {}
    for entry in sorted(history, key=lambda c: c.path.name.startswith("last")):
        by_step.setdefault(entry.step, entry.path)
    return sorted(by_step.items())


def verify_checkpoints(runs: Sequence[RunCheckpoints], option: str) -> None:
    """Check every checkpoint against its ``.sha256`` sidecar (one-line error), before any
    expensive work."""
    for run in runs:
        for path in run.checkpoints:
            verify_sidecar(path, option)
