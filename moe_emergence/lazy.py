"""A package's exports imported on first use (PEP 562): importing a light module of the package
(its settings) then loads no torch, transformers or Lightning (``train.py --help`` reads the
settings alone). A leaf: it imports nothing of the package."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str], names: Mapping[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps each exported name to the
    module that defines it (``module:attr`` where the name differs); ``names``: the package's
    own ``globals()``."""

    def getattr_(name: str) -> Any:
        where = exports.get(name)
        if where is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, _, attr = where.partition(":")
        return getattr(importlib.import_module(module), attr or name)

    def dir_() -> list[str]:
        return sorted([*names, *exports])

    return getattr_, dir_
