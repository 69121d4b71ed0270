"""Run-time type checks at the public boundary (typeguard), with errors that teach."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

from typeguard import TypeCheckError, typechecked

from compiler.errors import UsageError

F = TypeVar("F", bound=Callable)


def public(fn: F) -> F:
    """Type-check ``fn``'s arguments; a mismatch is a :class:`UsageError` naming the call."""
    checked = typechecked(fn)
    where = fn.__qualname__.replace(".__init__", "")

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return checked(*args, **kwargs)
        except TypeCheckError as e:
            raise UsageError(f"{where}(): {e}. Pass a value of the expected type.") from None

    return wrapper  # type: ignore[return-value]
