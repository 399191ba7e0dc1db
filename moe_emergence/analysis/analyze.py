"""``python -m moe_emergence.analyze PATH [--out DIR]``: turn runs and seed sweeps into findings.

PATH is a run dir, a multirun dir (every run dir below it) or one ``.ckpt`` file; several PATHs
(sweeps of one study run in several sittings) are analysed as one study into ``--out``. For every
run, every saved checkpoint is routed and scored in eval mode on the run's own probe, with the
per-domain held-out loss (:mod:`moe_emergence.analysis.evaluate`); runs are grouped by their
overrides without ``seed``, and each group's mean and 95% interval over seeds
(:mod:`moe_emergence.analysis.summary`) are written by
:mod:`moe_emergence.analysis.summary_files`. Output (default ``PATH/analysis``, or the
checkpoint's folder's ``analysis``)::

    summary.csv, summary.json, summary.md      one row per group x layer x metric
    emergence.png, heatmaps.png, saturation.png, held_out_loss.png
                                               the sweep's figures (sweep_plots.py);
                                               saturation.png: router saturation over
                                               steps per condition, mean over seeds
    runs/<run>/trajectory.csv, counts.csv      every checkpoint (columns of tables.py)
    runs/<run>/losses.csv                      step, domain, loss, perplexity, tokens
    runs/<run>/token_types.txt                 code tokens by Python category x expert
    runs/<run>/knockout.csv                    final checkpoint: a domain's expert removed
    runs/<run>/specialisation.csv, repetition.csv, relative_load.csv, coactivation.csv,
               expert_tokens.csv, expert_tokens.md, saturation.png
                                               the field's specialisation metrics (tables.py)
    runs/<run>/data_report.json                the rebuilt data's report
    runs/<run>/result.json.xz                  the run's whole analysis (result_files.py):
                                               a later analyze reads it as a PATH

``--model MODEL`` (instead of PATH) measures a Hugging Face MoE on a domain set the same way
(:mod:`moe_emergence.analysis.external`).
"""

from __future__ import annotations

import argparse
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moe_emergence.analysis.arguments import OPTION, data_overrides_of
from moe_emergence.analysis.arguments import parse_analyze_args as parse_args
from moe_emergence.analysis.evaluate import evaluate_run
from moe_emergence.analysis.external import run_model
from moe_emergence.analysis.knockout import COLUMNS as KNOCKOUT
from moe_emergence.analysis.knockout import KNOCKOUT_FILE, knockout_rows
from moe_emergence.analysis.plots import saturation_figure, save_figure
from moe_emergence.analysis.result_files import (
    RESULT_FILE,
    analysis_code,
    read_result,
    write_result,
)
from moe_emergence.analysis.results import RunResult, group_of
from moe_emergence.analysis.summary_files import write_summary
from moe_emergence.analysis.tables import (
    COUNTS,
    LOSSES,
    SPECIALISATION,
    TRAJECTORY,
    routing_rows,
    specialisation_rows,
    token_lists_markdown,
    write_specialisation_tables,
    write_table,
)
from moe_emergence.analysis.token_types import format_type_table
from moe_emergence.errors import UserError, report_user_errors
from moe_emergence.files import locked, write_atomic
from moe_emergence.runs.find import RunCheckpoints, find_runs, verify_checkpoints

RUNS_DIR = "runs"
LOCK_FILE = ".analyze.lock"  # held while an analysis writes into its --out folder


def default_out(path: Path) -> Path:
    return (path.parent if path.is_file() else path) / "analysis"


def check_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name!r} is not a torch device: pass cpu or cuda.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here; pass --device cpu.")
    return device


def run_names(runs: Sequence[RunCheckpoints]) -> list[str]:
    """Folder-safe names of the runs (``/`` of nested sweeps becomes ``__``)."""
    return [run.name.replace("/", "__") for run in runs]


