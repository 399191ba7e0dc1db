"""Token-level inspection: which expert each token of a text goes to, per MoE layer.

``python -m moe_emergence.inspect CKPT (--text STRING | --file PATH) [--html OUT]`` (and
``--domain NAME`` for a run whose router routes by domain) loads a
checkpoint written by ``train.py`` (verified against its ``.sha256`` sidecar) and the run's
tokenizer, routes the text in eval mode (no router noise, no dropout) and prints, per token,
the expert of every MoE layer with the router's probability for it: coloured text per layer on
a terminal (``--color``), else a plain table. ``--html`` writes a self-contained page: one
``<span class="tok e{expert}">`` per token and layer, its ``title`` the layer's probabilities.
For Python (``--file *.py`` or ``--code``) it adds the token-type x expert table per layer
(:mod:`moe_emergence.analysis.token_types`).

The page also lists, per MoE layer, each expert's most over-represented tokens on the run's
fixed probe (:func:`~moe_emergence.analysis.specialisation.expert_token_lists`, as ``analyze``
lists them: found on one half of the probe's documents, checked on the other), which costs
rebuilding the run's probe from its token cache and routing it once through the checkpoint
(``--no-token-lists`` skips both); a token of the text on an expert whose replicated list holds
it is underlined.

A text longer than the model's ``n_positions`` is routed in consecutive windows of
``n_positions`` tokens, each window without the context of the ones before (a note says so).
"""

from __future__ import annotations

import argparse
import html
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import GPT2LMHeadModel

from moe_emergence.analysis.arguments import INSPECT_OPTION as OPTION
from moe_emergence.analysis.arguments import NO_LISTS, data_overrides_of
from moe_emergence.analysis.arguments import parse_inspect_args as parse_args
from moe_emergence.analysis.evaluate import (
    DOMAIN_SET_FILE,
    checkpoint_expert_tokens,
)
from moe_emergence.analysis.loading import (
    LoadedCheckpoint,
    load_checkpoint,
    recorded_tokenizer,
    tokenizer_settings,
)
from moe_emergence.analysis.probe import Probe, route_blocks
from moe_emergence.analysis.specialisation import REPLICATION_Z, ExpertTokens
from moe_emergence.analysis.tables import expert_token_rows
from moe_emergence.analysis.token_types import CATEGORIES, format_type_table, token_type_table
from moe_emergence.data.cache import tokenizer_identity
from moe_emergence.data.prepare import load_data_tokenizer
from moe_emergence.data.tokenize import untruncated
from moe_emergence.errors import UserError, report_user_errors
from moe_emergence.files import write_atomic
from moe_emergence.model.gpt2_moe import moe_layers
from moe_emergence.runs.checkpoint import resolve_checkpoint
from moe_emergence.runs.find import checkpoint_run_dir
from moe_emergence.runs.record import RunRecord

# 256-colour backgrounds, told apart on dark and light terminals (cycled beyond 12 experts).
ANSI_BACKGROUNDS = (117, 215, 120, 211, 228, 183, 152, 223, 250, 157, 224, 189)
ANSI_RESET = "\x1b[0m"

REPLICATED = "\u2713"  # a listed token that the other half of the probe's documents confirms

Routing = dict[int, tuple[np.ndarray, np.ndarray]]


# ---------------------------------------------------------------------- model and tokenizer


