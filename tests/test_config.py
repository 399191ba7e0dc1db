"""The Hydra config tree: every option of every group composes and instantiates the datamodule;
overrides land on the documented keys; bad values fail before any data is read."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers.script import assert_one_error_line, run_train
from hydra.errors import HydraException, MissingConfigException
from hydra.utils import instantiate

from moe_emergence.config import (
    MAX_DIR_NAME,
    check_group_overrides,
    check_moe_node,
    compose_config,
    config_dir,
    path_safe,
)
from moe_emergence.data import datamodule as datamodule_module
from moe_emergence.data.datamodule import MixedDomainDataModule
from moe_emergence.errors import UserError

CONF = config_dir()
GROUPS = [
    "data/size",
    "data/balance",
    "data/domains",
    "model",
    "trainer",
    "logger",
    "paths",
    "callbacks",
    "experiment",
    "condition",
]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture
def no_data_reads(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("configuration errors must fire before any data is read")

    monkeypatch.setattr(datamodule_module, "prepare_domains", fail)


def test_every_group_has_options():
    for group in GROUPS:
        assert options(group), group
    assert options("data/size") == ["10mb", "1mb", "5mb"]
    assert options("trainer") == ["cpu", "ddp", "default", "gpu"]
    assert {"gpt2_moe", "tiny_moe", "dense"} <= set(options("model"))


@pytest.mark.parametrize(
    "override", [f"{g}={o}" for g in GROUPS for o in options(g)], ids=lambda s: s
)
def test_every_option_composes_and_instantiates_the_datamodule(override, no_data_reads):
    cfg = compose_config([override])
    dm = instantiate(cfg.data)
    assert isinstance(dm, MixedDomainDataModule)
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    assert cfg.model._target_.endswith("MoEGPT2Module")
    assert dm.settings.seed == cfg.seed


def test_documented_overrides_set_their_keys():
    cfg = compose_config(["data/size=10mb", "data.balance_tokens=true"])
    assert cfg.data.size_mb == 10 and cfg.data.balance_tokens is True
    cfg = compose_config(["data/size=1mb", "data/balance=on", "data.block_size=128", "seed=7"])
    assert (cfg.data.size_mb, cfg.data.balance_tokens, cfg.data.block_size) == (1, True, 128)
    assert cfg.data.seed == 7  # follows the top-level seed
    cfg = compose_config(["data/balance=off", "data.seed=3"])
    assert cfg.data.balance_tokens is False and cfg.data.seed == 3 and cfg.seed == 42
    defaults = compose_config([]).data
    assert (defaults.size_mb, defaults.block_size, defaults.max_example_chars) == (10, 512, 10000)
    assert defaults.eval_fraction == 0.0 and defaults.tokenizer == "gpt2"


def test_hub_mirror_defaults_to_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MOE_HUB_MIRROR", str(tmp_path))
    cfg = compose_config([])
    assert cfg.data.hub_mirror is None  # read by the package, not by composing
    assert instantiate(cfg.data).settings.hub_mirror == str(tmp_path)


def test_experiment_is_a_diff_of_the_defaults():
    cfg = compose_config(["experiment=tiny_cpu"])
    assert cfg.model.pretrained is None and cfg.trainer.accelerator == "cpu"
    assert cfg.data.size_mb == 1 and cfg.data.block_size == 128


def test_unknown_size_lists_the_options():
    with pytest.raises(MissingConfigException) as excinfo:
        compose_config(["data/size=2mb"])
    message = str(excinfo.value)
    assert "Available options in 'data/size'" in message
    for option in ("1mb", "5mb", "10mb"):
        assert option in message


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("data.balance_tokens=off", "data.balance_tokens"),
        ("data.size_mb=-1", "data.size_mb"),
        ("data.block_size=1", "data.block_size"),
        ("data.max_example_chars=150", "data.max_example_chars"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.eval_fraction=1.5", "data.eval_fraction"),
        ("data.source=sample_text", "data.source"),
        ("+data.bogus_key=1", "bogus_key"),
    ],
)
def test_typed_config_errors_name_the_key_before_reading_data(override, named, no_data_reads):
    cfg = compose_config([override])
    with pytest.raises(HydraException) as excinfo:
        instantiate(cfg.data)
    assert named in str(excinfo.value)


def test_unknown_key_without_plus_is_refused_at_compose():
    with pytest.raises(HydraException, match="bogus_key"):
        compose_config(["data.bogus_key=1"])


def test_data_and_model_nodes_need_no_hydra_runtime():
    cfg = compose_config(["model=tiny_moe"])
    from omegaconf import OmegaConf

    OmegaConf.to_container(cfg.data, resolve=True)
    assert "hydra:" not in OmegaConf.to_yaml(cfg.model)


def test_config_dir_is_the_repos_conf():
    assert Path(__file__).resolve().parents[1] / "conf" == CONF


NOTEBOOK = """
import sys

