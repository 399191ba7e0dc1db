"""How a start of a run begins, read once (:class:`RunStart`): a new run, a resume
(``ckpt_path``: the run's step, optimizer and data position) or a new run from a checkpoint's
weights (``init_from``), and the checks that may refuse a resume before it trains.

What a resume may change is :mod:`moe_emergence.runs.resume_settings`; which starts a run
folder's checkpoints went through, :mod:`moe_emergence.runs.history`.
"""

from __future__ import annotations

import csv
import io
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from moe_emergence.data.loader import check_loader_state
from moe_emergence.errors import UserError
from moe_emergence.files import write_atomic
from moe_emergence.runs.checkpoint import (
    CHECKPOINTS_DIR,
    Checkpoint,
    open_checkpoint,
    saved_loader_state,
)
from moe_emergence.runs.history import check_no_rewind
from moe_emergence.runs.resume_settings import check_resume_settings

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.csv"  # the CSV logger's, in <run>/csv/


@dataclass
class RunStart:
    """How this start of a run begins, read once before any data or model is built
    (:meth:`read`): ``resume_from`` (``ckpt_path``) or ``init_from``, each a verified, read
    checkpoint (at most one of them set), and ``run_dir``, this run's folder (``paths.run_dir``;
    None where it cannot be resolved). For a new run its checks and :meth:`resume` do nothing.
    """

    run_dir: Path | None = None
    resume_from: Checkpoint | None = None
    init_from: Checkpoint | None = None

    @classmethod
    def read(cls, cfg: DictConfig) -> RunStart:
        """The start ``cfg`` asks for (:func:`resolve_start`); a resume in the run's own folder
        from a checkpoint older than the folder's newest is refused (:func:`check_no_rewind`)."""
        run_dir = this_run_dir(cfg)
        resume, init = resolve_start(cfg, run_dir)  # each checkpoint is read once, here
        start = cls(Path(run_dir) if run_dir is not None else None, resume, init)
        if (
            resume is not None
            and start.run_dir is not None
            and resumes_in_place(resume, start.run_dir)
        ):
            check_no_rewind(resume.path, resume.step)
        return start

    def check_settings(self, cfg: DictConfig, vocab_size: int | None) -> None:
        """Before the model is built: refuse a resume whose training settings differ from the
        checkpoint's (:func:`check_resume_settings`; ``vocab_size``: the data's tokenizer's)."""
        if self.resume_from is not None:
            check_resume_settings(cfg, self.resume_from, vocab_size)

    def check_data(self, datamodule: Any, world_size: int) -> None:
        """Once the trainer exists: refuse a resume whose domains, world size or training data
        differ from the checkpoint's (:func:`check_resume_data`)."""
        if self.resume_from is not None:
            check_resume_data(datamodule, world_size, self.resume_from)

    def resume(self, trainer: Any) -> Path | None:
        """The checkpoint file for ``trainer.fit(ckpt_path=...)`` (None: a new run). A run
        resumed in its own folder (``trainer.default_root_dir``) continues its ``metrics.csv``
        (:func:`continue_csv_history`). The checkpoint's contents are let go: Lightning reads
        the file next."""
        resume, self.resume_from = self.resume_from, None
        if resume is None:
            return None
        in_place = resumes_in_place(resume, Path(trainer.default_root_dir))
        if in_place and (copy := continue_csv_history(trainer.logger, resume.step)) is not None:
            log.info(
                "Continuing %s from step %d (the earlier file: %s).", copy.parent, resume.step, copy
            )
        log.info("Resuming from %s", resume.path)
        return resume.path


def this_run_dir(cfg: DictConfig) -> str | None:
    """``paths.run_dir`` (this run's folder), or None where it cannot be resolved."""
    try:
        return OmegaConf.select(cfg, "paths.run_dir", default=None)
    except Exception:  # ${hydra:...} outside a Hydra app
        return None