def load_run_tokenizer(loaded: LoadedCheckpoint, args: argparse.Namespace):
    """The run's tokenizer (``--tokenizer`` / ``--hub-mirror`` / ``--cache-dir`` override),
    checked to fit the model's embedding."""
    settings = tokenizer_settings(loaded) or {}
    name = args.tokenizer or settings.get("tokenizer")
    if not name:
        raise UserError(
            f"{OPTION}={loaded.path}: no tokenizer recorded (no data settings in the checkpoint "
            f"and no .hydra/config.yaml in its run folder): pass --tokenizer NAME_OR_FOLDER."
        )
    mirror = args.hub_mirror or settings.get("hub_mirror")
    cache_dir = args.cache_dir or settings.get("cache_dir")
    tokenizer = load_data_tokenizer(str(name), hub_mirror=mirror, cache_dir=cache_dir)
    vocab = loaded.model.config.vocab_size
    if len(tokenizer) > vocab:
        raise UserError(
            f"Tokenizer '{name}' has {len(tokenizer):,} ids but the model's embedding only "
            f"{vocab:,}: it is not the run's tokenizer; pass the right one with --tokenizer."
        )
    trained = loaded.hparams.get("vocab_size")  # the data tokenizer's size at training
    if trained is not None and len(tokenizer) != trained:
        raise UserError(
            f"Tokenizer '{name}' has {len(tokenizer):,} ids, the run's tokenizer had {trained:,}: "
            f"it is another vocabulary, whose ids would be routed as other tokens; pass the "
            f"run's tokenizer with --tokenizer."
        )
    found = recorded_tokenizer(loaded)
    if found is not None:
        (recorded, where), sha256 = found, tokenizer_identity(tokenizer, str(name))["sha256"]
        if recorded.get("sha256") != sha256:
            raise UserError(
                f"Tokenizer '{name}' is not the run's: its definition (SHA-256 {sha256[:12]}) "
                f"differs from the one the run trained with ({str(recorded.get('sha256'))[:12]}, "
                f"'{recorded.get('name')}' in {where}), so its ids would be routed as other "
                f"tokens; pass the run's tokenizer with --tokenizer."
            )
    return tokenizer


def encode(tokenizer: Any, text: str) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Token ids int64 [T] of ``text`` (no special tokens, no truncation) and each token's
    character span. Spans partition the text: a token's span starts where the previous one
    ended (so leading spaces that a tokenizer trims from offsets stay with their token; the
    second of two tokens sharing one character gets an empty span) and the last ends at the
    text's end."""
    with untruncated(tokenizer) as backend:
        encoding = backend.encode(text, add_special_tokens=False)
    ids = np.asarray(encoding.ids, dtype=np.int64)
    spans, previous = [], 0
    for _, end in encoding.offsets:
        end = max(end, previous)
        spans.append((previous, end))
        previous = end
    if spans:
        spans[-1] = (spans[-1][0], len(text))
    return ids, spans


# ---------------------------------------------------------------------- routing


def route_text(
    model: GPT2LMHeadModel, token_ids: Sequence[int] | np.ndarray, domain: int | None = None
) -> Routing:
    """Per MoE layer (block index), ``(experts int64 [T, k], probs float32 [T, E])`` of one
    token sequence, routed by :func:`moe_emergence.analysis.probe.route_blocks` (eval mode, no
    grad); ``probs`` is the softmax of the clean router logits. Sequences longer than
    ``model.config.n_positions`` go through in consecutive windows of that many tokens, one
    window per forward. ``domain``: the text's index in the run's domains (a ``domain``
    router routes by it)."""
    if not moe_layers(model):
        raise UserError("The model has no MoE layers: there is no routing to inspect.")
    device = next(model.parameters()).device
    ids = torch.as_tensor(np.asarray(token_ids), dtype=torch.long).reshape(-1).to(device)
    window = model.config.n_positions
    whole = len(ids) - len(ids) % window
    parts = [ids[:whole].view(-1, window), ids[whole:].view(1, -1)]  # full windows, the rest
    routed = [
        route_blocks(model, part, 1, with_probs=True, block_domains=_domains(part, domain))
        for part in parts
        if part.numel()
    ]
    return {
        i: (
            torch.cat([r.experts[i].flatten(0, 1) for r in routed]).cpu().numpy(),
            torch.cat([r.probs[i].flatten(0, 1) for r in routed]).cpu().numpy(),
        )
        for i in sorted(routed[0].experts)
    }


