"""Running the top-level ``train.py`` in-process, and reading its one-line errors."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load_train_script():
    spec = importlib.util.spec_from_file_location("train_script", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Loaded at collection: Lightning binds its log handler to the sys.stderr of its import, which
# inside a test would be a capture closed after it.
TRAIN_SCRIPT = _load_train_script()


def run_train(
    *args: str, cwd: Path, env_extra: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``python train.py <args>`` in a subprocess (Hydra multirun, clean stderr), its output
    captured as text."""
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_train_script(monkeypatch: pytest.MonkeyPatch, *overrides: str) -> int:
    """``python train.py <overrides>`` in this process (config from the repo's conf/); the
    exit status it ends with (the cases tested here all end in SystemExit)."""
    monkeypatch.setattr(sys, "argv", ["train.py", f"--config-path={REPO / 'conf'}", *overrides])
    with pytest.raises(SystemExit) as exit_info:
        TRAIN_SCRIPT.main()
    return exit_info.value.code


def assert_one_error_line(stderr: str, *needles: str) -> str:
    """``stderr`` has no traceback and exactly one ``error:`` line, holding every needle."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
