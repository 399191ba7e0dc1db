"""One history per run folder: which starts wrote a checkpoint, and the two checks that keep a
folder to one history.

A *start* is one ``train()`` of a run: a fresh run, an ``init_from`` run, or a resume. Every
checkpoint records its *lineage* (:class:`StartRecord`, saved as Lightning callback state): the
starts its history went through, oldest first, each ``[start id, step it began at]``; a fresh
start is ``[[id, 0]]``, and a resume from a checkpoint at step ``s`` appends ``[id, s]`` to that
checkpoint's lineage (its own checkpoints are the steps after ``s``). Checkpoints written before
the record existed read as one start, ``[[UNRECORDED, 0]]``.

- :func:`check_no_rewind`: a resume in the run's own folder from a checkpoint older than the
  folder's newest is refused (it would write a second history over the steps after it).
- :func:`check_one_history`: ``analyze`` refuses a folder whose checkpoints come from more
  than one history: one step held by two files (``step000008.ckpt`` and Lightning's
  ``step000008-v1.ckpt``, written when a later start found the name taken) that do not record
  one start, or lineages that are not one history (the checkpoint at step ``s`` must have the
  lineage of every later one, cut to the starts that began before ``s``). ``last*.ckpt`` may
  hold any step (a resumed run moved to another folder writes ``last-v1.ckpt`` beside the
  earlier start's ``last.ckpt``: one history).
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L

from moe_emergence.checkpoints import load_mapped
from moe_emergence.errors import UserError

RECORD_VERSION = 1
UNRECORDED = "unrecorded"  # the start of checkpoints written before StartRecord existed
LAST_PREFIX = "last"  # last.ckpt, last-v1.ckpt: the newest step of a start, beside its step file

Lineage = list[tuple[str, int]]


class StartRecord(L.Callback):
    """Saves this start's lineage in every checkpoint (see the module doc): on a resume, the
    resumed checkpoint's lineage plus ``[id, resumed step]``; and ``settings``, what this start
    trained with that Lightning's checkpoint does not hold (the trainer's gradient clipping,
    accumulation and precision: :func:`.resume_settings.trainer_settings`), for the next resume
    to compare. Its ``on_train_start`` must run before any checkpoint is saved there
    (``StepZeroCheckpoint``): add it before."""

    def __init__(self, settings: dict[str, Any] | None = None) -> None:
        self.start_id = uuid.uuid4().hex
        self.settings = dict(settings or {})
        self._parent: Lineage | None = None
        self._lineage: Lineage | None = None

    def state_dict(self) -> dict[str, Any]:
        lineage = self._lineage or [(self.start_id, 0)]
        return {
            "version": RECORD_VERSION,
            "lineage": [[i, int(s)] for i, s in lineage],
            "settings": self.settings,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._parent = lineage_of({"callbacks": {type(self).__qualname__: state}})

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is None:  # a fresh start (init_from included)
            self._lineage = [(self.start_id, 0)]
            return
        parent = self._parent or [(UNRECORDED, 0)]
        self._lineage = [*parent, (self.start_id, int(trainer.global_step))]


def recorded_settings(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The settings a checkpoint's start recorded (``{}`` before the record existed)."""
    state = (checkpoint.get("callbacks") or {}).get(StartRecord.__qualname__) or {}
    return dict(state.get("settings") or {})


def lineage_of(checkpoint: dict[str, Any]) -> Lineage:
    """The lineage a checkpoint records (``[(UNRECORDED, 0)]`` when it records none)."""
    state = (checkpoint.get("callbacks") or {}).get(StartRecord.__qualname__) or {}
    found = state.get("lineage") or [[UNRECORDED, 0]]
    return [(str(i), int(s)) for i, s in found]


def written_by(lineage: Lineage, step: int) -> Lineage:
    """The lineage of this history's checkpoint at ``step``: the starts that began before it
    (the first start always; a resume's own checkpoints lie after the step it began at)."""
    k = 1
    while k < len(lineage) and lineage[k][1] < step:
        k += 1
    return lineage[:k]