def _domains(blocks: torch.Tensor, domain: int | None) -> torch.Tensor | None:
    """[B] long, ``domain`` for each of the B ``blocks`` (None stays None)."""
    if domain is None:
        return None
    return torch.full((blocks.shape[0],), domain, dtype=torch.long, device=blocks.device)


# ---------------------------------------------------------------------- rendering


def _expert_label(chosen: np.ndarray, probs: np.ndarray) -> str:
    """``e1 0.80`` (top-1) or ``e1+e3 0.55`` (top-k, probability of the first)."""
    names = "+".join(f"e{int(e)}" for e in chosen)
    return f"{names} {probs[int(chosen[0])]:.2f}"


def _shown(token: str, width: int = 18) -> str:
    shown = repr(token)
    return shown if len(shown) <= width else shown[: width - 2] + "…" + shown[0]


def render_table(tokens: Sequence[str], routing: Routing) -> str:
    """Plain text: one row per token, its index, text (repr) and, per layer, expert and the
    router's probability for it."""
    layers = list(routing)
    header = f"{'#':>5}  {'token':<18}" + "".join(f"  {f'layer {i}':<12}" for i in layers)
    lines = [header.rstrip()]
    for t, token in enumerate(tokens):
        cells = "".join(
            f"  {_expert_label(routing[i][0][t], routing[i][1][t]):<12}" for i in layers
        )
        lines.append(f"{t:>5}  {_shown(token):<18}{cells}".rstrip())
    return "\n".join(lines)


def _ansi(text: str, expert: int) -> str:
    colour = ANSI_BACKGROUNDS[expert % len(ANSI_BACKGROUNDS)]
    return f"\x1b[48;5;{colour}m\x1b[30m{text}{ANSI_RESET}"


def render_ansi(tokens: Sequence[str], routing: Routing, n_experts: int) -> str:
    """Per layer, the text with each token on its expert's background colour (a newline shown
    as a coloured ``↵``) and a legend."""
    legend = " ".join(_ansi(f" e{e} ", e) for e in range(n_experts))
    out = []
    for layer, (experts, _) in routing.items():
        body = []
        for token, chosen in zip(tokens, experts, strict=True):
            pieces = token.split("\n")
            coloured = [_ansi(p, int(chosen[0])) if p else "" for p in pieces]
            body.append((_ansi("↵", int(chosen[0])) + "\n").join(coloured))
        out.append(f"layer {layer}  {legend}\n{''.join(body).rstrip(chr(10))}")
    return "\n\n".join(out)


def expert_counts(routing: Routing, n_experts: int) -> str:
    """One line per layer: how many token assignments each expert got."""
    lines = []
    for layer, (experts, _) in routing.items():
        counts = np.bincount(experts.reshape(-1), minlength=n_experts)
        lines.append(f"layer {layer}: " + ", ".join(f"e{e} {n}" for e, n in enumerate(counts)))
    return "\n".join(lines)


def _hue(expert: int) -> float:
    return (expert * 137.508) % 360  # golden angle: neighbours differ for any number of experts


def replicated_sets(lists: Mapping[int, ExpertTokens]) -> dict[int, dict[int, set[int]]]:
    """Per layer and expert, the token ids of its list that replicated."""
    out: dict[int, dict[int, set[int]]] = {}
    for layer, t in lists.items():
        out[layer] = {}
        for e, i in zip(t.expert[t.replicated], t.token_id[t.replicated], strict=True):
            out[layer].setdefault(int(e), set()).add(int(i))
    return out


def token_list_caption(lists: ExpertTokens) -> str:
    """One line: what the lists are, their chance reading and how many replicated."""
    n, hits = int(lists.replicated.size), int(lists.replicated.sum())
    return (
        "Each expert's most over-represented tokens among its first-choice tokens on one half of "
        "the probe's documents: lift = p(token | expert) / p(token) (1: as frequent on the "
        "expert as on the probe), count on that half; "
        f"{REPLICATED}: replicated on the other half (z > {REPLICATION_Z}; about 5% of a random "
        f"router's listed tokens replicate). {hits} of {n} listed tokens replicated."
    )


