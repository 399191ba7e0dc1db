"""``train.py --help``: every key with its default and help, without loading torch, Lightning or
transformers (the page is Hydra's, composed from conf/ and the settings classes)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import pytest
from helpers.script import REPO

from moe_emergence.analysis.settings import ProbeSettings
from moe_emergence.config import RUN_KEYS
from moe_emergence.data.settings import DataSettings, LoaderSettings
from moe_emergence.model.settings import ModelSettings, MoESettings

HEAVY = ("torch", "lightning", "transformers", "datasets")
SCRIPT = textwrap.dedent(
    f"""
    import runpy, sys
    sys.argv = ["train.py", "--help"]
    try:
        runpy.run_path({str(REPO / "train.py")!r}, run_name="__main__")
    except SystemExit:
        pass
    print("LOADED:", [m for m in {HEAVY!r} if m in sys.modules])
    """
)


def test_help_names_every_key_with_its_help_and_loads_no_framework():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "LOADED: []" in out  # the help page needs no framework: it shows in about a second
    keys = list(RUN_KEYS)
    for cls in (DataSettings, LoaderSettings, ModelSettings, MoESettings, ProbeSettings):
        for f in dataclasses.fields(cls):
            keys.append(cls.config_key(f.name))
            first_words = " ".join(f.metadata["help"].split()[:3])
            assert first_words in " ".join(out.split()), (f.name, first_words)
    lines = out.splitlines()
    for key in keys:
        assert any(line.startswith(f"{key}=") for line in lines), key
    assert "$MOE_HUB_MIRROR" in out and "$$" not in out  # Hydra's template: $ kept, once
    assert "== Configuration groups ==" in out and "condition: dense," in out


@pytest.mark.parametrize("module", ["moe_emergence.analyze", "moe_emergence.inspect"])
def test_the_analysis_entry_points_answer_help_without_loading_torch(module):
    script = textwrap.dedent(
        f"""
        import runpy, sys
        sys.argv = [{module!r}, "--help"]
        try:
            runpy.run_module({module!r}, run_name="__main__")
        except SystemExit:
            pass
        print("LOADED:", [m for m in {HEAVY!r} if m in sys.modules])
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: python -m " + module in proc.stdout and "LOADED: []" in proc.stdout
