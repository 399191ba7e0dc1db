"""``python -m moe_emergence.analyze --model MODEL --domain-set SET``: a Hugging Face MoE causal
LM (a folder, or a Hub id through the data's mirror and offline rules) measured on a domain set
with the same calibrated analysis as a trained run's final checkpoint.

One command from model to report, in this order (every refusal comes before the weights load
and before anything is written to ``--out``):

1. the model's config: its family must be one whose routing is captured
   (:mod:`moe_emergence.analysis.hf_routing`); dense and other MoE models are refused;
2. the model's own tokenizer (or ``--tokenizer``), whose ids must fit the model's vocabulary;
3. the domain set's texts, tokenized into the project's token cache (its key holds the
   tokenizer's definition: another model's tokenizer is another entry), 5% of each domain's
   texts held out as ``experiment=moe_main`` holds them out (at least 20 texts); the probe is
   those held-out blocks, size-matched (:func:`moe_emergence.analysis.probe.build_probe`), at
   most ``--max-tokens`` tokens (a seeded subset of blocks per domain); a set whose texts the
   tokenizer maps mostly to its unknown token is refused;
4. the weights (``--dtype``: bf16 on a GPU, fp32 on the CPU; ``--device auto``: spread over
   the GPUs by accelerate), the probe routed in batches with the experts each token's MoE
   block actually ran captured per layer (:func:`~moe_emergence.analysis.hf_routing.route_probe`);
5. the scores, the field's specialisation metrics and the outputs
   (:mod:`moe_emergence.analysis.external_report`).
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from moe_emergence.analysis.arguments import DEFAULTS
from moe_emergence.analysis.external_report import ModelRun, write_model_outputs
from moe_emergence.analysis.hf_routing import (
    family_of,
    load_config,
    load_model,
    peak_memory,
    route_probe,
)
from moe_emergence.analysis.probe import Probe, build_probe
from moe_emergence.data import MixedDomainDataModule
from moe_emergence.data.domains import SAMPLE_PREFIX, read_domain_set
from moe_emergence.data.prepare import load_data_tokenizer
from moe_emergence.data.tokenize import check_tokenizer_folder
from moe_emergence.errors import UserError
from moe_emergence.files import locked
from moe_emergence.hub import resolve_repo

log = logging.getLogger(__name__)

EVAL_FRACTION = 0.05  # held-out share of each domain's texts, as experiment=moe_main
EVAL_MIN_TEXTS = 20  # at least this many held-out texts per domain (the data's default)
UNKNOWN_LIMIT = 0.5  # a domain whose probe tokens are mostly the unknown token is refused
LOCK_FILE = ".analyze.lock"  # as analyze's PATH mode: one analysis writes into a folder


def with_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with :data:`DEFAULTS` where a ``--model`` flag was not given
    (``--hub-mirror null``: no mirror)."""
    merged = vars(args).copy()
    for key, value in DEFAULTS.items():
        if merged.get(key) is None:
            merged[key] = value
    if merged.get("hub_mirror") in ("null", "none"):  # as PATH mode: no mirror
        merged["hub_mirror"] = None
    return argparse.Namespace(**merged)


# ---------------------------------------------------------------------- checks before work


def check_numbers(args: argparse.Namespace) -> None:
    for flag, value, low in (
        ("--block-size", args.block_size, 2),
        ("--batch-size", args.batch_size, 1),
        ("--permutations", args.permutations, 1),
        ("--max-tokens", args.max_tokens, 1),
    ):
        if value is not None and value < low:
            raise UserError(f"{flag} {value}: pass an integer >= {low}.")


