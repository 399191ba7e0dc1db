"""A run folder and its record: where its checkpoints are, which one ``ckpt_path`` / ``init_from``
names, whether a resume may continue it, its ``summary.json`` (:class:`RunSummary`), which runs
``analyze`` finds, and what a run's ``.hydra/`` files record (its condition, its seed, its
probe settings).

A run folder (``outputs/runs/<date>/<time>``, or a sweep job's folder) holds ``.hydra/``
(``config.yaml``, ``overrides.yaml``, ``hydra.yaml``), ``checkpoints/`` (``step*.ckpt``,
``last.ckpt``, each with a ``.sha256`` sidecar), ``csv/``, ``routing/``, ``data_report.json`` and
``summary.json``. The checkpoint file format itself is :mod:`moe_emergence.checkpoints`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf

from moe_emergence.checkpoints import load_mapped, verify_sidecar
from moe_emergence.data.loader import check_loader_state
from moe_emergence.errors import UserError, report_user_errors
from moe_emergence.files import write_atomic
from moe_emergence.history import CheckpointStart, check_one_history, read_history
from moe_emergence.versions import library_versions

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LAST_PATTERN = "last*.ckpt"  # last.ckpt, and last-v1.ckpt when Lightning versions it
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.csv"  # the CSV logger's, in <run>/csv/
HYDRA_CONFIG = Path(".hydra") / "config.yaml"
HYDRA_OVERRIDES = Path(".hydra") / "overrides.yaml"
HYDRA_SETTINGS = Path(".hydra") / "hydra.yaml"
EXCLUDE_KEYS = "hydra.job.config.override_dirname.exclude_keys"
# A run's condition is its overrides without its seed, without the keys its sweep folder names
# leave out (``hydra.job.config.override_dirname.exclude_keys`` in conf/config.yaml: places and
# display settings, never what is trained) and without these prefixes.
NOT_CONDITION_PREFIXES = ("paths.", "hydra.", "callbacks.progress_bar", "logger")


# ---------------------------------------------------------------------- checkpoints of a run


@dataclass
class Checkpoint:
    """A verified checkpoint file and its contents (tensors memory-mapped), read once."""

    path: Path
    contents: dict[str, Any]


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


# ---------------------------------------------------------------------- starting a run


def this_run_dir(cfg: DictConfig) -> str | None:
    """``paths.run_dir`` (this run's folder), or None where it cannot be resolved."""
    try:
        return OmegaConf.select(cfg, "paths.run_dir", default=None)
    except Exception:  # ${hydra:...} outside a Hydra app
        return None


def resolve_start(cfg: DictConfig) -> tuple[Checkpoint | None, Checkpoint | None]:
    """``(ckpt_path, init_from)`` as verified, read checkpoints (at most one of them set), or
    a one-line UserError; cheap (memory-mapped and hashed), before any data or model is built.
    A new run (no ``ckpt_path``) in a folder that holds checkpoints is refused."""
    ckpt, init = cfg.get("ckpt_path"), cfg.get("init_from")
    if ckpt is not None and init is not None:
        raise UserError(
            f"ckpt_path={ckpt} and init_from={init} are both set: ckpt_path resumes a run (its "
            f"step, optimizer, data position), init_from starts a new run from a checkpoint's "
            f"weights; pass only one."
        )
    run_dir = this_run_dir(cfg)
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


def plain(value: Any) -> Any:
    """A config value as plain Python (resolved); other values as they are."""
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def saved_loader_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The train loader's state in a Lightning checkpoint (``{}`` when it has none)."""
    fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
    return dict((fit_loop.get("state_dict", {}).get("combined_loader") or [{}])[0])


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


RECORD_FILES = (HYDRA_CONFIG.name, HYDRA_OVERRIDES.name, HYDRA_SETTINGS.name)


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


# ---------------------------------------------------------------------- the run's summary


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
            "moe_dispatch": getattr(pl_module, "dispatch", None),
            "final_metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "library_versions": library_versions(),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(summary, indent=2))


# ---------------------------------------------------------------------- runs for analyze


@dataclass
class RunCheckpoints:
    """A run to analyse: its folder (None for a lone checkpoint file), its name within the
    analysis and its checkpoint files, one per optimizer step, oldest first (see
    :func:`checkpoint_steps`)."""

    name: str
    run_dir: Path | None
    checkpoints: list[Path]


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
    same step (``history``: :func:`moe_emergence.history.read_history`)."""
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


# ---------------------------------------------------------------------- a run's record


def read_record(file: Path) -> Any:
    """A YAML file of a run's record as plain data, or a one-line UserError naming it when it
    is damaged."""
    try:
        return yaml.safe_load(file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(
            f"{file} is damaged ({reason}): restore it from a copy of the run, or move the "
            f"run's .hydra folder away to analyse its checkpoints without it."
        ) from None


def recorded_config(run_dir: Path | None) -> DictConfig | None:
    """The run's composed config (``.hydra/config.yaml``, unresolved), or None."""
    file = run_dir / HYDRA_CONFIG if run_dir is not None else None
    if file is None or not file.is_file():
        return None
    found = read_record(file)
    if not isinstance(found, dict):
        raise UserError(f"{file} is damaged (not a mapping): restore it from a copy of the run.")
    return OmegaConf.create(found)


def _not_condition_keys(run_dir: Path) -> set[str]:
    """The keys a sweep folder's name leaves out, as the run recorded them (and as
    conf/config.yaml says now, for runs recorded with fewer), plus ``seed``."""
    keys = {"seed"}
    files = [run_dir / HYDRA_SETTINGS]
    try:
        from moe_emergence.config import CONFIG_NAME, config_dir

        files.append(config_dir() / f"{CONFIG_NAME}.yaml")
    except FileNotFoundError:  # installed without conf/: the run's record alone
        pass
    for file in files:
        if file.is_file():
            record = read_record(file)
            record = OmegaConf.create(record) if isinstance(record, dict) else None
            found = OmegaConf.select(record, EXCLUDE_KEYS, default=None) if record else None
            keys |= set(found or ())
    return keys


def split_override(item: str) -> tuple[str, str]:
    """``"+data.size_mb=5"`` -> ``("data.size_mb", "5")``: the key without Hydra's ``+``/``~``
    prefixes, and the value."""
    key, _, value = str(item).partition("=")
    return key.lstrip("+~"), value


def run_overrides(run_dir: Path | None) -> tuple[list[str], int | None]:
    """The run's condition overrides (sorted ``key=value``: see :data:`NOT_CONDITION_PREFIXES`)
    and its ``seed=`` override (None when not overridden); a one-line UserError naming the file
    when that seed is not an integer."""
    file = run_dir / HYDRA_OVERRIDES if run_dir is not None else None
    if file is None or not file.is_file():
        return [], None
    not_condition = _not_condition_keys(run_dir)
    kept, seed = [], None
    for item in read_record(file) or []:
        bare, value = split_override(item)
        if bare == "seed":
            try:
                seed = int(value)
            except ValueError:
                raise UserError(
                    f"{file} says seed={value!r}, not an integer: restore the run's record (the "
                    f"seed it trained with), or move its .hydra folder away to analyse its "
                    f"checkpoints without it."
                ) from None
        elif bare not in not_condition and not bare.startswith(NOT_CONDITION_PREFIXES):
            kept.append(str(item))
    return sorted(kept), seed