def write_run_tables(result: RunResult, folder: Path) -> None:
    """The per-run tables: trajectory, counts and losses of every checkpoint, and the final
    checkpoint's code token-type tables and knock-out readings."""
    trajectory, counts, losses = [], [], []
    for checkpoint in result.checkpoints:
        step_counts, step_trajectory = routing_rows(
            checkpoint.step, result.probe, result.domains, checkpoint.counts, checkpoint.scores
        )
        counts += step_counts
        trajectory += step_trajectory
        for domain, loss in checkpoint.losses.items():
            losses.append(
                {
                    "step": checkpoint.step,
                    "domain": domain,
                    "loss": loss.loss,
                    "perplexity": loss.perplexity,
                    "tokens": loss.tokens,
                }
            )
    if result.moe:
        write_table(folder / "trajectory.csv", TRAJECTORY, trajectory)
        write_table(folder / "counts.csv", COUNTS, counts)
    if losses:
        write_table(folder / "losses.csv", LOSSES, losses)
    if result.knockout:
        rows = knockout_rows(result.final.step, result.knockout)
        write_table(folder / KNOCKOUT_FILE, KNOCKOUT, rows)
    types = result.final.token_types
    if types:
        text = [
            f"Code tokens of the probe by Python token type x expert, eval mode, step "
            f"{result.final.step} ({result.name})"
        ]
        text += [format_type_table(table, f"\nlayer {layer}:") for layer, table in types.items()]
        write_atomic(folder / "token_types.txt", "\n".join(text) + "\n")


def write_specialisation(result: RunResult, folder: Path) -> None:
    """The per-run tables and figure of the field's specialisation metrics (every checkpoint;
    co-activation pairs and token lists of the final one)."""
    if not result.moe or not result.final.specialisation:
        return
    scalars, repeats, loads = [], [], []
    for c in result.checkpoints:
        rows = specialisation_rows(c.step, result.probe, result.domains, c.counts, c.specialisation)
        scalars, repeats, loads = scalars + rows[0], repeats + rows[1], loads + rows[2]
    write_table(folder / "specialisation.csv", SPECIALISATION, scalars)
    final = result.final
    token_rows = write_specialisation_tables(
        folder, repeats, loads, final.specialisation, final.expert_tokens
    )
    write_atomic(folder / "expert_tokens.md", expert_tokens_markdown(result, token_rows))
    nmi = {
        layer: [(c.step, c.scores[layer]) for c in result.checkpoints if layer in c.scores]
        for layer in result.layers
    }
    saturation = {
        layer: [
            (c.step, c.specialisation[layer])
            for c in result.checkpoints
            if layer in c.specialisation
        ]
        for layer in result.layers
    }
    title = (
        f"router saturation beside the NMI, eval mode, probe {result.probe} (seed {result.seed})"
    )
    fig = saturation_figure(nmi, saturation, title)
    save_figure(fig, folder / "saturation.png")


def expert_tokens_markdown(result: RunResult, rows: Sequence[dict]) -> str:
    """Each expert's over-represented tokens (found on one half of the probe's documents; a
    check mark where the other half confirms it), one table per layer."""
    title = f"# Per-expert token lists, step {result.final.step} ({result.name})"
    return token_lists_markdown(title, result.layers, result.n_experts, rows)


@dataclass(frozen=True)
class ReusedRun:
    """A run an earlier analysis measured: its result, its folder there (``runs/<run>``) and
    the analysis code that measured it (:func:`.result_files.analysis_code`)."""

    result: RunResult
    folder: Path
    code: str


@dataclass
class Study:
    """What one ``analyze`` call summarises: runs to measure from their checkpoints, runs to
    reuse from earlier analyses, and notes on runs skipped."""

    runs: list[RunCheckpoints] = field(default_factory=list)
    reused: list[ReusedRun] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def is_analysis(path: Path) -> bool:
    """Whether ``path`` is an ``analyze`` output folder (it holds ``summary.json`` and
    ``runs/``; a run dir holds a ``summary.json`` of its training, but no ``runs/``)."""
    return (path / "summary.json").is_file() and (path / RUNS_DIR).is_dir()


