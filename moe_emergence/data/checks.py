"""Value checks shared by the data modules, and their error.

A leaf module (sources, tokenize, packing, dataset, cache, sample) says what is wrong with a
value in plain words, without a CLI flag or config key: :class:`SettingError` carries which
setting it is about, and the entry point that took the value (the CLI, the datamodule) names
its flag and key (:func:`moe_emergence.data.settings.naming_options`).
"""

from __future__ import annotations

from moe_emergence.errors import UserError
from moe_emergence.settings import is_int, is_number

__all__ = ["SettingError", "is_int", "is_number"]


class SettingError(UserError):
    """A bad value of the data setting ``field`` (a :class:`DataSettings` field name), said
    plainly; where the value entered, its flag and config key are put in front."""

    field: str | None = None

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        if field is not None:
            self.field = field
