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

``--model MODEL`` (instead of PATH) measures a Hugging Face MoE on a domain set the same way
(:mod:`moe_emergence.analysis.external`).
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moe_emergence.analysis.evaluate import OPTION, data_overrides_of, evaluate_run
from moe_emergence.analysis.external import add_model_arguments, model_only_flags, run_model
from moe_emergence.analysis.knockout import COLUMNS as KNOCKOUT
from moe_emergence.analysis.knockout import KNOCKOUT_FILE, knockout_rows
from moe_emergence.analysis.plots import saturation_figure, save_figure
from moe_emergence.analysis.results import RunResult
from moe_emergence.analysis.summary_files import write_summary
from moe_emergence.analysis.tables import (
    COACTIVATION,
    COUNTS,
    EXPERT_TOKENS,
    LOSSES,
    RELATIVE_LOAD,
    REPETITION,
    SPECIALISATION,
    TRAJECTORY,
    coactivation_rows,
    expert_token_rows,
    routing_rows,
    specialisation_rows,
    token_lists_markdown,
    write_table,
)
from moe_emergence.analysis.token_types import format_type_table
from moe_emergence.data.files import locked
from moe_emergence.errors import UserError, report_user_errors
from moe_emergence.files import write_atomic
from moe_emergence.runs import RunCheckpoints, find_runs, run_overrides, verify_checkpoints

RUNS_DIR = "runs"
LOCK_FILE = ".analyze.lock"  # held while an analysis writes into its --out folder


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m moe_emergence.analyze",
        description="Route and score every checkpoint of a run or a seed sweep in eval mode; "
        "summarise each condition over seeds with 95% intervals.",
    )
    parser.add_argument(
        "path",
        metavar=OPTION,
        nargs="*",
        help="a run dir, a multirun dir or a .ckpt file; several: one study (e.g. sweeps run in "
        "several sittings; the same condition and seed twice is refused; --out required)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output folder (default: PATH/analysis; --model: outputs/hf_analysis/<model>__<set>)",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="torch device for the forwards (PATH: cpu; --model: cuda where there is one, else "
        "cpu, or auto: spread over the GPUs by accelerate)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--no-knockout",
        action="store_true",
        help="skip the knock-out by domain (final checkpoint, held-out set: 1 + layers x "
        "min(2 x domains, experts) passes of the held-out set per MoE run)",
    )
    for flag, what in (
        ("--hub-mirror", "the Hub mirror folder"),
        ("--cache-dir", "the token cache root"),
        ("--tokenizer", "the tokenizer (Hub name, folder or sample_bpe)"),
    ):
        parser.add_argument(
            flag,
            default=None,
            help=f"{what} to rebuild the runs' data from (default: each run's recorded one); "
            "the data must be the runs' own (their checkpoints' data fingerprint)"
            + ("; null: none (a warm token cache, offline)" if flag == "--hub-mirror" else "")
            + ("; --model: in place of the model's own" if flag == "--tokenizer" else ""),
        )
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    if args.model is not None and args.path:
        parser.error(f"{OPTION} and --model exclude each other: pass one.")
    if args.model is None:
        if not args.path:
            parser.error(f"pass {OPTION} (a run, a sweep or a checkpoint) or --model.")
        given = [f for f, v in model_only_flags(args).items() if v not in (None, False)]
        if given:
            parser.error(f"{', '.join(given)} only go with --model.")
    return args


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
    write_table(folder / "repetition.csv", REPETITION, repeats)
    write_table(folder / "relative_load.csv", RELATIVE_LOAD, loads)
    write_table(
        folder / "coactivation.csv", COACTIVATION, coactivation_rows(result.final.specialisation)
    )
    token_rows = expert_token_rows(result.final.expert_tokens)
    write_table(folder / "expert_tokens.csv", EXPERT_TOKENS, token_rows)
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


def study_runs(paths: Sequence[Path]) -> tuple[list[RunCheckpoints], list[str]]:
    """The runs of every path, as one study: with several paths, each run's name starts with its
    path's folder name (``primary/3``); a condition (overrides but the seed) with one seed in
    two runs is refused before any work, naming both."""
    if len(paths) == 1:
        return find_runs(paths[0], OPTION)
    labels = [p.name or str(p) for p in paths]
    if len(set(labels)) < len(labels):
        raise UserError(
            f"{OPTION}: the folders {', '.join(map(str, paths))} share a name; their runs would "
            "share names: pass folders with distinct names."
        )
    runs, notes = [], []
    for path, label in zip(paths, labels, strict=True):
        found, skipped = find_runs(path, OPTION)
        runs += [replace(r, name=f"{label}/{r.name}") for r in found]
        notes += [f"{label}/{note}" for note in skipped]
    seen: dict[tuple[str, int | None], str] = {}
    for run_ in runs:
        overrides, seed = run_overrides(run_.run_dir)
        key = (",".join(overrides), seed)
        if key in seen:
            raise UserError(
                f"{OPTION}: runs {seen[key]} and {run_.name} are the same condition "
                f"({key[0] or 'no overrides'}) with the same seed ({seed}): one study holds a "
                "seed once per condition; leave one of the folders out."
            )
        seen[key] = run_.name
    return runs, notes


def run(args: argparse.Namespace) -> str:
    """Do the work of one ``analyze`` call; return what to print."""
    if args.model is not None:
        return run_model(args)
    device = check_device(args.device or "cpu")
    paths = [Path(p).expanduser() for p in args.path]
    if len(paths) > 1 and not args.out:
        raise UserError(f"{len(paths)} PATHs: pass --out, the folder of their one analysis.")
    runs, notes = study_runs(paths)
    verify_checkpoints(runs, OPTION)
    out = Path(args.out).expanduser() if args.out else default_out(paths[0])
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: pass a folder (new or an earlier analysis's).")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UserError(f"--out {out} cannot be made ({reason}): pass a writable folder.") from None
    # One analysis at a time writes into a folder; a second one waits for the first.
    with locked(out / LOCK_FILE, "another analysis writing into this folder"):
        return _analyse(args, runs, notes, out, device)


def _analyse(
    args: argparse.Namespace,
    runs: Sequence[RunCheckpoints],
    notes: list[str],
    out: Path,
    device: torch.device,
) -> str:
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
            results.append(result)
    written = write_summary(results, out)
    lines = [*notes, *written.warnings]
    dispatches = Counter(r.dispatch for r in results if r.dispatch is not None)
    if dispatches:
        used = [f"{path} ({n} run{'s' if n > 1 else ''})" for path, n in sorted(dispatches.items())]
        lines.append("MoE dispatch at training: " + ", ".join(used))
    lines += [f"{len(results)} run(s), {total} checkpoint(s); written to {out}:"]
    paths = [written.csv, written.json, written.markdown, *written.figures]
    lines += [f"  {p.relative_to(out)}" for p in paths] + [f"  {RUNS_DIR}/<run>/ (per run)"]
    summary_md = out / "summary.md"
    if summary_md.is_file():
        lines += ["", summary_md.read_text().rstrip()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m moe_emergence.analyze``; returns the exit status
    (:func:`report_user_errors`)."""
    args = parse_args(argv)
    return report_user_errors(lambda: print(run(args)))
