"""The project's error for user mistakes (a bad value, a missing file, a changed setting).

Entry points (``train.py``, ``python -m moe_emergence.data``) print ``error: <message>`` and
exit non-zero without a traceback for it; every other exception keeps its traceback. The
message names the value or file and says how to fix it.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake the user can fix; the message says what and how (one line, no traceback).

    A ``ValueError`` so that code catching those keeps working."""


def user_error_in(exc: BaseException) -> UserError | None:
    """The UserError that ``exc`` is or was raised from (``raise ... from``: Hydra's
    instantiate wraps the errors of constructors so), else None. Explicit causes are followed,
    and the context of an OmegaConf interpolation error (a resolver's error, which OmegaConf
    re-raises without a cause); not the context of anything else: an error raised while
    handling a UserError is not one."""
    from omegaconf.errors import InterpolationResolutionError

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, UserError):
            return current
        seen.add(id(current))
        if current.__cause__ is None and isinstance(current, InterpolationResolutionError):
            current = current.__context__
        else:
            current = current.__cause__
    return None
