"""The sweep summary's groups and how they pair: a group's condition and other overrides, its
dense twin, its frozen-router (primary) twin, whether it is MoE or a reference router, each
run's step 0, the seeds two groups share, and the initial models (step 0s) groups share."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from moe_emergence.analysis.results import (
    CONDITION_KEY,
    CheckpointResult,
    RunResult,
    split_override,
)
from moe_emergence.analysis.summary_rows import InitialModel

LEARNED = "top1"  # the primary contrast: LEARNED minus FROZEN, paired by seed
FROZEN = "frozen_router"
DOMAIN_ROUTER = "domain_router"  # the upper bound every MoE condition is read as a share of
REFERENCE_ROUTERS = ("hash_router", DOMAIN_ROUTER)  # routing fixed by construction
TWIN_FREE_KEYS = ("condition", "model", "experiment")  # and every key under ``model.``
STEP0_PREFIX = "step 0: "


def _parse_overrides(overrides: Sequence[str]) -> dict[str, str]:
    """``key=value`` strings as a dict of bare keys (:func:`split_override`)."""
    return dict(split_override(item) for item in overrides)


def condition_of(runs: Sequence[RunResult]) -> str | None:
    """The group's ``condition`` override (None when it sets none)."""
    return _parse_overrides(runs[0].overrides).get(CONDITION_KEY)


def _others(runs: Sequence[RunResult]) -> dict[str, str]:
    """The group's overrides other than ``condition``."""
    found = _parse_overrides(runs[0].overrides)
    found.pop(CONDITION_KEY, None)
    return found


def _twin_free(key: str) -> bool:
    return key in TWIN_FREE_KEYS or key.startswith("model.")


def _differing_keys(a: Mapping[str, str], b: Mapping[str, str]) -> set[str] | None:
    """The keys on which two overrides differ (missing on one side counts), or None when one
    of them is not allowed to differ between an MoE group and its dense twin."""
    keys = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k) or (k in a) != (k in b)}
    return keys if all(_twin_free(k) for k in keys) else None


def dense_twins(
    groups: Mapping[str, Sequence[RunResult]],
) -> tuple[dict[str, str | None], list[str]]:
    """(MoE group -> its dense twin or None, warnings). A twin is a non-MoE group whose
    overrides differ only in ``condition``, ``model``, ``experiment`` or ``model.*`` keys; of
    several, the one with fewest differing keys; a tie: none, and a warning naming them."""
    overrides = {g: _parse_overrides(runs[0].overrides) for g, runs in groups.items()}
    dense = [g for g, runs in groups.items() if not is_moe(runs)]
    twins: dict[str, str | None] = {}
    warnings: list[str] = []
    for g, runs in groups.items():
        if not is_moe(runs):
            continue
        found = {d: _differing_keys(overrides[g], overrides[d]) for d in dense}
        found = {d: len(keys) for d, keys in found.items() if keys is not None}
        fewest = min(found.values(), default=None)
        best = [d for d, n in found.items() if n == fewest]
        twins[g] = best[0] if len(best) == 1 else None
        if len(best) > 1:
            warnings.append(
                f"group {g!r}: several dense twins equally close ({', '.join(map(repr, best))});"
                " no MoE - dense rows for it"
            )
    return twins, warnings


def condition_twin(
    g: str, groups: Mapping[str, Sequence[RunResult]], condition: str, sole: bool
) -> str | None:
    """The group of ``condition`` whose other overrides equal ``g``'s; when ``sole``, else the
    only group of that condition; None otherwise."""
    mine = _others(groups[g])
    found = [h for h, runs in groups.items() if condition_of(runs) == condition and h != g]
    same = [h for h in found if _others(groups[h]) == mine]
    if len(same) == 1:
        return same[0]
    return found[0] if sole and len(found) == 1 and not same else None


def primary_pairs(groups: Mapping[str, Sequence[RunResult]]) -> dict[str, tuple[str, str]]:
    """``"A - B"`` -> (A, B): each ``condition=top1`` MoE group A and the ``frozen_router``
    group B with the same other overrides."""
    pairs = {}
    for a, runs in groups.items():
        if condition_of(runs) == LEARNED and is_moe(runs):
            b = condition_twin(a, groups, FROZEN, sole=False)
            if b is not None and is_moe(groups[b]):
                pairs[f"{a} - {b}"] = (a, b)
    return pairs


def is_moe(runs: Sequence[RunResult]) -> bool:
    return any(run.moe for run in runs)


def is_reference(runs: Sequence[RunResult]) -> bool:
    """Whether the group is a reference router (hash, domain): routing fixed by construction,
    read beside the others but tested in no family."""
    return condition_of(runs) in REFERENCE_ROUTERS


def step0_of(run: RunResult) -> CheckpointResult | None:
    """The run's step-0 checkpoint (its first, when that is at step 0), else None."""
    first = run.checkpoints[0] if run.checkpoints else None
    return first if first is not None and first.step == 0 else None


def step_warnings(groups: Mapping[str, Sequence[RunResult]]) -> list[str]:
    out = []
    for g, runs in groups.items():
        steps = sorted({run.final.step for run in runs})
        if len(steps) > 1:
            out.append(
                f"group {g!r}: runs end at different steps {steps}; values are taken at each "
                "run's final checkpoint anyway"
            )
        missing = sum(step0_of(r) is None for r in runs)
        if is_moe(runs) and missing:
            out.append(
                f"group {g!r}: {missing} of {len(runs)} runs have no step-0 checkpoint; the "
                "step-0 and change rows rest on the others"
            )
    return out


def shared_seeds(a: Sequence[RunResult], b: Sequence[RunResult]) -> list[int] | None:
    """The seeds, sorted, when both groups have exactly the same seeds (each once, none
    missing): their runs pair by seed. Else None (unpaired)."""
    sa, sb = [r.seed for r in a], [r.seed for r in b]
    if None in sa or None in sb or len(set(sa)) != len(sa) or len(set(sb)) != len(sb):
        return None
    return sorted(sa) if set(sa) == set(sb) else None


# ----------------------------------------------------------------------------- step 0


def _model_key(run: RunResult) -> str:
    """The run's initial-model key; a run without one is its own."""
    return run.initial_model if run.initial_model is not None else f"run:{run.name}"


def initial_models(
    groups: Mapping[str, Sequence[RunResult]],
) -> dict[str, tuple[InitialModel, list[RunResult]]]:
    """Label ``"step 0: <g1> | <g2> ..."`` -> (the initial model, its runs: one per distinct
    :attr:`RunResult.initial_model` key, the first group's run, in seed order), over the MoE
    runs with a step-0 checkpoint. The groups of a label are those whose runs share its keys."""
    by_key: dict[str, list[tuple[str, RunResult]]] = {}
    for g, runs in groups.items():
        if is_moe(runs):
            for run in runs:
                if step0_of(run) is not None:
                    by_key.setdefault(_model_key(run), []).append((g, run))
    cohorts: dict[tuple[str, ...], list[RunResult]] = {}
    for members in by_key.values():
        names = tuple(dict.fromkeys(g for g, _ in members))
        cohorts.setdefault(names, []).append(members[0][1])
    out = {}
    for names, runs in sorted(cohorts.items()):
        runs = sorted(runs, key=lambda r: (r.seed is None, r.seed or 0, r.name))
        label = STEP0_PREFIX + " | ".join(names)
        reference = all(is_reference(groups[g]) for g in names)
        model = InitialModel(list(names), [r.name for r in runs], [r.seed for r in runs], reference)
        out[label] = (model, runs)
    return out