def reused_runs(path: Path) -> list[ReusedRun]:
    """The runs of the analysis folder ``path``, read from ``runs/*/result.json.xz``; a
    one-line :class:`UserError` when it holds none (written before results were kept)."""
    files = sorted((path / RUNS_DIR).glob(f"*/{RESULT_FILE}"))
    if not files:
        raise UserError(
            f"{OPTION}={path} is an analysis without run results ({RUNS_DIR}/<run>/{RESULT_FILE}; "
            "analyses before they were kept have none): pass the runs' own folders."
        )
    reused = []
    for file in files:
        result, code = read_result(file, f"{OPTION}={path}")
        reused.append(ReusedRun(result, file.parent, code))
    return reused


def study_runs(paths: Sequence[Path]) -> Study:
    """The runs of every path, as one study: with several paths, each run measured here has a
    name that starts with its path's folder name (``primary/3``); a reused run keeps the name
    its analysis gave it. A condition (overrides but the seed) with one seed in two runs, and
    two runs of one name, are refused before any work, naming both."""
    study = Study()
    measured = [p for p in paths if not is_analysis(p)]
    if len(paths) == 1 and measured:
        study.runs, study.notes = find_runs(paths[0], OPTION)
        for run_ in study.runs:  # a damaged record is refused now, not after the work
            _condition_key(run_)
        return study
    labels = [p.name or str(p) for p in measured]
    if len(set(labels)) < len(labels):
        raise UserError(
            f"{OPTION}: the folders {', '.join(map(str, measured))} share a name; their runs "
            "would share names: pass folders with distinct names."
        )
    for path in paths:
        if is_analysis(path):
            study.reused += reused_runs(path)
            continue
        found, skipped = find_runs(path, OPTION)
        label = path.name or str(path)
        study.runs += [replace(r, name=f"{label}/{r.name}") for r in found]
        study.notes += [f"{label}/{note}" for note in skipped]
    keys = [(r.name, _condition_key(r)) for r in study.runs]
    keys += [(r.result.name, (r.result.group, r.result.seed)) for r in study.reused]
    names: set[str] = set()
    seen: dict[tuple[str, int | None], str] = {}
    for name, key in keys:
        if name in names:
            raise UserError(
                f"{OPTION}: two runs are named {name}: one study names a run once; leave one of "
                "the folders out."
            )
        names.add(name)
        if key in seen:
            raise UserError(
                f"{OPTION}: runs {seen[key]} and {name} are the same condition ({key[0]}) with "
                f"the same seed ({key[1]}): one study holds a seed once per condition; leave one "
                "of the folders out."
            )
        seen[key] = name
    return study


def _condition_key(run_: RunCheckpoints) -> tuple[str, int | None]:
    """(group, seed) of a run to measure, as its :class:`RunResult` will say them."""
    return group_of(run_.record.overrides), run_.record.seed


def check_no_other_runs(study: Study, out: Path) -> None:
    """Refuse (one line, before any work) an ``out`` whose ``runs/`` holds folders of runs that
    are not in ``study``: its summary would leave them out while its run folders keep them."""
    found = out / RUNS_DIR
    if not found.is_dir():
        return
    mine = set(run_names(study.runs)) | {r.folder.name for r in study.reused}
    other = sorted(p.name for p in found.iterdir() if p.is_dir() and p.name not in mine)
    if other:
        shown = ", ".join(other[:3]) + (", ..." if len(other) > 3 else "")
        raise UserError(
            f"--out {out} holds {len(other)} run(s) of another analysis that are not in this "
            f"study ({RUNS_DIR}/{shown}): its summary would leave them out; pass a new --out, or "
            f"pass {out} as a {OPTION} too, so that its runs join this study."
        )


