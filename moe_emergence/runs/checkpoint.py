"""Which checkpoint ``ckpt_path`` / ``init_from`` names: a ``.ckpt`` file, a run dir (its newest
``checkpoints/last*.ckpt``) or ``last``, verified against its ``.sha256`` sidecar and read once
(memory-mapped). The file format itself is :mod:`moe_emergence.checkpoints`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_emergence.checkpoints import load_mapped, verify_sidecar
from moe_emergence.errors import UserError

CHECKPOINTS_DIR = "checkpoints"
LAST_PATTERN = "last*.ckpt"  # last.ckpt, and last-v1.ckpt when Lightning versions it


@dataclass
class Checkpoint:
    """A verified checkpoint file and its contents (tensors memory-mapped), read once."""

    path: Path
    contents: dict[str, Any]

    @property
    def step(self) -> int:
        """The optimizer step it was saved at."""
        return int(self.contents.get("global_step", 0))


def _newest_last(folder: Path) -> Path | None:
    found = [p for p in folder.glob(LAST_PATTERN) if p.is_file()]
    return max(found, key=lambda p: (p.stat().st_mtime, p.name)) if found else None


def last_of_run(run_dir: Path) -> Path | None:
    """The newest ``last*.ckpt`` in ``<run_dir>/checkpoints/`` (or in ``run_dir`` itself)."""
    for folder in (run_dir / CHECKPOINTS_DIR, run_dir):
        if folder.is_dir() and (found := _newest_last(folder)) is not None:
            return found
    return None


def open_checkpoint(
    value: str | os.PathLike, option: str, run_dir: str | os.PathLike | None = None
) -> Checkpoint:
    """The checkpoint that ``option=value`` names, verified and read (memory-mapped, once);
    else a one-line UserError.

    ``value``: a ``.ckpt`` file; a run dir (its newest ``checkpoints/last*.ckpt``); or ``last``:
    the newest ``last*.ckpt`` of ``run_dir`` (this run's folder, e.g. set with
    ``hydra.run.dir=<old run>`` to continue a run in place). Checks, in this order: it
    exists, is a non-empty file, loads as a Lightning checkpoint (``ckpt_path`` also needs
    the training state), and matches its ``.sha256`` sidecar.
    """
    text = os.fspath(value).strip()
    if not text:
        raise UserError(f"{option} is empty: pass a checkpoint file or a run dir, or null.")
    if text == "last":
        if run_dir is None:
            raise UserError(f"{option}=last needs a run dir: pass {option}=<run dir> instead.")
        found = last_of_run(Path(run_dir))
        if found is None and option == "init_from":  # a new run's folder holds no checkpoints
            raise UserError(
                f"init_from=last: no {CHECKPOINTS_DIR}/last.ckpt in this run's folder {run_dir} "
                f"(a new run's, and init_from starts a new run in a new folder); name the run "
                f"to start from: init_from=<run dir> (or a .ckpt file)."
            )
        if found is None:
            raise UserError(
                f"{option}=last: no {CHECKPOINTS_DIR}/last.ckpt in this run's folder {run_dir}; "
                f"name the run to resume: {option}=<run dir> (or hydra.run.dir=<run dir> "
                f"{option}=last to continue in that folder)."
            )
        path = found
    else:
        path = Path(text).expanduser()
        if not path.exists():
            raise UserError(f"{option}={path} does not exist: pass a .ckpt file or a run dir.")
        if path.is_dir():
            found = last_of_run(path)
            if found is None:
                raise UserError(
                    f"{option}={path} is a folder without {CHECKPOINTS_DIR}/last.ckpt: pass a "
                    f".ckpt file or a run dir that has one."
                )
            path = found
    if not path.is_file():
        raise UserError(f"{option}={path} is not a regular file: pass a .ckpt file.")
    if path.stat().st_size == 0:
        raise UserError(f"{option}={path} is empty (0 bytes): pass another checkpoint of the run.")
    contents = load_mapped(path, option)
    if option == "ckpt_path" and not {"loops", "optimizer_states"} <= contents.keys():
        raise UserError(
            f"ckpt_path={path} holds weights only (no training state to resume): start a new "
            f"run from it with init_from={path} (and ckpt_path=null; it gets a new run folder)."
        )
    verify_sidecar(path, option)
    return Checkpoint(path, contents)


def resolve_checkpoint(
    value: str | os.PathLike, option: str, run_dir: str | os.PathLike | None = None
) -> Path:
    """The verified checkpoint file that ``option=value`` names (see :func:`open_checkpoint`)."""
    return open_checkpoint(value, option, run_dir).path


def saved_loader_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The train loader's state in a Lightning checkpoint (``{}`` when it has none)."""
    fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
    return dict((fit_loop.get("state_dict", {}).get("combined_loader") or [{}])[0])
