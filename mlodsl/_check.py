"""Run-time type checks at the public boundary (typeguard), with errors that teach."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from typeguard import TypeCheckError, typechecked

from compiler.errors import UsageError

F = TypeVar("F", bound=Callable)

# arguments whose check depends on their type alone (the public API has no Literal of these types)
_BY_TYPE = (type(None), bool, int, float)


def public(fn: F) -> F:
    """Type-check ``fn``'s arguments; a mismatch is a :class:`UsageError` naming the call.

    A call whose arguments (``self`` aside) are all None, bools, ints or floats, with the
    same types as an earlier call that passed, is not checked again: ``program.run(1)`` in
    a user's own loop would otherwise pay typeguard's ~60 µs at every iteration."""
    checked = typechecked(fn)
    where = fn.__qualname__.replace(".__init__", "")
    skip = 1 if next(iter(inspect.signature(fn).parameters), None) == "self" else 0
    passed: set[tuple[Any, ...]] = set()  # argument types of calls that passed

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        key = _types(args[skip:], kwargs)
        if key in passed:
            return fn(*args, **kwargs)
        try:
            out = checked(*args, **kwargs)
        except TypeCheckError as e:
            raise UsageError(f"{where}(): {e}. Pass a value of the expected type.") from None
        if key is not None:
            passed.add(key)
        return out

    return wrapper  # type: ignore[return-value]


def _types(args: tuple, kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
    """The arguments' types when each is one of ``_BY_TYPE`` (else None: check every call)."""
    if not all(type(v) in _BY_TYPE for v in (*args, *kwargs.values())):
        return None
    return (*map(type, args), *((k, type(v)) for k, v in kwargs.items()))
