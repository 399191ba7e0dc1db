"""What a benchmark ran on: cores, CPU model, Python and package versions (for its JSON line)."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any


def machine_info(packages: Sequence[str], **extra: Any) -> dict[str, Any]:
    """``nproc``, ``cpu`` (the model name), ``python``, ``extra`` and each package's version
    (None when not installed)."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "nproc": len(os.sched_getaffinity(0)),
        **extra,
        "cpu": model,
        "python": platform.python_version(),
    }
    for package in packages:
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = None
    return info
