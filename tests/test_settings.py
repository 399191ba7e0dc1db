"""Every setting once: defaults live in the settings dataclasses, the YAML under conf/ holds
choices, and composing the config reads nothing outside conf/."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from moe_emergence.analysis.settings import ProbeSettings
from moe_emergence.config import compose_config, config_dir, settings_nodes, untrained_keys
from moe_emergence.data.settings import DataSettings, LoaderSettings
from moe_emergence.errors import UserError
from moe_emergence.model.settings import ModelSettings, MoESettings
from moe_emergence.settings import Settings, defaults

GROUPS: tuple[type[Settings], ...] = (
    DataSettings,
    LoaderSettings,
    ModelSettings,
    MoESettings,
    ProbeSettings,
)
# Option files of a choice group: each states its choice, and one of them is the default's.
CHOICE_GROUPS = ("data/size", "data/balance", "data/domains")


def setting_defaults() -> dict[str, Any]:
    """Config key -> default, for every setting of every group."""
    return {f"{g.PREFIX}.{k}": v for g in GROUPS for k, v in defaults(g).items()}


def leaves(node: Any, prefix: str) -> dict[str, Any]:
    if isinstance(node, dict):
        found: dict[str, Any] = {}
        for key, value in node.items():
            if key != "defaults":
                found |= leaves(value, f"{prefix}.{key}" if prefix else str(key))
        return found
    return {prefix: node}


def yaml_settings(path: Path) -> dict[str, Any]:
    """Config key -> value of every leaf a YAML file under conf/ sets (its ``@package``
    header, else its group, places it in the tree)."""
    text = path.read_text()
    relative = path.relative_to(config_dir()).parent.as_posix()
    package = relative.replace("/", ".") if relative != "." else ""
    if "# @package _global_" in text:
        package = ""
    elif header := [line for line in text.splitlines() if line.startswith("# @package ")]:
        package = header[0].removeprefix("# @package ").strip()
    return leaves(yaml.safe_load(text) or {}, package)


def test_no_yaml_file_restates_a_default():
    known = setting_defaults()
    restated = [
        f"{path.relative_to(config_dir())}: {key}={value!r} is the default"
        for path in sorted(config_dir().rglob("*.yaml"))
        if not path.parent.relative_to(config_dir()).as_posix().startswith(CHOICE_GROUPS)
        for key, value in yaml_settings(path).items()
        if key in known and value == known[key]
    ]
    assert not restated, "defaults written twice:\n" + "\n".join(restated)


def test_the_walk_finds_a_restated_default(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    (conf / "model").mkdir(parents=True)
    (conf / "config.yaml").write_text("defaults: []\n")
    (conf / "model" / "x.yaml").write_text("moe:\n  top_k: 1\nlb_coef: 0.5\n")
    monkeypatch.setenv("MOE_CONFIG_DIR", str(conf))
    assert yaml_settings(conf / "model" / "x.yaml") == {"model.moe.top_k": 1, "model.lb_coef": 0.5}
    with pytest.raises(AssertionError, match=r"model\.moe\.top_k=1 is the default"):
        test_no_yaml_file_restates_a_default()


def test_composed_nodes_hold_every_setting_and_only_those():
    cfg = compose_config([])
    wiring = {"_target_", "_convert_", "optimizer"}
    assert set(cfg.data) - {"_target_"} == set(DataSettings.names()) | set(LoaderSettings.names())
    assert set(cfg.model) - wiring == set(ModelSettings.names()) | {"moe"}
    assert set(cfg.model.moe) == set(MoESettings.names())
    assert set(settings_nodes()["model"]["moe"]) == set(MoESettings.names())
    assert set(cfg.callbacks.routing_analysis) - {"_target_"} == set(ProbeSettings.names())


def test_the_sweep_folder_names_leave_out_the_untrained_settings():
    """conf/config.yaml's exclude_keys are the keys marked untrained=True (and the root and
    trainer keys of config.UNTRAINED_KEYS): a setting added or unmarked there fails here."""
    conf = yaml.safe_load((config_dir() / "config.yaml").read_text())
    listed = conf["hydra"]["job"]["config"]["override_dirname"]["exclude_keys"]
    assert len(set(listed)) == len(listed) and set(listed) == untrained_keys()


@pytest.mark.parametrize("group", GROUPS, ids=lambda g: g.__name__)
def test_defaults_pass_their_own_checks(group):
    group().validate()
    assert all(f.metadata.get("help") for f in dataclasses.fields(group))


@pytest.mark.parametrize(
    ("group", "fields", "match"),
    [
        (ModelSettings, {"n_embd": 0}, r"^model\.n_embd must be an integer ≥ 1, got 0\.$"),
        (ModelSettings, {"compile": "yes"}, r"^model\.compile must be true or false"),
        (MoESettings, {"top_k": True}, r"^model\.moe\.top_k must be an integer"),
        (MoESettings, {"dispatch": "fast"}, r"^model\.moe\.dispatch must be one of"),
        (MoESettings, {"layers": [1, 1]}, r"^model\.moe\.layers: a layer index is listed twice"),
        (ModelSettings, {"n_embed": 8}, r"^Unknown setting\(s\) model\.n_embed: the model keys"),
    ],
)
def test_a_bad_value_names_its_key(group, fields, match):
    with pytest.raises(UserError, match=match):
        group.from_fields(fields)


def test_composing_reads_nothing_outside_conf(tmp_path):
    """No tokenizer is loaded and no file outside conf/ (and the Python installation) opened,
    even when the tokenizer, mirror and cache the config names do not exist."""
    missing = tmp_path / "absent"
    overrides = [
        f"data.tokenizer={missing / 'tokenizer'}",
        f"data.hub_mirror={missing / 'mirror'}",
        f"data.cache_dir={missing / 'cache'}",
        "experiment=demo",
    ]
    compose_config(overrides)  # imports and Hydra's own setup first
    opened: list[str] = []
    recording = [True]

    def hook(event: str, args: tuple) -> None:
        if recording[0] and event == "open" and isinstance(args[0], str | Path):
            opened.append(str(args[0]))

    sys.addaudithook(hook)  # an audit hook cannot be removed: it stops recording below
    try:
        cfg = compose_config(overrides)
    finally:
        recording[0] = False
    allowed = (str(config_dir().resolve()), sys.prefix, sys.base_prefix)
    outside = [p for p in opened if not str(Path(p).resolve()).startswith(allowed)]
    assert not outside, outside
    assert cfg.data.tokenizer == str(missing / "tokenizer")
    assert "vocab_size" not in cfg.model  # handed over by the wiring, not resolved