def run(args: argparse.Namespace) -> str:
    """Do the work of one ``analyze`` call; return what to print."""
    if args.model is not None:
        return run_model(args)
    device = check_device(args.device or "cpu")
    paths = [Path(p).expanduser() for p in args.path]
    if len(paths) > 1 and not args.out:
        raise UserError(f"{len(paths)} PATHs: pass --out, the folder of their one analysis.")
    if not args.out and is_analysis(paths[0]):
        raise UserError(
            f"{OPTION}={paths[0]} is an analysis: pass --out, the folder of the new one (it may "
            "be that analysis itself, to write it again)."
        )
    study = study_runs(paths)
    out = Path(args.out).expanduser() if args.out else default_out(paths[0])
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: pass a folder (new or an earlier analysis's).")
    check_no_other_runs(study, out)
    verify_checkpoints(study.runs, OPTION)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UserError(f"--out {out} cannot be made ({reason}): pass a writable folder.") from None
    # One analysis at a time writes into a folder; a second one waits for the first.
    with locked(out / LOCK_FILE, "another analysis writing into this folder"):
        return _analyse(args, study, out, device)


def _analyse(args: argparse.Namespace, study: Study, out: Path, device: torch.device) -> str:
    runs = study.runs
    total = sum(len(r.checkpoints) for r in runs)
    results = []
    with tqdm(total=total, desc="checkpoints", unit="ckpt", disable=args.no_progress) as bar:
        for run_, name in zip(runs, run_names(runs), strict=True):
            bar.set_postfix_str(name[-40:])
            folder = out / RUNS_DIR / name
            folder.mkdir(parents=True, exist_ok=True)
            result = evaluate_run(
                run_,
                folder,
                device,
                on_checkpoint=lambda: bar.update(1),
                data_overrides=data_overrides_of(args),
                knockout=not args.no_knockout,
            )
            write_run_tables(result, folder)
            write_specialisation(result, folder)
            write_result(result, folder)
            results.append(result)
    results += [_take_over(reused, out) for reused in study.reused]
    written = write_summary(results, out)
    lines = [*study.notes, *reused_notes(study.reused), *written.warnings]
    dispatches = Counter(r.dispatch for r in results if r.dispatch is not None)
    if dispatches:
        used = [f"{path} ({n} run{'s' if n > 1 else ''})" for path, n in sorted(dispatches.items())]
        lines.append("MoE dispatch at training: " + ", ".join(used))
    lines += [f"{len(results)} run(s), {total} checkpoint(s) measured; written to {out}:"]
    paths = [written.csv, written.json, written.markdown, *written.figures]
    lines += [f"  {p.relative_to(out)}" for p in paths] + [f"  {RUNS_DIR}/<run>/ (per run)"]
    summary_md = out / "summary.md"
    if summary_md.is_file():
        lines += ["", summary_md.read_text().rstrip()]
    return "\n".join(lines)


def _take_over(reused: ReusedRun, out: Path) -> RunResult:
    """The reused run's result; its folder of tables copied into ``out/runs`` as its analysis
    wrote it (unless ``out`` is that analysis)."""
    folder = out / RUNS_DIR / reused.folder.name
    if folder.resolve() != reused.folder.resolve():
        shutil.copytree(reused.folder, folder, dirs_exist_ok=True)
    return reused.result


def reused_notes(reused: Sequence[ReusedRun]) -> list[str]:
    """What to say of the reused runs: how many, and those measured by other analysis code."""
    if not reused:
        return []
    lines = [f"{len(reused)} run(s) reused from earlier analyses ({RUNS_DIR}/<run>/{RESULT_FILE})"]
    other = [r.result.name for r in reused if r.code != analysis_code()]
    if other:
        lines.append(
            f"{len(other)} of them measured by other analysis code than this one's (their "
            f"numbers are that code's; analyse them from their checkpoints to re-measure): "
            + ", ".join(other)
        )
    return lines


def main(argv: Sequence[str] | None = None, parsed: argparse.Namespace | None = None) -> int:
    """Entry point of ``python -m moe_emergence.analyze``: ``argv`` parsed, or arguments
    already ``parsed`` (by :mod:`.arguments`, before torch loads); returns the exit status
    (:func:`report_user_errors`)."""
    args = parsed if parsed is not None else parse_args(argv)
    return report_user_errors(lambda: print(run(args)))
