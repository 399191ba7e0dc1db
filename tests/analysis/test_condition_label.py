"""Groups are shown by their condition's name (top-1, top-2, no LB, dense, global LB), with the
overrides every group shares left out and the others written readably; the group keys, which
grouping and the JSON use, stay the override strings. The sweep figures' legends and titles
show the names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moe_emergence.analysis import sweep_plots
from moe_emergence.analysis.results import (
    CheckpointResult,
    HeldOutLoss,
    RunResult,
    condition_label,
    condition_labels,
    group_overrides,
    group_runs,
    readable_override,
)
from moe_emergence.analysis.scores import LayerScores

STUDY = ["top1", "top2", "no_lb", "dense"]


@pytest.mark.parametrize(
    ("value", "name"),
    [
        ("top1", "top-1"),
        ("top2", "top-2"),
        ("no_lb", "no LB"),
        ("dense", "dense"),
        ("global_lb", "global LB"),
        ("something_new", "something_new"),
    ],
)
def test_each_condition_has_the_name_people_use(value, name):
    assert condition_label(f"condition={value}") == name
    assert readable_override(f"condition={value}") == name


def test_the_study_sweep_drops_the_experiment_every_group_shares():
    groups = [f"condition={c},experiment=study_cpu" for c in STUDY]
    assert condition_labels(groups) == dict(
        zip(groups, ["top-1", "top-2", "no LB", "dense"], strict=True)
    )


def test_items_that_differ_between_groups_are_appended_readably():
    groups = [
        "condition=top1,data.block_size=128,experiment=study_cpu",
        "condition=top1,data.block_size=256,experiment=study_cpu",
        "condition=dense,data/size=1mb,experiment=study_cpu",
    ]
    assert list(condition_labels(groups).values()) == [
        "top-1, block_size 128",
        "top-1, block_size 256",
        "dense, size 1mb",
    ]


def test_groups_without_a_condition_and_without_overrides():
    labels = condition_labels(["(no overrides)", "data.block_size=256", "~callbacks.x,seed_x=1"])
    assert list(labels.values()) == ["defaults", "block_size 256", "no x, seed_x 1"]
    # one group alone: everything is shared, so it keeps its items rather than show nothing
    assert condition_labels(["experiment=study_cpu"]) == {
        "experiment=study_cpu": "experiment study_cpu"
    }
    assert condition_labels(["condition=top2,experiment=study_cpu"]) == {
        "condition=top2,experiment=study_cpu": "top-2"
    }
    assert condition_labels([]) == {}


def test_a_value_with_commas_is_one_item():
    group = "condition=top2,model.moe.layers=[10,11],x='a,b'"
    assert group_overrides(group) == ["condition=top2", "model.moe.layers=[10,11]", "x='a,b'"]
    assert condition_label(group) == "top-2, layers [10,11], x 'a,b'"


def test_labels_that_would_coincide_show_their_keys():
    groups = ["condition=top1,data.seed=1", "condition=top1,model.seed=1"]
    assert condition_labels(groups) == {g: g for g in groups}


# ---------------------------------------------------------------------- the sweep figures


def _scores(nmi: float) -> LayerScores:
    fields = LayerScores.__dataclass_fields__
    return LayerScores(**{name: 0.0 for name in fields} | {"nmi": nmi, "null_p95": 0.05})


def _run(condition: str, seed: int) -> RunResult:
    group = f"condition={condition},experiment=study_cpu"
    moe = condition != "dense"
    counts = {2: np.array([[3, 1], [1, 3]], dtype=np.int64)} if moe else {}
    checkpoints = [
        CheckpointResult(
            step,
            counts=counts,
            scores={2: _scores(0.1 * step / 100)} if moe else {},
            losses={"code": HeldOutLoss(5.0 - step / 100, 100)},
        )
        for step in (0, 100)
    ]
    return RunResult(
        name=f"{condition}-{seed}",
        run_dir=Path("/nowhere"),
        group=group,
        seed=seed,
        overrides=group.split(","),
        moe=moe,
        domains=("code", "math"),
        layers=[2] if moe else [],
        n_experts=2,
        probe="held_out",
        probe_blocks={"code": 1, "math": 1},
        checkpoints=checkpoints,
    )


@pytest.fixture
def figures(monkeypatch):
    """The figures the sweep plots build, kept instead of saved."""
    built = []
    monkeypatch.setattr(sweep_plots, "save_figure", lambda fig, path: built.append(fig) or path)
    return built


def _legend_texts(fig) -> list[str]:
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def test_sweep_figures_name_conditions_not_overrides(figures):
    conditions = ("top1", "no_lb", "dense")
    results = [_run(c, seed) for c in conditions for seed in (1, 2)]
    keys = {f"condition={c},experiment=study_cpu" for c in conditions}
    assert set(group_runs(results)) == keys  # the keys stay the overrides

    sweep_plots.plot_sweep_emergence(results, "emergence.png")
    sweep_plots.plot_held_out_loss(results, "loss.png")
    sweep_plots.plot_sweep_heatmaps(results, "heatmaps.png")
    emergence, loss, heatmaps = figures
    assert sorted(_legend_texts(emergence)) == ["no LB", "top-1"]
    assert sorted(_legend_texts(loss)) == ["dense", "no LB", "top-1"]
    titles = [sub._suptitle.get_text() for sub in heatmaps.subfigs]
    assert titles == [
        "no LB, seed 1 (step 100)",
        "no LB, seed 2 (step 100)",
        "top-1, seed 1 (step 100)",
        "top-1, seed 2 (step 100)",
    ]
    shown = " ".join(_legend_texts(emergence) + _legend_texts(loss) + titles)
    assert "condition=" not in shown and "experiment" not in shown
