"""Which tensors each problem's module holds while a loss is evaluated.

Inside a loss, ``classifier(x)`` calls ``classifier.module``. The runtime
decides, per evaluation, with which parameters: the live ones (when they are
being differentiated), an override (θ ± εv in finite differences, θ_t in an
unrolled replay) or frozen ones (everything else: ``requires_grad`` is off for
the evaluation, so autograd builds no graph for parameters nobody differentiates). The modules are
re-parametrized for the whole evaluation, so a loss that reads
``classifier.module.weight`` directly (an L2 term) sees the same tensors as
``classifier(x)``. Outside a program, a problem call is a plain module call.

Buffers (BatchNorm's running statistics) change as a PyTorch user expects: in
train mode, by the forward passes of the loss of the problem that is stepping,
once per evaluation, as in a hand-written loop. Every other evaluation (the
lower losses a hypergradient method evaluates, finite differences, unrolled
replays, ``Program.gradient``) runs on copies of the buffers, so the running
statistics do not depend on which method computes the hypergradient.

Those other evaluations also run on a fork of torch's random generators: each
starts from the same state and leaves the generators as it found them. So the
two evaluations of a finite difference see the same dropout masks (else their
difference is noise divided by ε), and how many evaluations a method makes
does not change the random numbers training draws.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from compiler import errors
from torch.nn.utils.stateless import _reparametrize_module

if TYPE_CHECKING:
    from mlodsl._problem import Problem

T = TypeVar("T")
LIVE = None  # marker: call the module with its own parameters


class _Frozen:
    """Marker: the module's own parameters, with ``requires_grad`` off for the evaluation (no
    graph is built for them; cheaper than re-parametrizing the module with detached copies)."""

    def __repr__(self) -> str:
        return "FROZEN"


FROZEN = _Frozen()


class Bindings:
    """Parameters to call each reachable problem with, for loss evaluations of ``owner``.

    Immutable, so the runtime makes the few it needs (the direct evaluation of each problem,
    each lower evaluation of a hypergradient) once and reuses them; the parameters themselves
    are read from the problems at each evaluation, so freezing or unfreezing is seen.
    """

    __slots__ = ("owner", "table", "frozen", "overrides", "buffered")

    def __init__(self, owner: Problem, table: Mapping[Problem, Mapping[str, torch.Tensor] | None]) -> None:
        self.owner = owner
        self.table = table
        self.frozen = [q for q, params in table.items() if params is FROZEN]
        self.overrides = [(q.module, params) for q, params in table.items() if params is not LIVE and params is not FROZEN]
        self.buffered = [q.module for q in table if _buffered(q.module)]  # modules with buffers

    def escaped(self, problem: Problem) -> errors.ProblemError:
        """The error for a loss that calls a problem it cannot reach."""
        return errors.ProblemError(errors.ESCAPED_REFERENCE.format(
            name=self.owner.name, loc=self.owner.loc, other=problem.name))


_current: contextvars.ContextVar[Bindings | None] = contextvars.ContextVar("mlodsl_bindings", default=None)
_stepping: contextvars.ContextVar[Problem | None] = contextvars.ContextVar("mlodsl_stepping", default=None)


def current() -> Bindings | None:
    return _current.get()


def set_stepping(problem: Problem) -> contextvars.Token:
    """While ``problem`` steps, evaluations of its own loss update buffers; others use copies.
    (The guard calls this and :func:`reset_stepping` around each step.)"""
    return _stepping.set(problem)


def reset_stepping(token: contextvars.Token) -> None:
    _stepping.reset(token)


def evaluate(bindings: Bindings, fn: Callable[[], T]) -> T:
    """``fn()`` under ``bindings``: modules hold the bound tensors until it returns.

    A plain function rather than a context manager: it runs for every loss evaluation.
    """
    token = _current.set(bindings)
    keep_buffers = bindings.owner is not _stepping.get()
    frozen = [t for q in bindings.frozen for t in q.params]
    swaps = [(module, dict(params)) for module, params in bindings.overrides] if bindings.overrides else []
    if keep_buffers and bindings.buffered:
        swaps.extend((module, buffer_copies(module)) for module in bindings.buffered)
    rng = _RngFork(bindings.table) if keep_buffers else None
    try:
        for t in frozen:
            t.requires_grad_(False)
        if not swaps:  # the common case: no module to re-parametrize
            return fn()
        with ExitStack() as stack:
            for module, tensors in swaps:
                stack.enter_context(_reparametrize_module(module, tensors))
            return fn()
    finally:
        if rng is not None:
            rng.restore()
        for t in frozen:
            t.requires_grad_(True)
        _current.reset(token)


class _RngFork:
    """torch's generators as they were, put back when the evaluation ends (cheaper than
    ``torch.random.fork_rng``, which also validates devices and warns)."""

    __slots__ = ("cpu", "cuda")

    def __init__(self, table: Mapping[Problem, Any]) -> None:
        self.cpu = torch.default_generator.get_state()
        self.cuda = [(d, torch.cuda.get_rng_state(d)) for d in _cuda_devices(table)] if cuda_rng_usable() else ()

    def restore(self) -> None:
        torch.default_generator.set_state(self.cpu)
        for d, state in self.cuda:
            torch.cuda.set_rng_state(state, d)


def cuda_rng_usable() -> bool:
    """Whether CUDA's generators can be read and set now: CUDA is in use, and no CUDA graph is
    being captured (a capture may not set them; it goes ahead only when the probe of
    mlodsl._graphs saw no random numbers drawn where the generators are forked)."""
    return torch.cuda.is_initialized() and not torch.cuda.is_current_stream_capturing()


def _cuda_devices(table: Mapping[Problem, Any]) -> list[int]:
    if not torch.cuda.is_initialized():
        return []
    found = {t.device.index for p in table for t in p.params[:1] if t.is_cuda}  # a module is on one device
    return sorted(i if i is not None else torch.cuda.current_device() for i in found)


def buffer_copies(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the buffers a forward pass may update in place: those of submodules in train
    mode (BatchNorm's running statistics; in eval mode they are only read)."""
    return {f"{prefix}.{n}" if prefix else n: b.clone()
            for prefix, m in _buffered(module) if m.training
            for n, b in m.named_buffers(recurse=False)}


_BUFFERED: dict[int, tuple[torch.nn.Module, list]] = {}


def _buffered(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The submodules that hold buffers, found once per module (the hot loop walks no tree)."""
    entry = _BUFFERED.get(id(module))
    if entry is None or entry[0] is not module:
        found = [(prefix, m) for prefix, m in module.named_modules() if next(m.buffers(recurse=False), None) is not None]
        entry = _BUFFERED[id(module)] = (module, found)
    return entry[1]


def as_dict(problem: Problem, tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(zip(problem.param_names, tensors))
