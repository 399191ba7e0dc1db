"""Running the top-level ``train.py`` (in a subprocess or in-process), importing a script as it
runs (the benchmarks), and reading one-line errors."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

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


def train_in(root: Path, *args: str, cache_dir: Path | None = None) -> Path:
    """``python train.py <args>`` run in ``root`` (:func:`run_train`), which must exit 0 (the
    tail of its stderr shown if not), the token cache in ``cache_dir`` (default
    ``root/cache``) and the outputs in ``root/sweep`` with ``-m`` (Hydra's sweep folder), else
    in ``root/run``. Returns that outputs folder."""
    kind = "sweep" if "-m" in args else "run"
    out = root / kind
    cache = root / "cache" if cache_dir is None else cache_dir
    proc = run_train(*args, f"data.cache_dir={cache}", f"hydra.{kind}.dir={out}", cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


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


def load_script(path: Path, monkeypatch: pytest.MonkeyPatch, name: str | None = None) -> ModuleType:
    """The script at ``path`` imported as it runs (its own folder on sys.path, for the
    benchmarks' ``from machine import ...``), as module ``name`` (default: its stem)."""
    monkeypatch.syspath_prepend(str(path.parent))
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