@dataclass
class CheckpointStart:
    """A checkpoint file, its optimizer step and its lineage."""

    path: Path
    step: int
    lineage: Lineage


def read_history(files: Sequence[Path], option: str) -> list[CheckpointStart]:
    """Each file's step and lineage (memory-mapped: cheap), by step."""
    found = []
    for path in files:
        checkpoint = load_mapped(path, option)
        step = int(checkpoint.get("global_step", 0))
        found.append(CheckpointStart(path, step, lineage_of(checkpoint)))
    return sorted(found, key=lambda c: (c.step, c.path.name))


def _starts(history: Sequence[CheckpointStart]) -> str:
    """``start 1 (from step 0): a.ckpt, b.ckpt; start 2 (from step 4): c.ckpt``, by the start
    that wrote each file (the last of its lineage)."""
    groups: dict[tuple[str, int], list[str]] = {}
    for entry in history:
        groups.setdefault(entry.lineage[-1], []).append(entry.path.name)
    return "; ".join(
        f"start {n} (from step {begin}): {', '.join(names)}"
        for n, ((_, begin), names) in enumerate(groups.items(), 1)
    )


def check_one_history(run: Path, history: Sequence[CheckpointStart], option: str) -> None:
    """Refuse (one line naming the files) a run folder whose checkpoints (``history``, by step)
    are not one history: see the module doc."""
    fix = (
        "analyse one history: move the other start's files (and their .sha256) to a folder of "
        "their own (a .ckpt file can also be analysed alone)"
    )
    by_step: dict[int, list[CheckpointStart]] = {}
    for entry in history:
        if not entry.path.name.startswith(LAST_PREFIX):
            by_step.setdefault(entry.step, []).append(entry)
    for step, entries in by_step.items():
        lineages = {tuple(e.lineage) for e in entries}
        unrecorded = any(e.lineage[-1][0] == UNRECORDED for e in entries)
        if len(entries) > 1 and (len(lineages) > 1 or unrecorded):
            names = ", ".join(e.path.name for e in entries)
            raise UserError(
                f"{option}={run}: its checkpoints come from more than one start: {names} all "
                f"hold step {step} (a later start wrote it again, e.g. a resume in place from "
                f"an earlier checkpoint); {fix}."
            )
    for earlier, later in itertools.pairwise(history):
        if written_by(later.lineage, earlier.step) != earlier.lineage:
            raise UserError(
                f"{option}={run}: its checkpoints come from more than one start, not one "
                f"history ({earlier.path.name} at step {earlier.step} is not the history of "
                f"{later.path.name} at step {later.step}): {_starts(history)}; {fix}."
            )


def check_no_rewind(path: Path, step: int) -> None:
    """Refuse (one line) a resume in the run's own folder from ``path`` (at optimizer ``step``)
    when the folder holds a later checkpoint: the resumed start would write a second history
    beside the steps after ``step``. Files that cannot be read are left to the checks of their
    own use."""
    steps: dict[Path, int] = {}
    for candidate in sorted(path.parent.glob("*.ckpt")):
        try:
            steps[candidate] = int(load_mapped(candidate, "ckpt_path").get("global_step", 0))
        except UserError:
            continue
    newest = max(steps, key=lambda p: (steps[p], not p.name.startswith("last")), default=None)
    if newest is None or steps[newest] <= step:
        return
    lasts = [p for p in steps if p.name.startswith(LAST_PREFIX)]
    pick = max(lasts, key=lambda p: (p.stat().st_mtime, p.name), default=None)  # as `last`
    at_newest = pick is not None and steps[pick] == steps[newest]
    resume = "ckpt_path=last" if at_newest else f"ckpt_path={newest}"
    raise UserError(
        f"ckpt_path={path} is step {step} of this run, whose newest checkpoint is step "
        f"{steps[newest]} ({newest.name}): resuming it in the run's folder would write a "
        f"second history beside the steps after {step}. Continue the run with {resume}, or "
        f"train from step {step} in a new folder (leave hydra.run.dir and paths.run_dir "
        f"unset): ckpt_path={path} continues its history there, init_from={path} (instead of "
        f"ckpt_path) starts a new run from its weights."
    )