import moe_emergence
assert "torch" not in sys.modules  # importing the package registers nothing, loads nothing
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

with initialize_config_dir(config_dir=sys.argv[1], version_base="1.3"):
    cfg = compose("config", overrides=sys.argv[2:])
dm = instantiate(cfg.data)
dm.prepare_data()
dm.setup("fit")
batch = next(iter(dm.train_dataloader()))
print("batch", tuple(batch["input_ids"].shape), type(dm).__name__)
"""


def test_hydras_own_compose_api_composes_conf_in_a_fresh_process(sample_cache, tmp_path):
    """A notebook's Hydra (initialize_config_dir + compose + instantiate(cfg.data), one batch)
    in a fresh interpreter: the groups' base nodes (data/settings, ...) are registered by the
    package conf/config.yaml's hydra.searchpath names, not by anything the notebook calls."""
    import subprocess
    import sys

    overrides = [
        "data/domains=sample",
        "data.size_mb=0.05",
        "data.block_size=64",
        "data.batch_size=2",
        "data.show_progress=false",
        f"data.cache_dir={sample_cache}",
    ]
    proc = subprocess.run(
        [sys.executable, "-c", NOTEBOOK, str(CONF), *overrides],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "batch (2, 64) MixedDomainDataModule" in proc.stdout


REFERENCE = {  # experiment -> (top_k or None for dense, lb_coef)
    "moe_main": (1, 0.01),
    "dense_baseline": (None, 0.01),
    "no_lb": (1, 0.0),
    "top2": (2, 0.01),
}


@pytest.mark.parametrize("experiment", sorted(REFERENCE))
def test_reference_experiments_carry_the_studys_settings(experiment):
    cfg = compose_config([f"experiment={experiment}"])
    top_k, lb_coef = REFERENCE[experiment]
    assert (cfg.model.moe.top_k if cfg.model.moe else None) == top_k
    assert cfg.model.lb_coef == lb_coef and cfg.model.z_coef == 0.001
    assert cfg.model.pretrained == "gpt2" and cfg.model.optimizer.lr == 5e-5
    assert (cfg.data.size_mb, cfg.data.balance_tokens, cfg.data.block_size) == (10, True, 512)
    assert cfg.data.eval_fraction == 0.05
    effective_batch = cfg.data.batch_size * cfg.trainer.accumulate_grad_batches
    assert effective_batch * cfg.trainer.devices == 8
    assert cfg.trainer.max_steps == 10_000 and cfg.model.warmup_steps == 1_000
    assert cfg.trainer.val_check_interval == 200
    assert cfg.callbacks.routing_analysis.every_n_steps == 200
    assert cfg.callbacks.model_checkpoint.every_n_train_steps == 500
    if top_k is not None:
        assert cfg.model.moe.layers == [8, 9, 10, 11] and cfg.model.moe.n_experts == 8
        assert cfg.model.moe.noise_std == 0.1
        assert cfg.model.moe.noise_anneal_steps == cfg.trainer.max_steps // 4


GPU_TWIN = {"top1": "moe_main", "dense": "dense_baseline", "no_lb": "no_lb", "top2": "top2"}


@pytest.mark.parametrize("condition", sorted(GPU_TWIN))
def test_study_cpu_conditions_are_one_override_each(condition):
    cfg = compose_config(["experiment=study_cpu", f"condition={condition}"])
    reference = compose_config([f"experiment={GPU_TWIN[condition]}"])
    assert (cfg.model.moe is None) == (reference.model.moe is None)
    if cfg.model.moe is not None:
        assert cfg.model.moe.top_k == reference.model.moe.top_k
    assert cfg.model.lb_coef == reference.model.lb_coef
    assert cfg.model.n_embd == 128 and cfg.data.source == "sample"  # the same tiny width


def test_sweep_folder_names_stay_short_and_unique():
    short = "condition=top1,data-size=1mb"
    assert path_safe(short) == short
    assert path_safe("data/size=1mb") == "data-size=1mb"
    many = ",".join(f"callbacks.routing_analysis.key_{i}={i}" for i in range(20))
    other = many.replace("key_19=19", "key_19=20")
    assert len(path_safe(many).encode()) <= MAX_DIR_NAME
    assert path_safe(many).startswith(many[:100]) and path_safe(many) != path_safe(other)
    assert path_safe(many) == path_safe(many)  # the same overrides, the same folder


@pytest.mark.parametrize("value", ["null", "[dense,top2]", ""])
def test_a_condition_that_is_not_one_is_refused_before_composing(value, tmp_path):
    with pytest.raises(UserError, match=rf"condition={re.escape(value)}: a run has one condition"):
        check_group_overrides(["experiment=demo", f"condition={value}"])
    check_group_overrides(["condition=top2", "-m", "condition=top1,dense"])  # one, or a sweep
    proc = run_train(f"condition={value}", cwd=tmp_path)
    assert proc.returncode == 1
    assert_one_error_line(proc.stderr, "a run has one condition", "-m condition=")


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs Linux's /sys (no folder can be made)")
@pytest.mark.parametrize("override", ["hydra.run.dir=/sys/moe_run", "paths.output_dir=/sys/moe"])
def test_a_run_folder_that_cannot_be_written_is_one_line(override, tmp_path):
    proc = run_train("experiment=demo", override, cwd=tmp_path)
    assert proc.returncode == 1
    assert_one_error_line(proc.stderr, "/sys/moe", "cannot be written", "pass a writable folder")


@pytest.mark.parametrize(
    ("overrides", "refresh"),
    [
        ([], 10),  # 2,000 steps: every log_every_n_steps
        (["trainer.max_steps=5"], 1),  # a short run's bar moves at every step
        (["trainer.max_steps=50"], 5),
        (["trainer.max_steps=-1"], 10),  # bounded by epochs
        (["trainer.max_steps=5", "trainer.log_every_n_steps=1"], 1),
        (["experiment=demo", "trainer.max_steps=30"], 3),
    ],
)
def test_the_progress_bar_refreshes_on_short_runs(overrides, refresh):
    """#29 item 8: the bar refreshed every trainer.log_every_n_steps (10), so a run of fewer
    steps never moved it; now at most a tenth of trainer.max_steps apart."""
    cfg = compose_config(overrides)
    assert cfg.callbacks.progress_bar.refresh_rate == refresh
    assert instantiate(cfg.callbacks.progress_bar).refresh_rate == refresh


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["condition=dense", "+model.moe.top_k=2"], ["model.moe.top_k=2", "condition=top1,top2"]),
        (
            ["-m", "condition=top1,dense", "model.moe.lb_coef=0.1"],
            ["model.moe.lb_coef=0.1", "-m condition=top1 model.moe.lb_coef=0.1"],
        ),
    ],
)
def test_an_moe_setting_beside_the_dense_condition_names_the_conflict(args, needles, tmp_path):
    """#29 item 8: was 'MoE layer index 8 is out of range' (alone) or Hydra's 'Key ... is not in
    struct' refusing the whole sweep with a '+' hint that would build MoE layers."""
    with pytest.raises(UserError, match="condition=dense has no MoE layers"):
        check_group_overrides(args)
    check_group_overrides(["-m", "condition=top1,top2", "model.moe.lb_coef=0.1"])  # no dense
    check_group_overrides(["condition=dense", "model.n_layer=2"])  # not an MoE setting
    proc = run_train(*args, cwd=tmp_path)
    assert proc.returncode == 1
    assert_one_error_line(proc.stderr, "condition=dense has no MoE layers", *needles)
    # composed without train.py's first check (notebooks, compose_config + train): the same
    with pytest.raises(UserError, match=r"with condition=dense, drop the model\.moe override"):
        check_moe_node(compose_config(["condition=dense", "+model.moe.top_k=2"]))