def out_folder(args: argparse.Namespace, set_name: str) -> Path:
    """``--out``, else ``outputs/hf_analysis/<model>__<set>``; refused when it is a file."""
    if args.out:
        out = Path(args.out).expanduser()
    else:
        model = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(args.model).name or args.model)
        out = Path("outputs") / "hf_analysis" / f"{model}__{Path(set_name).stem}"
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: pass a folder (new or an earlier analysis's).")
    return out


def set_source(spec: str) -> str:
    """``sample`` for a set of the offline sample corpus' datasets only, else ``hub``."""
    try:
        raw = read_domain_set(spec)
    except ValueError as exc:
        raise UserError(f"--domain-set {spec}: {str(exc).rstrip('.')}.") from None
    datasets = [
        str(entry.get("dataset", ""))
        for sources in (raw.values() if isinstance(raw, Mapping) else [])
        for entry in (sources or [])
        if isinstance(entry, Mapping)
    ]
    return "sample" if datasets and all(d.startswith(SAMPLE_PREFIX) for d in datasets) else "hub"


def text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def load_tokenizer_of(args: argparse.Namespace, location: str) -> tuple[str, Any]:
    """``(name, tokenizer)``: ``--tokenizer``, else the model's own from its ``location`` (a
    fast tokenizer with EOS, loaded as the data loads one); a model folder without one is
    refused in one line."""
    if args.tokenizer:
        return args.tokenizer, load_data_tokenizer(args.tokenizer, args.hub_mirror, args.cache_dir)
    if Path(location).is_dir():
        try:
            check_tokenizer_folder(args.model, Path(location))
        except UserError:
            raise UserError(
                f"--model {args.model}: its folder holds no tokenizer (tokenizer.json, or "
                f"vocab.json + merges.txt, ...): save the model's tokenizer in it "
                f"(tokenizer.save_pretrained), or pass --tokenizer NAME_OR_FOLDER."
            ) from None
    return args.model, load_data_tokenizer(args.model, args.hub_mirror, args.cache_dir)


def check_fits(args: argparse.Namespace, config: Any, tokenizer: Any, tokenizer_name: str) -> None:
    """The tokenizer's ids within the model's vocabulary, a block within its positions."""
    text = text_config(config)
    vocab = getattr(text, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise UserError(
            f"--model {args.model}: tokenizer '{tokenizer_name}' has {len(tokenizer):,} ids but "
            f"the model only {vocab:,}: it is not the model's tokenizer; pass the right one with "
            f"--tokenizer."
        )
    positions = getattr(text, "max_position_embeddings", None)
    if positions is not None and args.block_size > positions:
        raise UserError(
            f"--block-size {args.block_size} exceeds --model {args.model}'s "
            f"{positions:,} positions: pass --block-size {positions} or less."
        )


# ---------------------------------------------------------------------- the probe


def load_probe(
    args: argparse.Namespace, spec: str, tokenizer_name: str
) -> tuple[MixedDomainDataModule, Probe]:
    """The set's held-out blocks in the token cache keyed by this tokenizer, size-matched;
    with ``--max-tokens``, a seeded subset of max_tokens / (domains x block size) blocks per
    domain first."""
    source = set_source(spec)  # a missing or bad set: one line naming --domain-set
    datamodule = MixedDomainDataModule(
        size_mb=args.size_mb,
        block_size=args.block_size,
        tokenizer=tokenizer_name,
        hub_mirror=args.hub_mirror,
        cache_dir=args.cache_dir,
        domain_set=read_domain_set(spec),  # its other keys: the tokenizer is the model's here
        source=source,
        eval_fraction=EVAL_FRACTION,
        eval_min_texts=EVAL_MIN_TEXTS,
        show_progress=not args.no_progress,
    )
    datamodule.prepare_data()
    datamodule.setup("fit")
    domains = datamodule.domains
    per_domain = None
    if args.max_tokens is not None:
        per_domain = args.max_tokens // (len(domains) * args.block_size)
        if per_domain < 1:
            raise UserError(
                f"--max-tokens {args.max_tokens} is less than one block per domain "
                f"({len(domains)} x {args.block_size} tokens): raise it or lower --block-size."
            )
    probe = build_probe(datamodule, domains, held_out_blocks=per_domain, match_sizes=True)
    return datamodule, probe


def check_encodable(probe: Probe, tokenizer: Any, spec: str) -> None:
    """Refuse a set a domain of which the tokenizer cannot encode: more than half of its
    scored probe tokens (EOS aside) its unknown token, or none at all."""
    unknown, eos = tokenizer.unk_token_id, tokenizer.eos_token_id
    for d, domain in enumerate(probe.domains):
        ids = probe.input_ids[probe.scored & (probe.block_domains == d)[:, None]]
        ids = ids[ids != eos]
        share = 1.0 if ids.size == 0 else float(np.mean(ids == unknown))
        if share > UNKNOWN_LIMIT:
            raise UserError(
                f"--domain-set {spec}: the tokenizer cannot encode domain '{domain}' ("
                f"{share:.0%} of its probe tokens are its unknown token "
                f"{tokenizer.unk_token!r}, EOS aside): measure this model on texts in its "
                f"language and script, or pass its own tokenizer."
            )


# ---------------------------------------------------------------------- the command


def run_model(args: argparse.Namespace) -> str:
    """Do the work of ``analyze --model``; return what to print."""
    args = with_defaults(args)
    check_numbers(args)
    spec = args.domain_set
    out = out_folder(args, spec)
    location = resolve_repo(args.model, args.hub_mirror, kind="model")
    config = load_config(args.model, location, args.trust_remote_code)
    family = family_of(config, f"--model {args.model}")
    tokenizer_name, tokenizer = load_tokenizer_of(args, location)
    check_fits(args, config, tokenizer, tokenizer_name)
    datamodule, probe = load_probe(args, spec, tokenizer_name)
    check_encodable(probe, tokenizer, spec)
    loaded = load_model(
        args.model, location, config, args.device, args.dtype, args.trust_remote_code
    )
    n_experts = {layer.n_experts for layer in loaded.layers}
    if len(n_experts) != 1:
        raise UserError(
            f"--model {args.model}: its MoE layers differ in expert count ({sorted(n_experts)})"
            f"; one count per model is measured here."
        )
    log.info("%s: %s, MoE layers %s", args.model, family.name, [m.index for m in loaded.layers])
    routing = route_probe(
        loaded.model,
        loaded.layers,
        family,
        probe.input_ids,
        args.batch_size,
        keep_weights=args.save_routing,
        progress=not args.no_progress,
    )
    memory = peak_memory(loaded.device)
    run = ModelRun(
        loaded=loaded,
        tokenizer=tokenizer,
        tokenizer_name=tokenizer_name,
        domain_set=spec,
        probe=probe,
        routing=routing,
        data_report=datamodule.report or {},
        permutations=args.permutations,
        block_size=args.block_size,
        max_tokens=args.max_tokens,
        peak_memory=memory,
        save_routing=args.save_routing,
    )
    out.mkdir(parents=True, exist_ok=True)
    with locked(out / LOCK_FILE, "another analysis writing into this folder"):
        return write_model_outputs(run, out)