def render_token_lists(layer: int, lists: ExpertTokens, n_experts: int) -> str:
    """``<section id="expert-tokens-{layer}">``: the caption and one table row per expert,
    each listed token (its text as ``repr``, escaped) with its lift and count, and a mark
    where it replicated; its title gives the id and the other half's count and lift."""
    rows = expert_token_rows({layer: lists})
    body = []
    for e in range(n_experts):
        mine = [r for r in rows if r["expert"] == e]
        cells = []
        for r in mine:
            hover = (
                f"id {r['token_id']}; lift {r['lift']:.2f}, count {r['count']} (fit half); "
                f"lift {r['check_lift']:.2f}, count {r['check_count']} (other half)"
            )
            mark = f" {REPLICATED}" if r["replicated"] else ""
            cells.append(
                f'<span class="listed{" rep" if r["replicated"] else ""}" '
                f'title="{html.escape(hover)}"><code>{html.escape(repr(r["token"]))}</code> '
                f"{r['lift']:.2f} ({r['count']}){mark}</span>"
            )
        hits = sum(r["replicated"] for r in mine)
        body.append(
            f'<tr><th class="e{e}">e{e}</th><td>{hits}/{len(mine)}</td>'
            f'<td class="tokens">{"; ".join(cells) or "-"}</td></tr>'
        )
    return (
        f'<section id="expert-tokens-{layer}"><h3>Layer {layer}: per-expert token lists</h3>'
        f"<p>{html.escape(token_list_caption(lists))}</p>"
        "<table><tr><th>expert</th><th>replicated</th><th>tokens: lift (count)</th></tr>"
        f"{''.join(body)}</table></section>"
    )


def render_html(
    tokens: Sequence[str],
    routing: Routing,
    n_experts: int,
    title: str,
    notes: Sequence[str] = (),
    type_tables: dict[int, np.ndarray] | None = None,
    token_lists: Mapping[int, ExpertTokens] | None = None,
    token_ids: Sequence[int] | np.ndarray | None = None,
) -> str:
    """A self-contained page (inline CSS, no script): per layer a ``<pre>`` with one
    ``<span class="tok e{expert}" title="...">`` per token (its first expert for top-k), the
    title holding the token's index, experts and the layer's probabilities; a legend; the
    token-type tables when given; with ``token_lists`` (per layer) and the text's
    ``token_ids`` [T], each layer's :func:`render_token_lists` after its text, and class
    ``rep`` on the tokens whose first expert's replicated list holds their id."""
    replicated = replicated_sets(token_lists or {})
    css = [
        "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}",
        "pre{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:14px;"
        "line-height:1.6;border:1px solid #ddd;padding:.8em}",
        ".tok{border-radius:2px;outline:1px solid rgba(0,0,0,.08)}",
        ".tok:hover{outline:2px solid #000}",
        "table{border-collapse:collapse}td,th{padding:2px 8px;text-align:right}",
        ".legend span{padding:2px 6px;margin-right:4px}",
        ".rep{text-decoration:underline 2px}td.tokens{text-align:left}",
    ]
    css += [f".e{e}{{background:hsl({_hue(e):.0f},75%,80%)}}" for e in range(n_experts)]
    legend = "".join(f'<span class="e{e}">expert {e}</span>' for e in range(n_experts))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{''.join(css)}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        *(f"<p>{html.escape(note)}</p>" for note in notes),
        f'<p class="legend">{legend}</p>',
    ]
    if token_lists:
        parts.append(
            "<p>Underlined: a token routed to an expert whose replicated token list (below each "
            "layer) holds it.</p>"
        )
    for layer, (experts, probs) in routing.items():
        spans = []
        for t, (token, chosen, p) in enumerate(zip(tokens, experts, probs, strict=True)):
            names = "+".join(f"e{int(e)}" for e in chosen)
            dist = " ".join(f"e{e} {p[e]:.2f}" for e in range(len(p)))
            hover = f"#{t} {token!r} -> {names} | {dist}"
            first = int(chosen[0])
            listed = token_ids is not None and int(token_ids[t]) in replicated.get(layer, {}).get(
                first, ()
            )
            if listed:
                hover += f" | in e{first}'s replicated token list"
            spans.append(
                f'<span class="tok e{first}{" rep" if listed else ""}" '
                f'title="{html.escape(hover)}">{html.escape(token, quote=False)}</span>'
            )
        parts.append(f'<section id="layer-{layer}"><h2>Layer {layer}</h2>')
        parts.append(f"<pre>{''.join(spans)}</pre>")
        if type_tables and layer in type_tables:
            table = type_tables[layer]
            head = "".join(f'<th class="e{e}">e{e}</th>' for e in range(n_experts))
            rows = "".join(
                f"<tr><th>{name}</th>" + "".join(f"<td>{int(n)}</td>" for n in row) + "</tr>"
                for name, row in zip(CATEGORIES, table, strict=True)
                if row.sum()
            )
            parts.append(
                f"<h3>Python token types x expert</h3><table><tr><th></th>{head}</tr>{rows}</table>"
            )
        parts.append("</section>")
        if token_lists and layer in token_lists:
            parts.append(render_token_lists(layer, token_lists[layer], n_experts))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------- command line


