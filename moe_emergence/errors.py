"""The project's error for user mistakes (a bad value, a missing file, a changed setting), and
the one policy of its entry points for it.

Every entry point (``train.py``, ``python -m moe_emergence.data``, ``python -m
moe_emergence.analyze``, ``python -m moe_emergence.inspect``) runs its work through
:func:`report_user_errors`: a :class:`UserError` (or one that another exception was raised
from, :func:`user_error_in`) is printed as one line, ``error: <message>``, on stderr, and the
exit status is :data:`USER_ERROR_STATUS` (1); every other exception keeps its traceback. The
message names the value or file and says how to fix it. (A bad command-line flag caught by
argparse exits 2 with its usage line, before any work.)
"""

from __future__ import annotations

import sys
from collections.abc import Callable

USER_ERROR_STATUS = 1


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


def report_user_errors(work: Callable[[], object]) -> int:
    """Run ``work()``; the exit status: 0 when it returns, :data:`USER_ERROR_STATUS` after
    printing ``error: <message>`` on stderr when it raises a UserError or an exception raised
    from one (:func:`user_error_in`). Any other exception propagates with its traceback."""
    try:
        work()
    except Exception as exc:
        mistake = user_error_in(exc)
        if mistake is None:
            raise
        print(f"error: {mistake}", file=sys.stderr)
        return USER_ERROR_STATUS
    return 0
