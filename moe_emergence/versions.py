"""The versions a result was made with: Python and the libraries that shape the tokens, the model
and the training. One list, recorded in two places: the token cache's ``manifest.json`` and a
run's ``summary.json`` (both as ``library_versions``).

A leaf (it imports nothing from the package), like :mod:`moe_emergence.files`.
"""

from __future__ import annotations

import contextlib
import platform
from importlib.metadata import PackageNotFoundError, version

# Distribution names (as pip knows them), in the order they are recorded after "python".
RECORDED = (
    "moe_emergence",
    "torch",
    "lightning",
    "transformers",
    "tokenizers",
    "datasets",
    "hydra-core",
    "omegaconf",
    "numpy",
    "scipy",
)


def library_versions() -> dict[str, str]:
    """``{"python": "3.11.7", "torch": "2.13.0+cpu", ...}``: the running Python and the installed
    version of each of :data:`RECORDED` (one that is not installed is left out)."""
    out = {"python": platform.python_version()}
    for name in RECORDED:
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out