def read_text(args: argparse.Namespace) -> str:
    if args.text is not None:
        text = args.text
        origin = "--text"
    else:
        path = Path(args.file)
        if not path.is_file():
            raise UserError(f"--file {path} does not exist or is not a file.")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"--file {path} is not UTF-8 text.") from None
        origin = f"--file {path}"
    if not text:
        raise UserError(f"{origin} is empty: give some text to route.")
    return text


def check_html_path(out: str | None) -> None:
    """Refuse an ``--html`` path that cannot be written (a folder, no folder, a folder where no
    file can be made: read-only, not writable), before any work."""
    if out is None:
        return
    path = Path(out)
    if path.is_dir():
        raise UserError(f"--html {out} is a folder: give a file path, e.g. {path / 'tokens.html'}.")
    if not path.parent.is_dir():
        raise UserError(f"--html {out}: the folder {path.parent} does not exist; create it first.")
    try:
        handle, trial = tempfile.mkstemp(prefix=".inspect-", dir=path.parent)
    except OSError as exc:
        raise UserError(
            f"--html {out}: cannot write in {path.parent} ({exc.strerror or exc}): pass an --html "
            f"path in a writable folder."
        ) from None
    os.close(handle)
    os.unlink(trial)


def text_domain(loaded: LoadedCheckpoint, domain: str | None) -> int | None:
    """The index of ``--domain`` in the run's domains: required for a domain router, refused
    for the others (whose routing it would not change)."""
    router = (loaded.hparams.get("moe") or {}).get("router", "learned")
    domains = list(loaded.hparams.get("domains") or [])
    if router != "domain":
        if domain is not None:
            raise UserError(
                f"--domain {domain}: this run's router (model.moe.router={router}) does not "
                f"route by domain; leave --domain out."
            )
        return None
    if domain not in domains:
        given = "no --domain" if domain is None else f"--domain {domain}"
        raise UserError(
            f"{OPTION}={loaded.path} routes each text by its domain (model.moe.router=domain), "
            f"{given} given: pass --domain, one of {', '.join(domains)}."
        )
    return domains.index(domain)


