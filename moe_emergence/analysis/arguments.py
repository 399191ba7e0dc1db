"""The command lines of ``python -m moe_emergence.analyze`` and ``python -m
moe_emergence.inspect``: their parsers alone, importing neither torch nor the models, so that
``--help`` and a usage error answer at once (the entry points parse before they load the rest).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from moe_emergence.analysis.settings import ProbeSettings

OPTION = "PATH"  # analyze's positional argument, as errors name it
INSPECT_OPTION = "CKPT"  # inspect's
NO_LISTS = "--no-token-lists"
DEFAULT_SET = "code_math_prose"  # analyze --model's domain set


# Defaults of the --model flags (None on the parser, so that PATH mode can refuse them).
DEFAULTS: dict[str, Any] = {
    "domain_set": DEFAULT_SET,
    "size_mb": 10.0,
    "block_size": 512,
    "batch_size": 8,
    "permutations": ProbeSettings().null_permutations,
}
MODEL_ONLY = (
    "domain_set",
    "dtype",
    "max_tokens",
    "trust_remote_code",
    "size_mb",
    "block_size",
    "batch_size",
    "permutations",
    "save_routing",
)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the ``--model`` mode (``--device``, ``--out``, ``--tokenizer``,
    ``--hub-mirror``, ``--cache-dir``, ``--no-progress`` are shared with PATH mode)."""
    group = parser.add_argument_group("a Hugging Face MoE instead of PATH")
    group.add_argument(
        "--model",
        help="a Hugging Face MoE causal LM: a folder or a Hub id (through --hub-mirror like the "
        "data); its routing is captured from its own forward",
    )
    group.add_argument(
        "--domain-set",
        help=f"a domain set: a name in conf/data/domains or a YAML file (default {DEFAULT_SET})",
    )
    group.add_argument(
        "--dtype",
        choices=("bf16", "fp16", "fp32"),
        help="weights and activations (default: bf16 on a GPU, fp32 on the CPU)",
    )
    group.add_argument(
        "--max-tokens",
        type=int,
        help="route at most this many probe tokens (a seeded subset of held-out blocks per "
        "domain; default: every held-out block)",
    )
    group.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let the model's own code run (off by default)",
    )
    for flag, kind, what in (
        ("--size-mb", float, "MiB of text per domain"),
        ("--block-size", int, "tokens per probe block"),
        ("--batch-size", int, "blocks per forward"),
        ("--permutations", int, "document-label permutations behind each null and interval"),
    ):
        key = flag[2:].replace("-", "_")
        group.add_argument(flag, type=kind, help=f"{what} ({DEFAULTS[key]})")
    group.add_argument(
        "--save-routing",
        action="store_true",
        help="also write routing.npz: every probe token's experts and weights per MoE layer",
    )


def model_only_flags(args: argparse.Namespace) -> dict[str, Any]:
    """``{"--flag": value}`` of the flags that only the ``--model`` mode reads."""
    return {"--" + key.replace("_", "-"): getattr(args, key) for key in MODEL_ONLY}


def parse_analyze_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m moe_emergence.analyze",
        description="Route and score every checkpoint of a run or a seed sweep in eval mode; "
        "summarise each condition over seeds with 95% intervals.",
    )
    parser.add_argument(
        "path",
        metavar=OPTION,
        nargs="*",
        help="a run dir, a multirun dir, a .ckpt file or an earlier analysis's --out folder (its "
        "runs' results are reused, no checkpoints needed); several: one study (e.g. sweeps run "
        "in several sittings; the same condition and seed twice is refused; --out required)",
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


def parse_inspect_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m moe_emergence.inspect",
        description="Show which expert each token of a text goes to, per MoE layer (eval mode).",
    )
    parser.add_argument("ckpt", metavar="CKPT", help="a .ckpt file of train.py, or its run dir")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the text to route")
    source.add_argument("--file", help="a UTF-8 file whose text to route")
    parser.add_argument("--html", metavar="OUT", help="write a self-contained HTML page here")
    parser.add_argument(
        "--color",
        choices=["auto", "always", "never"],
        default="auto",
        help="coloured text per layer (auto: when stdout is a terminal), else a plain table",
    )
    parser.add_argument(
        "--code",
        action="store_true",
        help="treat the text as Python and add the token-type x expert table (automatic for "
        "--file *.py)",
    )
    parser.add_argument(
        "--domain",
        help="the text's domain, one of the run's (needed by, and only by, a domain router: "
        "model.moe.router=domain)",
    )
    parser.add_argument(
        NO_LISTS,
        action="store_true",
        help="with --html, leave out each expert's over-represented tokens on the run's probe "
        "(as analyze lists them); they cost rebuilding the run's probe from its token cache "
        "(or its recorded sources when the cache is gone) and routing it once through CKPT",
    )
    parser.add_argument("--tokenizer", help="tokenizer name or folder (default: the run's)")
    parser.add_argument("--hub-mirror", help="Hub mirror for the tokenizer (default: the run's)")
    parser.add_argument("--cache-dir", help="cache root for sample_bpe (default: the run's)")
    return parser.parse_args(argv)


def data_overrides_of(args: Any) -> dict[str, str | None]:
    """The data settings that ``--hub-mirror``, ``--cache-dir`` and ``--tokenizer`` (the
    attributes of ``args`` that are not None) replace; ``--hub-mirror null``: no mirror."""
    given = {
        "hub_mirror": args.hub_mirror,
        "cache_dir": args.cache_dir,
        "tokenizer": args.tokenizer,
    }
    found = {key: value for key, value in given.items() if value is not None}
    if found.get("hub_mirror") in ("null", "none"):
        found["hub_mirror"] = None
    return found