def resolve_start(
    cfg: DictConfig, run_dir: str | None
) -> tuple[Checkpoint | None, Checkpoint | None]:
    """``(ckpt_path, init_from)`` as verified, read checkpoints (at most one of them set), or
    a one-line UserError; cheap (memory-mapped and hashed), before any data or model is built.
    A new run (no ``ckpt_path``) in ``run_dir`` (this run's folder: :func:`this_run_dir`) that
    holds checkpoints is refused."""
    ckpt, init = cfg.get("ckpt_path"), cfg.get("init_from")
    if ckpt is not None and init is not None:
        raise UserError(
            f"ckpt_path={ckpt} and init_from={init} are both set: ckpt_path resumes a run (its "
            f"step, optimizer, data position), init_from starts a new run from a checkpoint's "
            f"weights; pass only one."
        )
    if ckpt is not None:
        return open_checkpoint(str(ckpt), "ckpt_path", run_dir), None
    if run_dir is not None and any((Path(run_dir) / CHECKPOINTS_DIR).glob("*.ckpt")):
        raise UserError(
            f"paths.run_dir={run_dir} already holds a run's checkpoints: a new run goes to a new "
            f"folder (leave paths.run_dir and hydra.run.dir unset); to continue that run, add "
            f"ckpt_path=last."
        )
    if init is not None:
        return None, open_checkpoint(str(init), "init_from", run_dir)
    return None, None


def check_resume_data(datamodule: Any, world_size: int, start: Checkpoint) -> None:
    """Refuse a resume whose domains (names and order), world size or training data (token
    content, held-out split) differ from the checkpoint's, in this process (ahead of
    ddp_spawn's workers, whose errors would come back as tracebacks). Opens the token cache,
    as ``fit`` would next."""
    trained = (start.contents.get("hyper_parameters") or {}).get("domains")
    now = tuple(getattr(datamodule, "domains", ()))
    if trained is not None and now and tuple(trained) != now:
        raise UserError(
            f"ckpt_path={start.path} trained on the domains {', '.join(trained)} (in this "
            f"order); data.domain_set now gives {', '.join(now)}: resume with the run's domain "
            f"set, or start a new run from its weights with init_from={start.path}."
        )
    if hasattr(datamodule, "resume_identity"):
        state = saved_loader_state(start.contents)
        check_loader_state(state, datamodule.resume_identity(world_size), start.path)


# ---------------------------------------------------------------------- continuing in place


def resumes_in_place(start: Checkpoint, run_dir: Path) -> bool:
    """Whether ``start`` lies in ``run_dir``: the run continues in its own folder."""
    return run_dir.resolve() in start.path.resolve().parents


def continue_csv_history(logger: Any, step: int) -> Path | None:
    """Before a run resumed in place from optimizer step ``step`` logs anything: keep the rows of
    its ``metrics.csv`` logged before that step (the resumed run logs the later ones again) and
    a copy of the whole file as ``metrics.start<k>.csv`` (k numbers the earlier starts), so that
    Lightning's CSV writer, which empties the file when it opens, appends to the history
    instead. Router saturation's cells are not kept at any step: they read against the earlier
    start's last analysis, and the resumed run logs every analysis step's again at its end
    (:mod:`moe_emergence.analysis.logger_sink`). Rank zero only (the writer's rank); returns the
    copy, or None when nothing was kept."""
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.utilities import rank_zero_only

    from moe_emergence.analysis.logger_sink import is_saturation_key

    if not isinstance(logger, CSVLogger) or rank_zero_only.rank != 0:
        return None
    path = Path(logger.log_dir) / METRICS_FILE
    if not path.is_file():
        return None
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = [row for row in reader if row.get("step") and int(float(row["step"])) < step]
    for row in rows:
        for key in filter(is_saturation_key, row):
            row[key] = ""
    rows = [row for row in rows if any(v for k, v in row.items() if k != "step")]
    starts = len(list(path.parent.glob("metrics.start*.csv")))
    copy = path.with_name(f"metrics.start{starts + 1}.csv")
    shutil.copy2(path, copy)
    writer = logger.experiment  # Lightning's writer: it removes the old file as it opens
    text = io.StringIO()
    table = csv.DictWriter(text, fieldnames=header, lineterminator="\n")
    table.writeheader()
    table.writerows(rows)
    write_atomic(path, text.getvalue())
    writer.metrics_keys = sorted(header)  # it appends under this header (rewrites on new keys)
    return copy