def probe_token_lists(
    loaded: LoadedCheckpoint, args: argparse.Namespace
) -> tuple[Probe, dict[int, ExpertTokens]]:
    """The run's probe and the checkpoint's per-expert token lists on it
    (:func:`~moe_emergence.analysis.evaluate.checkpoint_expert_tokens`; the rebuilt data's
    report is dropped); a one-line error that names ``--no-token-lists`` when they cannot be
    had (the report's temporary folder kept when the error's rebuild command names the domain
    set file written there)."""
    report_dir = Path(tempfile.mkdtemp(prefix="inspect-report-"))
    try:
        return checkpoint_expert_tokens(
            f"{OPTION}={loaded.path}",
            loaded,
            RunRecord(checkpoint_run_dir(loaded.path)),
            report_dir,
            torch.device("cpu"),
            data_overrides_of(args),
        )
    except UserError as exc:
        raise UserError(f"Per-expert token lists: {exc} Or pass {NO_LISTS}.") from None
    finally:  # kept where the error's rebuild command names the domain set written there
        if not (report_dir / DOMAIN_SET_FILE).is_file():
            shutil.rmtree(report_dir, ignore_errors=True)


def run(args: argparse.Namespace) -> str:
    """Do the work of one ``inspect`` call; return what to print."""
    check_html_path(args.html)
    text = read_text(args)
    is_code = args.code or (args.file is not None and Path(args.file).suffix == ".py")
    loaded = load_checkpoint(resolve_checkpoint(args.ckpt, OPTION))
    tokenizer = load_run_tokenizer(loaded, args)
    ids, spans = encode(tokenizer, text)
    if len(ids) == 0:
        raise UserError("The text encodes to no tokens: give some text to route.")
    routing = route_text(loaded.model, ids, text_domain(loaded, args.domain))
    tokens = [text[start:end] for start, end in spans]
    n_experts = int(loaded.hparams["moe"]["n_experts"])
    window = loaded.model.config.n_positions
    notes = [
        f"{loaded.path} (step {loaded.step}); {len(ids)} tokens; MoE layers "
        f"{', '.join(map(str, routing))} ({n_experts} experts, top-"
        f"{routing[next(iter(routing))][0].shape[1]}); eval mode; trained with "
        f"dispatch {loaded.dispatch}"
    ]
    if len(ids) > window:
        windows = -(-len(ids) // window)
        notes.append(
            f"Note: {len(ids)} tokens exceed n_positions={window}: routed in {windows} windows "
            f"of {window} tokens, each without the context before it."
        )
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    body = render_ansi(tokens, routing, n_experts) if color else render_table(tokens, routing)
    out = [*notes, "", body, "", "Tokens per expert:", expert_counts(routing, n_experts)]
    type_tables = None
    if is_code:
        type_tables = {
            layer: token_type_table(text, spans, experts, n_experts)
            for layer, (experts, _) in routing.items()
        }
        for layer, table in type_tables.items():
            out += ["", format_type_table(table, f"Python token types x expert, layer {layer}:")]
    if args.html:
        lists = None
        if not args.no_token_lists:
            probe, lists = probe_token_lists(loaded, args)
            notes.append(f"Per-expert token lists on the run's probe: {probe.summary()}")
            out += ["", notes[-1]]
            out += [
                f"layer {layer}: {int(t.replicated.sum())} of {t.replicated.size} listed tokens "
                f"replicated on the other half of the probe's documents"
                for layer, t in lists.items()
            ]
        title = f"Routing of {loaded.path.name}"
        page = render_html(tokens, routing, n_experts, title, notes, type_tables, lists, ids)
        try:
            write_atomic(args.html, page)
        except OSError as exc:
            raise UserError(
                f"--html {args.html} could not be written ({exc.strerror or exc}): free space "
                f"there, or pass an --html path on another disk."
            ) from None
        out += ["", f"HTML written to {args.html}"]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None, parsed: argparse.Namespace | None = None) -> int:
    """Entry point of ``python -m moe_emergence.inspect``: ``argv`` parsed, or arguments
    already ``parsed`` (by :mod:`.arguments`, before torch loads); returns the exit status
    (:func:`report_user_errors`)."""
    args = parsed if parsed is not None else parse_args(argv)
    return report_user_errors(lambda: print(run(args)))
