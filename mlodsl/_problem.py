"""``@problem``: a loss function becomes a :class:`Problem` of a multilevel program."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Union

import torch
from attrs import frozen
from torch import nn

from compiler.ir import SourceLoc
from mlodsl import _bindings
from mlodsl._check import public
from compiler import errors
from mlodsl._hypergrad import REGISTRY, HypergradMethod, UnknownMethod, resolve_method

Hook = Callable[[nn.Module], Any]
UpperRef = Union["Problem", str]


def source_loc(fn: Callable) -> SourceLoc:
    """``file:line`` of a function, relative to the working directory when inside it."""
    code = fn.__code__
    path = code.co_filename
    try:
        rel = os.path.relpath(path)
        path = rel if not rel.startswith("..") else path
    except ValueError:
        pass
    return SourceLoc(file=path, line=code.co_firstlineno)


@frozen
class Options:
    """Per-problem training options.

    ``clip_grad_norm``: clip the total gradient (direct + hypergradient) to this
    norm before each optimizer step. ``grad_accumulation``: each step averages
    the gradients of this many batches. ``warmup``: the problem does not step
    during the program's first ``warmup`` iterations (an upper problem then
    starts after its lowers' first steps). ``roll_back``: after an upper problem
    steps, restore this (lower) problem's parameters, buffers and optimizer
    state to where they were when its last round of ``steps`` began.
    """

    clip_grad_norm: float | None = None
    grad_accumulation: int = 1
    warmup: int = 0
    roll_back: bool = False


class Problem:
    """One optimization problem: θ (``module``), its loss, optimizer, data and place in the hierarchy.

    Inside a loss, ``problem(x)`` calls ``problem.module`` with the parameters
    the runtime binds for that evaluation; outside a program it is a plain call.
    """

    def __init__(self, fn: Callable, *, module: nn.Module, optimizer: torch.optim.Optimizer,
                 data: Iterable | None, upper: Sequence[UpperRef], hypergrad: HypergradMethod,
                 steps: int, scheduler: Any, name: str, uses: Sequence[UpperRef],
                 options: Options = Options()) -> None:
        self.fn = fn
        self.module = module
        self.optimizer = optimizer
        self.data = data
        self.upper = (upper,) if isinstance(upper, str) else tuple(upper)  # upper="name" too
        self.hypergrad = hypergrad
        self.steps = steps
        self.scheduler = scheduler
        self.name = name
        self.uses = (uses,) if isinstance(uses, str) else tuple(uses)
        self.options = options
        self._named_params: list[tuple[str, nn.Parameter]] | None = None
        self._params: list[nn.Parameter] = []
        self._param_names: list[str] = []
        self.loc = source_loc(fn)
        self.hooks: dict[str, list[Hook]] = {"after_step": [], "before_unroll": [], "after_unroll": []}
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    # -- what a loss sees ------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        bindings = _bindings.current()
        if bindings is not None and self not in bindings.table:
            raise bindings.escaped(self)
        return self.module(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Problem {self.name!r} at {self.loc}>"

    # -- parameters θ ----------------------------------------------------------
    @property
    def named_params(self) -> list[tuple[str, nn.Parameter]]:
        """The trainable parameters θ (``requires_grad=True``), in module order.

        Read once and cached (``Program`` refreshes it when it compiles), so that
        the hot loop does not walk the module tree; call :meth:`refresh_params`
        after freezing or unfreezing parameters of a compiled problem.
        """
        if self._named_params is None:
            self.refresh_params()
        return self._named_params  # type: ignore[return-value]

    def refresh_params(self) -> None:
        self._named_params = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        self._params = [p for _, p in self._named_params]
        self._param_names = [n for n, _ in self._named_params]

    @property
    def params(self) -> list[nn.Parameter]:
        if self._named_params is None:
            self.refresh_params()
        return self._params

    @property
    def param_names(self) -> list[str]:
        if self._named_params is None:
            self.refresh_params()
        return self._param_names

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # -- hooks -----------------------------------------------------------------
    def after_step(self, fn: Hook) -> Hook:
        """Register ``fn(module)`` to run after each optimizer step (e.g. clamp or project)."""
        self.hooks["after_step"].append(fn)
        return fn

    def before_unroll(self, fn: Hook) -> Hook:
        """Register ``fn(module)`` to run before each round of ``steps`` (e.g. re-initialise)."""
        self.hooks["before_unroll"].append(fn)
        return fn

    def after_unroll(self, fn: Hook) -> Hook:
        """Register ``fn(module)`` to run after each round of ``steps``."""
        self.hooks["after_unroll"].append(fn)
        return fn

    def run_hooks(self, kind: str) -> None:
        for hook in self.hooks[kind]:
            with torch.no_grad():
                hook(self.module)


@public
def problem(*, module: nn.Module, optimizer: torch.optim.Optimizer, data: Iterable | None = None,
            upper: Sequence[Problem | str] = (), hypergrad: HypergradMethod | str | None = None,
            steps: int = 1, scheduler: Any = None, name: str | None = None,
            uses: Sequence[Problem | str] = (), clip_grad_norm: float | None = None,
            grad_accumulation: int = 1, warmup: int = 0, roll_back: bool = False
            ) -> Callable[[Callable], Problem]:
    """Turn a loss function into a :class:`Problem` (DESIGN §1).

    ``module`` holds θ; ``optimizer`` is built on its parameters; ``data`` is any
    iterable of batches, cycled forever (``None``: the loss takes no argument);
    ``upper`` are the problems one level above; ``hypergrad`` says how gradients
    pass through this problem's solution (default ``FiniteDifference()``);
    ``steps`` optimizer steps are taken before each step of the upper problems;
    ``scheduler`` is stepped with the optimizer; ``uses`` declares references
    the loss's code does not show. ``clip_grad_norm``, ``grad_accumulation``,
    ``warmup`` and ``roll_back`` are described in :class:`Options`.
    """
    options = Options(clip_grad_norm=clip_grad_norm, grad_accumulation=grad_accumulation,
                      warmup=warmup, roll_back=roll_back)

    def decorate(fn: Callable) -> Problem:
        method = _method_for(fn, hypergrad)
        _check_options(fn, options)
        return Problem(fn, module=module, optimizer=optimizer, data=data, upper=upper,
                       hypergrad=method, steps=steps, scheduler=scheduler,
                       name=name or fn.__name__, uses=uses, options=options)

    return decorate


def _method_for(fn: Callable, spec: HypergradMethod | str | None) -> HypergradMethod:
    try:
        return resolve_method(spec)
    except UnknownMethod as e:
        fix = f"did you mean {e.suggestion!r}?" if e.suggestion else "pick one of the known names."
        raise errors.CompileError(errors.UNKNOWN_METHOD.format(
            name=getattr(fn, "__name__", "?"), loc=source_loc(fn), method=e.name,
            known=", ".join(sorted(REGISTRY)), fix=fix)) from None


def _check_options(fn: Callable, options: Options) -> None:
    checks = [("clip_grad_norm", options.clip_grad_norm is None or options.clip_grad_norm > 0, "a positive float"),
              ("grad_accumulation", options.grad_accumulation >= 1, "an int >= 1"),
              ("warmup", options.warmup >= 0, "an int >= 0")]
    for name, ok, expected in checks:
        if not ok:
            raise errors.CompileError(errors.BAD_OPTION.format(
                name=getattr(fn, "__name__", "?"), loc=source_loc(fn), option=name,
                value=getattr(options, name), expected=expected))
