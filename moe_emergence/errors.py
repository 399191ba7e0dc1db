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
    instantiate wraps the errors of constructors so), else None. Only explicit causes are
    followed: an error raised while handling a UserError is not one."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, UserError):
            return current
        seen.add(id(current))
        current = current.__cause__
    return None
