"""Settings written once: each field's default, type, help text and check, and the config key
that names it in messages.

A settings group is a dataclass of :func:`setting` fields deriving from :class:`Settings`, whose
``PREFIX`` is its node in the Hydra config (``data``, ``model``, ``model.moe``,
``callbacks.routing``). From the fields follow: the checks (:meth:`Settings.validate`, one-line
errors naming the key), the config node's defaults (:func:`defaults`, registered as the group's
base config, so the YAML files hold choices only), and, for data, the CLI's flags. Where those
YAML files lie (:func:`config_dir`) is said here too.

A leaf module: it imports nothing of the package but its error.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Self

from moe_emergence.errors import UserError

CONFIG_ENV = "MOE_CONFIG_DIR"
CONFIG_NAME = "config"


def is_int(value: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(is_int(v) for v in value)


# A field type's (test, what a value must be, command-line parser).
Kind = tuple[Callable[[Any], bool], str, Callable[[str], Any] | None]

# Field type (as annotated) -> its Kind; a settings group adds its own types (Settings.KINDS).
KINDS: dict[str, Kind] = {
    "int": (is_int, "an integer", int),
    "float": (is_number, "a number", float),
    "bool": (lambda v: isinstance(v, bool), "true or false", None),
    "str": (lambda v: isinstance(v, str | os.PathLike), "a string", str),
    "list[int]": (_is_int_list, "a list of integers", None),
}


def kind(field: dataclasses.Field) -> tuple[str, bool]:
    """``("int" | "float" | "bool" | "str" | "list[int]", nullable)`` of a settings field."""
    names = [name.strip() for name in str(field.type).split("|")]
    return next(n for n in names if n != "None"), "None" in names


def setting(default: Any = dataclasses.MISSING, *, help: str, **check: Any) -> Any:
    """A settings field: its default (a callable ``factory=`` instead, read when built), its
    help text, and what its value must be beyond its type: ``low`` (≥), ``below`` (<),
    ``choices``, ``check`` (a function raising ValueError with a plain message). Any other
    keyword is a flag naming a list the field belongs to (e.g. ``probe=True``), read with
    :meth:`Settings.flagged`, so that such lists are written beside the fields alone."""
    factory = check.pop("factory", dataclasses.MISSING)
    return dataclasses.field(
        default=default, default_factory=factory, metadata={"help": help, **check}
    )


def problem(field: dataclasses.Field, value: Any, kinds: Mapping[str, Kind] = KINDS) -> str | None:
    """Why ``value`` does not fit ``field`` (" must be ..., got ..." or ": <check's message>"),
    or None when it fits; ``kinds``: the field types known (:attr:`Settings.KINDS`)."""
    name, nullable = kind(field)
    if value is None and nullable:
        return None
    test, what, _ = kinds[name]
    meta = field.metadata
    low, below, choices = meta.get("low"), meta.get("below"), meta.get("choices")
    if low is not None and below is not None:
        what += f" in [{low}, {below})"
    elif low is not None:
        what += f" ≥ {low}"
    if choices is not None:
        what = f"one of {list(choices)}"
    fits = (
        test(value)
        and (low is None or value >= low)
        and (below is None or value < below)
        and (choices is None or value in choices)
    )
    if not fits:
        return f" must be {what}{', or null' if nullable else ''}, got {value!r}."
    try:
        if "check" in meta:
            meta["check"](value)
    except ValueError as exc:
        return f": {exc}"
    return None


class Settings:
    """Base of a settings dataclass; ``PREFIX`` is its node in the config."""

    PREFIX: ClassVar[str] = ""
    KINDS: ClassVar[Mapping[str, Kind]] = KINDS  # the field types it knows

    @classmethod
    def config_key(cls, name: str) -> str:
        """The Hydra key of the setting ``name``: ``model.moe.top_k``."""
        return f"{cls.PREFIX}.{name}"

    @classmethod
    def option(cls, name: str, value: str | None = None) -> str:
        """How the user sets ``name`` in messages (the config key; with ``value``,
        ``key=value``)."""
        return cls.config_key(name) + (f"={value}" if value is not None else "")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

    @classmethod
    def flagged(cls, flag: str) -> tuple[str, ...]:
        """The names of the fields marked ``flag=True`` (:func:`setting`), in field order."""
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        return tuple(f.name for f in fields if f.metadata.get(flag))

    @classmethod
    def check(cls, name: str, value: Any) -> None:
        """Refuse ``value`` of the setting ``name`` by its field's own checks (a one-line
        UserError naming the key), for code handed one setting outside a settings object."""
        field = next(f for f in dataclasses.fields(cls) if f.name == name)  # type: ignore[arg-type]
        cls._refuse(field, value)

    @classmethod
    def _refuse(cls, field: dataclasses.Field, value: Any) -> None:
        found = problem(field, value, cls.KINDS)
        if found is not None:
            raise UserError(f"{cls.option(field.name)}{found}")

    def validate(self) -> Self:
        """Raise a UserError naming the key (and the fix) for the first bad value; return
        ``self``."""
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            self._refuse(field, getattr(self, field.name))
        return self

    def to_dict(self) -> dict[str, Any]:
        """Field -> value; a tuple (a default list) as a list, as the config holds it."""
        return {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(self).items()  # type: ignore[call-overload]
        }

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> Self:
        """Built from the keys of its config node (unknown keys: a one-line UserError naming
        the valid ones), then checked."""
        unknown = [key for key in fields if key not in cls.names()]
        if unknown:
            raise UserError(
                f"Unknown setting(s) {', '.join(map(cls.config_key, unknown))}: the "
                f"{cls.PREFIX} keys are {', '.join(cls.names())}."
            )
        return cls(**fields).validate()


def defaults(settings: type[Settings]) -> dict[str, Any]:
    """The group's default values, as its config node holds them (a factory's value is left
    out: it is read when the settings are built)."""
    found = {}
    for field in dataclasses.fields(settings):  # type: ignore[arg-type]
        if field.default is not dataclasses.MISSING:
            value = field.default
            found[field.name] = list(value) if isinstance(value, tuple) else value
    return found


def config_dir() -> Path:
    """``$MOE_CONFIG_DIR``, else the repo's ``conf/`` (beside the package)."""
    found = os.environ.get(CONFIG_ENV)
    path = Path(found) if found else Path(__file__).resolve().parents[1] / "conf"
    if not (path / f"{CONFIG_NAME}.yaml").is_file():
        raise FileNotFoundError(
            f"No {CONFIG_NAME}.yaml in '{path}'. Run from a clone of the repo (pip install -e .) "
            f"or set {CONFIG_ENV} to its conf/ folder."
        )
    return path
