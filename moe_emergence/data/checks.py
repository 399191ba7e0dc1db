"""Value checks shared by the data modules, and their error.

A leaf module (sources, tokenize, packing, dataset, cache, sample) says what is wrong with a
value in plain words, without a CLI flag or config key: :class:`SettingError` carries which
setting it is about, and the entry point that took the value (the CLI, the datamodule) names
its flag and key (:func:`moe_emergence.data.settings.naming_options`).
"""

from __future__ import annotations

import numbers
from typing import Any

from moe_emergence.errors import UserError


def is_int(value: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class SettingError(UserError):
    """A bad value of the data setting ``field`` (a :class:`DataSettings` field name), said
    plainly; where the value entered, its flag and config key are put in front."""

    field: str | None = None

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        if field is not None:
            self.field = field
