"""``Program(..., compile=True)``: ``torch.compile`` on every problem's module, with a clean fallback.

Each module is compiled in place (``nn.Module.compile``), so a loss that calls
``classifier(x)`` runs the compiled forward, and autograd (including the
second-order sweeps of the implicit methods) runs through it. If compiling
fails anywhere — no C++ compiler for inductor on this CPU, an operator dynamo
cannot trace — the failing step is rolled back (as any failing step is), the
modules go back to eager, a warning says why, and the step is retried: a
program with ``compile=True`` never fails because of compilation.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch

from compiler import errors

COMPILE_FAILED = (
    "torch.compile failed on the modules of this program ({error}); they run eagerly from now on.\n"
    "Fix: nothing is needed; to find the cause, run torch.compile on the module alone, or pass "
    "compile=dict(backend='aot_eager') to rule out the code generator."
)


def apply(problems: Iterable[Any], options: dict[str, Any]) -> None:
    for p in problems:
        p.module.compile(**options)


def undo(problems: Iterable[Any]) -> None:
    for p in problems:
        p.module._compiled_call_impl = None


def is_compile_error(e: BaseException | None) -> bool:
    """Whether ``e`` (or what caused it) came from dynamo or a compiler backend."""
    while e is not None:
        module = type(e).__module__ or ""
        if module.startswith(("torch._dynamo", "torch._inductor", "torch._functorch")):
            return True
        e = e.__cause__ or e.__context__
    return False


def warn_fallback(e: BaseException) -> None:
    root = e
    while root.__cause__ is not None:
        root = root.__cause__
    warnings.warn(COMPILE_FAILED.format(error=f"{type(root).__name__}: {str(root).splitlines()[0][:200]}"),
                  errors.MlodslWarning, stacklevel=4)


__all__ = ["apply", "is_compile_error", "undo", "warn_fallback", "torch"]
