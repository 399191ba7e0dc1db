"""Evaluate a run's checkpoints for ``python -m moe_emergence.analyze``: find the runs and their
checkpoints, rebuild each run's data and probe from what the run recorded, and route and score
every checkpoint in eval mode (the same probe, routing and scores as the training-time
:class:`~moe_emergence.analysis.RoutingAnalysis`), with the per-domain held-out loss, and the
final checkpoint's knock-out readings (:mod:`moe_emergence.analysis.knockout`).

Reads only the run dirs (``.hydra/config.yaml``, ``.hydra/overrides.yaml``, ``checkpoints/``)
and the token cache, which it rebuilds from the recorded data settings when it is gone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shlex
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from moe_emergence.analysis.arguments import OPTION
from moe_emergence.analysis.knockout import knockout_effects
from moe_emergence.analysis.loading import LoadedCheckpoint, load_checkpoint
from moe_emergence.analysis.probe import (
    PROBE_FILE,
    Probe,
    ProbeRouting,
    build_probe,
    route_blocks,
    score_probe_routing,
)
from moe_emergence.analysis.results import CheckpointResult, HeldOutLoss, RunResult, group_of
from moe_emergence.analysis.scores import paired_change_interval
from moe_emergence.analysis.settings import ProbeSettings
from moe_emergence.analysis.specialisation import (
    ExpertTokens,
    LayerSpecialisation,
    expert_token_lists,
    specialise_probe,
)
from moe_emergence.analysis.token_types import CATEGORIES, token_type_table
from moe_emergence.data import MixedDomainDataModule
from moe_emergence.data.domains import available_sets, plain_containers, read_domain_set
from moe_emergence.data.settings import AddedSetting, as_made, cli_flag
from moe_emergence.errors import UserError, user_error_in
from moe_emergence.files import write_atomic
from moe_emergence.model.gpt2_moe import moe_layers
from moe_emergence.runs.find import RunCheckpoints
from moe_emergence.runs.record import RunRecord

log = logging.getLogger(__name__)

DOMAIN_SET_FILE = "domain_set.yaml"  # a run's domain set, written for the rebuild hint
CODE = "code"
# ---------------------------------------------------------------------- the run's records


def probe_settings(record: RunRecord) -> dict[str, Any]:
    """The run's ``callbacks.routing_analysis`` probe and null settings (the defaults where the
    run has none), so that the probe is the training-time one."""
    found = {key: getattr(ProbeSettings(), key) for key in ProbeSettings.PROBE_KEYS}
    for key in ProbeSettings.PROBE_KEYS:
        value = record.select(ProbeSettings.config_key(key))
        found[key] = value if value is not None else found[key]
    return found


def trained_seed(name: str, final: LoadedCheckpoint, recorded: int | None) -> int | None:
    """The seed the run trained with: its checkpoint's (``RandomStates``), else the seed its
    ``.hydra/overrides.yaml`` records, else its data seed. A warning names the run where the
    record's seed disagrees with the checkpoint's (a record rewritten by another start)."""
    if final.seed is None:
        return recorded if recorded is not None else final.data_settings.get("seed")
    if recorded is not None and recorded != final.seed:
        log.warning(
            "%s: .hydra/overrides.yaml says seed=%s but its checkpoints trained with seed %s; "
            "reported under seed %s (check the run's .hydra/ record: its condition is read "
            "from there too).",
            name,
            recorded,
            final.seed,
            final.seed,
        )
    return int(final.seed)


def domain_set_flag(settings: Mapping[str, Any], folder: Path) -> list[str]:
    """``--domain-set`` with what names the run's recorded domain set: nothing for the source's
    default (None), a set's name when its file in ``conf/data/domains`` holds that mapping, else
    a YAML file of it written into ``folder`` (``domain_set.yaml``)."""
    spec, flag = settings.get("domain_set"), cli_flag("domain_set")
    if spec is None:
        return []
    if isinstance(spec, str):
        return [flag, spec]
    spec = json.loads(json.dumps(plain_containers(spec)))
    for name in available_sets():
        try:
            if json.loads(json.dumps(read_domain_set(name))) == spec:
                return [flag, name]
        except (OSError, ValueError):
            continue
    file = folder / DOMAIN_SET_FILE
    write_atomic(file, yaml.safe_dump({"domain_set": spec}, sort_keys=False))
    return [flag, str(file)]


def rebuild_hint(settings: dict[str, Any], folder: Path) -> str:
    """The data CLI command that rebuilds a run's token cache (its domain set too:
    :func:`domain_set_flag`, whose file, where one is needed, goes into ``folder``)."""
    flags = [
        part
        for key in ("size_mb", "source", "tokenizer", "max_example_chars")
        for part in (cli_flag(key), str(settings.get(key)))
    ]
    for key in ("hub_mirror", "cache_dir"):  # where the data comes from and goes: when set
        if settings.get(key):
            flags += [cli_flag(key), str(settings[key])]
    flags += domain_set_flag(settings, folder)
    return "python -m moe_emergence.data " + shlex.join(flags)


def load_data(
    name: str, settings: dict[str, Any], report_dir: Path, expected: str | None = None
) -> MixedDomainDataModule:
    """The run's datamodule, set up from its recorded settings: the token cache when it is
    there, else rebuilt (streams and tokenizes: the recorded source must be reachable).
    ``expected``: the run's data fingerprint; offline, the cache entry holding that data is
    taken before newer entries that match the settings too."""
    if not settings:
        raise UserError(
            f"{name}: its checkpoint records no data settings (written by an older train.py): "
            f"the probe cannot be rebuilt; analyse a run trained with this version."
        )
    kwargs = {**settings, "report_dir": str(report_dir), "show_progress": False}
    try:
        datamodule = MixedDomainDataModule(**kwargs)
        datamodule.expected_fingerprint = expected
        datamodule.prepare_data()  # a cache hit, or the cache written again
        datamodule.setup("fit")
    except Exception as exc:
        error = user_error_in(exc)
        if error is None and not isinstance(exc, OSError):
            raise
        reason = " ".join(str(error or exc).split())[:200]
        raise UserError(
            f"{name}: the run's token cache cannot be read or rebuilt here ({reason}); rebuild "
            f"it with: {rebuild_hint(settings, report_dir)}"
        ) from None
    return datamodule


# ---------------------------------------------------------------------- one checkpoint


def block_losses(probe: Probe, loss_sum: np.ndarray) -> dict[str, HeldOutLoss]:
    """Per domain, the token-weighted mean of ``loss_sum`` [P] (nats summed per block)."""
    predicted = probe.input_ids.shape[1] - 1
    out = {}
    for d, domain in enumerate(probe.domains):
        mine = probe.block_domains == d
        if mine.any():
            tokens = int(mine.sum()) * predicted
            out[domain] = HeldOutLoss(float(loss_sum[mine].sum() / tokens), tokens)
    return out


def code_token_types(
    probe: Probe, experts: dict[int, np.ndarray], n_experts: int, decode: Callable[[int], str]
) -> dict[int, np.ndarray]:
    """Per MoE layer, Python token category x expert counts [C, E] over the probe's code
    blocks; each block is decoded token by token (its text is the tokens' concatenation)."""
    if CODE not in probe.domains:
        return {}
    code = np.flatnonzero(probe.block_domains == probe.domains.index(CODE))
    if len(code) == 0:
        return {}
    out = {layer: np.zeros((len(CATEGORIES), n_experts), dtype=np.int64) for layer in experts}
    for b in code:
        pieces = [decode(int(i)) for i in probe.input_ids[b]]
        ends = np.cumsum([len(p) for p in pieces])
        spans = [(int(e - len(p)), int(e)) for p, e in zip(pieces, ends, strict=True)]
        text = "".join(pieces)
        for layer, chosen in experts.items():
            out[layer] += token_type_table(text, spans, chosen[b], n_experts)
    return out


def evaluate_checkpoint(
    loaded: LoadedCheckpoint,
    probe: Probe,
    held_out: Probe | None,
    settings: dict[str, Any],
    device: torch.device,
    decode: Callable[[int], str] | None = None,
) -> CheckpointResult:
    """Route ``probe`` through the checkpoint's model in eval mode and score it; the held-out
    loss per domain over ``held_out`` (one pass when the probe is the held-out set);
    ``decode`` given: the code token-type tables too."""
    return route_and_score(loaded, probe, held_out, settings, device, decode)[0]


def route_probe(
    model: torch.nn.Module,
    probe: Probe,
    batch_size: int,
    device: torch.device,
    with_loss: bool = False,
) -> ProbeRouting:
    """The probe's blocks routed through ``model`` (on ``device``) in eval mode,
    ``batch_size`` blocks per forward, each with its domain (:func:`route_blocks`)."""
    return route_blocks(
        model,
        torch.from_numpy(probe.input_ids).to(device),
        batch_size,
        with_loss=with_loss,
        block_domains=torch.from_numpy(probe.block_domains).to(device),
    )


def route_and_score(
    loaded: LoadedCheckpoint,
    probe: Probe,
    held_out: Probe | None,
    settings: dict[str, Any],
    device: torch.device,
    decode: Callable[[int], str] | None = None,
) -> tuple[CheckpointResult, dict[int, np.ndarray]]:
    """:func:`evaluate_checkpoint`, and the probe's experts per MoE layer (int64 [P, T, k];
    empty for a dense model)."""
    model = loaded.model.to(device)
    batch = int(settings["batch_size"])
    same = held_out is not None and held_out.digest == probe.digest
    routed = route_probe(model, probe, batch, device, with_loss=same)
    losses: dict[str, HeldOutLoss] = {}
    if held_out is not None:
        loss_sum = routed.loss_sum
        if not same:
            ids = torch.from_numpy(held_out.input_ids).to(device)
            domains = torch.from_numpy(held_out.block_domains).to(device)
            loss_sum = route_blocks(
                model, ids, batch, with_loss=True, block_domains=domains
            ).loss_sum
        losses = block_losses(held_out, loss_sum.cpu().numpy())
    layers = moe_layers(model)
    if not layers:
        return CheckpointResult(step=loaded.step, losses=losses), {}
    n_experts = next(iter(layers.values())).n_experts
    tokens = probe.input_ids.size
    experts = {i: e.cpu().numpy() for i, e in routed.experts.items()}
    entropy = {i: float(s) / tokens for i, s in routed.entropy_sum.items()}
    scored = score_probe_routing(
        probe, experts, entropy, n_experts, settings["null_permutations"], settings["null_seed"]
    )
    types = code_token_types(probe, experts, n_experts, decode) if decode is not None else {}
    result = CheckpointResult(
        step=loaded.step,
        counts={layer: table for layer, (table, _) in scored.items()},
        scores={layer: scores for layer, (_, scores) in scored.items()},
        losses=losses,
        token_types=types,
    )
    return result, experts


# ---------------------------------------------------------------------- change from step 0


def initial_model_key(model: torch.nn.Module, experts: Mapping[int, np.ndarray]) -> str:
    """The identity of a run's step-0 model: SHA-256 of its weights (every state-dict entry's
    name, dtype, shape and bytes, in name order) and of its first-choice experts on the probe
    (``experts[layer]`` int [P, T, k], slot 0). Runs with equal keys have the same step-0
    scores: top-1, top-2 and no LB of one seed share their weights and their first choice
    (the highest router logit); a router that does not read its weights (hash, domain) routes
    otherwise and so gets a key of its own."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    for layer, chosen in sorted(experts.items()):
        first = np.asarray(chosen).reshape(*np.shape(chosen)[:2], -1)[..., 0]
        h.update(f"layer {layer}|".encode())
        h.update(np.ascontiguousarray(first, dtype=np.int64).tobytes())
    return h.hexdigest()


def change_intervals(
    probe: Probe,
    before: Mapping[int, np.ndarray],
    after: Mapping[int, np.ndarray],
    n_experts: int,
    settings: dict[str, Any],
) -> dict[int, tuple[float, float]]:
    """Per MoE layer in both, the probe interval of NMI(after) - NMI(before) with the same
    documents resampled for both (``null_permutations`` draws, ``null_seed``)."""
    return {
        layer: tuple(
            float(v)
            for v in paired_change_interval(
                probe.input_ids,
                probe.token_docs,
                probe.doc_domains,
                before[layer],
                after[layer],
                len(probe.domains),
                n_experts,
                n_draws=int(settings["null_permutations"]),
                seed=int(settings["null_seed"]),
                mask=probe.token_mask,
            )
        )
        for layer in sorted(set(before) & set(after))
    }


# ---------------------------------------------------------------------- specialisation


def specialisation(
    probe: Probe,
    experts: Mapping[int, np.ndarray],
    final: Mapping[int, np.ndarray] | None,
    n_experts: int,
    settings: Mapping[str, Any],
) -> dict[int, LayerSpecialisation]:
    """Per MoE layer, the field's metrics of ``experts[layer]`` (int [P, T, k]) on the probe's
    scored tokens, saturation against ``final[layer]`` (the run's final routing; None: NaN)."""
    return specialise_probe(
        probe,
        experts,
        final,
        n_experts,
        int(settings["null_permutations"]),
        int(settings["null_seed"]),
        int(settings.get("vocab_min_count", 10)),
    )


def expert_tokens(
    probe: Probe,
    experts: Mapping[int, np.ndarray],
    n_experts: int,
    settings: Mapping[str, Any],
    decode: Callable[[int], str] | None = None,
) -> dict[int, ExpertTokens]:
    """Per MoE layer, each expert's over-represented token ids (found on one half of the
    documents, checked on the other), decoded when ``decode`` is given."""
    out = {
        layer: expert_token_lists(
            probe.input_ids,
            probe.token_docs,
            probe.doc_domains,
            chosen,
            len(probe.domains),
            n_experts,
            min_count=int(settings.get("vocab_min_count", 10)),
            seed=int(settings["null_seed"]),
            mask=probe.token_mask,
        )
        for layer, chosen in sorted(experts.items())
    }
    if decode is None:
        return out
    return {
        layer: dataclasses.replace(lists, text=tuple(decode(int(i)) for i in lists.token_id))
        for layer, lists in out.items()
    }


def with_specialisation(
    results: list[CheckpointResult],
    routed: list[dict[int, np.ndarray]],
    probe: Probe,
    n_experts: int,
    settings: Mapping[str, Any],
    decode: Callable[[int], str] | None = None,
) -> list[CheckpointResult]:
    """The checkpoints' results with their specialisation metrics (saturation against the last
    one's routing) and, on the last, the per-expert token lists; ``routed``: each checkpoint's
    experts per layer (empty for a dense model)."""
    if not routed or not routed[-1]:
        return results
    final = routed[-1]
    out = [
        dataclasses.replace(r, specialisation=specialisation(probe, e, final, n_experts, settings))
        for r, e in zip(results, routed, strict=True)
    ]
    out[-1] = dataclasses.replace(
        out[-1], expert_tokens=expert_tokens(probe, final, n_experts, settings, decode)
    )
    return out


# ---------------------------------------------------------------------- one run


def _predates(added: Sequence[AddedSetting]) -> str:
    """The clause of a refusal naming the settings a run predates and the values it got."""
    if not added:
        return ""
    named = "; ".join(a.describe() for a in added)
    return f" (the run predates {named}: it was rebuilt with those values)"


def check_same_data(
    name: str, recorded: str | None, rebuilt: str | None, added: Sequence[AddedSetting] = ()
) -> None:
    """Refuse (one line) data whose content fingerprint differs from the run's own; ``added``:
    the settings the run predates (:func:`~moe_emergence.data.settings.as_made`), named."""
    if recorded is not None and rebuilt != recorded:
        raise UserError(
            f"{name}: the data here is not the data the run trained on (its checkpoint records "
            f"data fingerprint {recorded[:12]}, the data rebuilt here has {str(rebuilt)[:12]}: "
            f"other texts, tokenizer or held-out split){_predates(added)}, so its probe would "
            f"not be the training-time one; restore the run's data or point --hub-mirror, "
            f"--cache-dir and --tokenizer at it."
        )


def recorded_probe_digest(record: RunRecord) -> tuple[Path, str, bool] | None:
    """``(probe.json, its digest, whether that digest covers documents)`` of the run's
    training-time probe, when the run wrote one (one written before 962fedb has no
    ``block_documents`` and a digest of the blocks only: :attr:`Probe.blocks_digest`)."""
    if record.run_dir is None:
        return None
    folder = record.select(ProbeSettings.config_key("out_dir"))
    path = (Path(folder) if folder else record.run_dir / "routing") / PROBE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        return path, str(record["digest"]), "block_documents" in record
    except (ValueError, KeyError, TypeError):
        raise UserError(
            f"{path} is damaged (no probe digest in it): restore it, or delete it to analyse "
            f"without comparing the probe."
        ) from None


def check_same_probe(
    name: str, record: RunRecord, probe: Probe, added: Sequence[AddedSetting] = ()
) -> None:
    """Refuse (one line) a rebuilt probe whose digest differs from the training-time one;
    ``added`` as in :func:`check_same_data`."""
    found = recorded_probe_digest(record)
    if found is None:
        return
    path, digest, with_documents = found
    rebuilt = probe.digest if with_documents else probe.blocks_digest
    if digest != rebuilt:
        raise UserError(
            f"{name}: the probe rebuilt here differs from the training-time one ({path} records "
            f"digest {digest[:12]}, rebuilt {rebuilt[:12]}){_predates(added)}: the data or "
            f"the callbacks.routing_analysis settings changed; restore them."
        )


def rebuild_probe(
    name: str,
    loaded: LoadedCheckpoint,
    record: RunRecord,
    report_dir: Path,
    data_overrides: Mapping[str, Any] | None = None,
) -> tuple[MixedDomainDataModule, tuple[str, ...], dict[str, Any], Probe]:
    """The run's datamodule (its recorded data settings, ``data_overrides`` in place of
    ``hub_mirror``, ``cache_dir``, ``tokenizer``; its data report to ``report_dir``), its
    domains, its probe settings (:func:`probe_settings`) and its training-time probe, from the
    record of ``loaded`` (a checkpoint of the run) and ``record`` (the run's ``.hydra/``; an
    empty one without a run dir). One-line errors where the rebuilt data's fingerprint differs
    from the one ``loaded`` records, or the probe's digest from the run's ``routing/probe.json``."""
    recorded, added = as_made(loaded.data_settings)  # settings added since: the run's values
    settings = {**recorded, **(data_overrides or {})} if recorded else {}
    datamodule = load_data(name, settings, report_dir, loaded.data_fingerprint)
    domains = tuple(loaded.hparams.get("domains") or datamodule.domains)
    check_same_data(name, loaded.data_fingerprint, datamodule.data_fingerprint, added)
    found = probe_settings(record)
    probe = build_probe(
        datamodule,
        domains,
        found["train_sample_blocks"],
        found["held_out_blocks"],
        found["probe_seed"],
        found["size_matched"],
    )
    check_same_probe(name, record, probe, added)
    return datamodule, domains, found, probe


def checkpoint_expert_tokens(
    name: str,
    loaded: LoadedCheckpoint,
    record: RunRecord,
    report_dir: Path,
    device: torch.device,
    data_overrides: Mapping[str, Any] | None = None,
) -> tuple[Probe, dict[int, ExpertTokens]]:
    """The run's probe (:func:`rebuild_probe`) and, per MoE layer, the per-expert token lists
    of one MoE checkpoint on it (:func:`expert_tokens`, decoded with the run's tokenizer): the
    probe routed once in eval mode, as ``analyze`` lists its final checkpoint's."""
    datamodule, _, settings, probe = rebuild_probe(name, loaded, record, report_dir, data_overrides)
    model = loaded.model.to(device)
    routed = route_probe(model, probe, int(settings["batch_size"]), device)
    experts = {i: e.cpu().numpy() for i, e in routed.experts.items()}
    n_experts = next(iter(moe_layers(model).values())).n_experts
    tokenizer = datamodule.tokenizer
    lists = expert_tokens(probe, experts, n_experts, settings, lambda i: tokenizer.decode([i]))
    return probe, lists


def evaluate_run(
    run: RunCheckpoints,
    report_dir: Path,
    device: torch.device,
    on_checkpoint: Callable[[], None] = lambda: None,
    data_overrides: Mapping[str, Any] | None = None,
    knockout: bool = True,
) -> RunResult:
    """Every checkpoint of ``run`` (verified beforehand: :func:`verify_checkpoints`), oldest
    first, on the run's own probe and held-out split; ``on_checkpoint`` is called after each
    (a progress bar). The data report of the rebuilt data goes to ``report_dir``.
    ``data_overrides``: ``hub_mirror``, ``cache_dir``, ``tokenizer`` in place of the run's
    recorded ones (a key absent: the recorded; ``hub_mirror`` None: no mirror). The rebuilt
    data must have the fingerprint the run's checkpoint records, and the probe the digest of
    its ``routing/probe.json``. ``knockout``: also the final checkpoint's knock-out readings
    (:func:`~moe_emergence.analysis.knockout.knockout_effects`) where there is a held-out split."""
    final = load_checkpoint(run.checkpoints[-1], OPTION, require_moe=False)
    rebuilt = rebuild_probe(run.name, final, run.record, report_dir, data_overrides)
    datamodule, domains, settings, probe = rebuilt
    # All held-out blocks (the loss's set; the probe too, unless it is a subset or train_sample).
    held_out = build_probe(datamodule, domains) if datamodule.val_dataset is not None else None
    tokenizer = datamodule.tokenizer

    def decode(token_id: int) -> str:
        return tokenizer.decode([token_id])

    results, step0_experts, initial, intervals, routed = [], None, None, {}, []
    layers = moe_layers(final.model)
    n_experts = next(iter(layers.values())).n_experts if layers else 0
    for path in run.checkpoints:
        last = path == run.checkpoints[-1]
        loaded = final if last else load_checkpoint(path, OPTION, require_moe=False)
        result, experts = route_and_score(
            loaded, probe, held_out, settings, device, decode if last else None
        )
        results.append(result)
        routed.append(experts)
        if len(results) == 1 and result.step == 0 and experts:
            # the run's step 0: its identity, and its routing for the paired change interval
            step0_experts, initial = experts, initial_model_key(loaded.model, experts)
        elif last and step0_experts is not None and experts:
            intervals = change_intervals(probe, step0_experts, experts, n_experts, settings)
        on_checkpoint()
    readings = []
    if knockout and layers and held_out is not None:  # the causal test: final, held-out set
        readings = knockout_effects(
            final.model,
            held_out,
            int(settings["batch_size"]),
            device,
            n_draws=int(settings["null_permutations"]),
            seed=int(settings["null_seed"]),
        )
    results = with_specialisation(results, routed, probe, n_experts, settings, decode)
    return RunResult(
        name=run.name,
        run_dir=run.run_dir or run.checkpoints[0].parent,
        group=group_of(run.record.overrides),
        seed=trained_seed(run.name, final, run.record.seed),
        overrides=run.record.overrides,
        moe=bool(layers),
        domains=domains,
        layers=sorted(layers),
        n_experts=n_experts,
        probe=probe.kind,
        probe_blocks={d: int((probe.block_domains == i).sum()) for i, d in enumerate(domains)},
        checkpoints=results,
        dispatch=final.dispatch,
        nmi_change_intervals=intervals,
        initial_model=initial,
        null_permutations=int(settings["null_permutations"]),
        knockout=readings,
    )
