"""The lock (requirements/lock.txt, written by `make lock`) agrees with pyproject.toml: every
direct dependency, runtime and dev, is pinned at a version its range allows; torch is pinned to
the release the Makefile installs, with the requirements of its CPU build and no CUDA package;
and `make install` installs from the lock (and again when the lock changes), or from the ranges
with `LOCK=`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"
LOCK_SETTINGS = ROOT / "requirements" / "lock.toml"
TORCH = "2.13.0"
CUDA_ONLY = re.compile(r"nvidia-.*|cuda-.*|triton")  # what PyPI's Linux torch adds to the CPU one


def locked() -> dict[str, list[Requirement]]:
    """Canonical name -> the lock's pins of it (several under different markers, e.g. one per
    Python version, in a universal lock)."""
    pins: dict[str, list[Requirement]] = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith(("#", " ")):
            req = Requirement(line)
            pins.setdefault(canonicalize_name(req.name), []).append(req)
    return pins


def pinned_version(req: Requirement) -> Version:
    (spec,) = req.specifier
    assert spec.operator == "==", f"{req}: not an exact pin"
    return Version(spec.version)


def direct_dependencies() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [
        Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]
    ]


def test_every_direct_dependency_is_pinned_in_its_range():
    pins = locked()
    deps = direct_dependencies()
    assert {"torch", "lightning", "transformers", "pytest", "tensorboard"} <= {d.name for d in deps}
    for dep in deps:
        entries = pins.get(canonicalize_name(dep.name))
        assert entries, f"{dep.name} is not in {LOCK.name}: run make lock"
        for entry in entries:
            version = pinned_version(entry)
            assert dep.specifier.contains(version, prereleases=True), (
                f"{LOCK.name} pins {entry}, outside pyproject.toml's {dep}: run make lock"
            )
        here = [e for e in entries if e.marker is None or e.marker.evaluate()]
        assert len(here) == 1, f"{dep.name}: {len(here)} pins apply to this Python"


def test_every_pin_is_exact_and_once_per_environment():
    for name, entries in locked().items():
        for entry in entries:
            pinned_version(entry)
        here = [e for e in entries if e.marker is None or e.marker.evaluate()]
        assert len(here) <= 1, f"{name}: {len(here)} pins apply to this Python"


def test_torch_is_the_release_the_makefile_installs_without_cuda_packages():
    (torch,) = locked()["torch"]
    assert pinned_version(torch) == Version(TORCH)
    spec = re.search(r"^TORCH_SPEC \?= (.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert spec and spec.group(1) == f"torch=={TORCH}"
    cuda = sorted(name for name in locked() if CUDA_ONLY.fullmatch(name))
    assert not cuda, f"CUDA packages in the lock: {cuda} (see requirements/lock.toml)"
    settings = tomllib.loads(LOCK_SETTINGS.read_text())
    assert settings["constraint-dependencies"] == [f"torch=={TORCH}"]
    (torch_metadata,) = settings["dependency-metadata"]
    assert (torch_metadata["name"], torch_metadata["version"]) == ("torch", TORCH)


def test_the_lock_settings_hold_the_cpu_torch_wheels_requirements():
    installed = Version(metadata.version("torch"))
    if (installed.public, installed.local) != (TORCH, "cpu"):
        pytest.skip(f"torch {installed} installed, not the CPU build of {TORCH}")
    (torch_metadata,) = tomllib.loads(LOCK_SETTINGS.read_text())["dependency-metadata"]
    written = {str(Requirement(r)) for r in torch_metadata["requires-dist"]}
    assert written == {str(Requirement(r)) for r in metadata.requires("torch")}


# ---------------------------------------------------------------------- the Makefile's install


def dry_install(folder: Path, *args: str) -> str:
    """`make -n install` with the repo's Makefile in ``folder`` (its own pyproject.toml, lock
    and venv stand-ins, whose times the test sets): the commands make would run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    done = subprocess.run(
        ["make", "-n", "-f", str(ROOT / "Makefile"), "install", *args],
        cwd=folder,
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return done.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_install_installs_from_the_lock_and_again_when_it_changes(tmp_path):
    files = ["pyproject.toml", "requirements/lock.txt", ".venv/bin/python"]
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
        os.utime(tmp_path / name, (100, 100))
    stamp = tmp_path / ".venv" / ".installed-locked"
    stamp.write_text("")
    os.utime(stamp, (200, 200))
    assert "pip install" not in dry_install(tmp_path)  # installed after its inputs: up to date

    os.utime(tmp_path / "requirements/lock.txt", (300, 300))  # a new lock: install again
    commands = dry_install(tmp_path).splitlines()
    pip = [c.split("pip install --quiet ", 1)[1] for c in commands if "pip install" in c]
    assert pip == ["--upgrade pip", f"torch=={TORCH}", "-r requirements/lock.txt", "--no-deps -e ."]

    commands = dry_install(tmp_path, "LOCK=").splitlines()  # the escape hatch: the ranges
    pip = [c.split("pip install --quiet ", 1)[1] for c in commands if "pip install" in c]
    assert pip == ["--upgrade pip", f"torch=={TORCH}", '-e ".[dev]"']
