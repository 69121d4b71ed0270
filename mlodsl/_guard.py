"""Transactions around a step: a failing step leaves everything as it was before it.

What one step of a problem P may change, and how :meth:`Guard.run`
puts it back when the step fails:

- θ_P and P's optimizer state (with the param-group settings a scheduler
  changes): the runtime touches them only once the gradient is known to be
  finite, in ``optimizer.step()``, which cannot fail for torch's optimizers, so
  the common step copies neither. When something can fail once the update has
  begun (an ``after_step`` / ``after_unroll`` hook, a scheduler, an optimizer
  not from ``torch.optim``), they are copied right before that call (an
  optimizer step pre-hook), when the gradient graphs are already freed, so the
  copy never raises the peak memory. A ``before_unroll`` hook may change θ
  earlier, and ``roll_back=True`` lowers change after the update: those are
  copied when the step begins.
- buffers of the modules P's loss calls (BatchNorm running statistics, where
  there are any): copied when the step begins (small); P's scheduler state and
  ``.grad`` of θ_P too, when something can fail after the update.
- the runtime's counters (``iteration``, ``position``, ``stats``,
  ``diagnostics``) and every problem's state (step count, last batch and loss,
  ``Unrolled`` windows): shallow copies, and the windows' lengths.
- data positions: the batches drawn in the step are given back and drawn
  again first (``Batches.rewind``), so a retry sees the same batches; and
  torch's random generators (a new DataLoader epoch, dropout), so a retry
  after a transient failure gives exactly what an uninterrupted run gives.

On failure: an :class:`MlodslError` is re-raised as it is; any other exception
(a hook, the scheduler, the optimizer) becomes a :class:`ProblemError` that
names P, the line that raised and says the step was rolled back; a
``KeyboardInterrupt`` is rolled back and re-raised unchanged.

``nan_policy="skip"``: a NaN or Inf loss or gradient (:class:`NonFiniteError`)
does not stop the program. The step is rolled back like any failure, except
that its batches stay drawn (else the same batch would fail forever); a
:class:`MlodslWarning` says so and ``stats["skipped/<name>"]`` counts it. The
schedule moves on as if the step had been taken: upper problems step when
they would have, and the ``Unrolled`` round still opens and closes (with no
update in it), so its replay stays exact. Everything else shows that it did
not happen: θ, the optimizer, ``stats["steps/<name>"]``, the step count in
messages, and its hooks (whose effects were rolled back with it).
"""

from __future__ import annotations

import copy
import os
import sysconfig
import traceback
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

import compiler
from compiler import errors
from mlodsl import _bindings
from mlodsl._data import describe, devices

if TYPE_CHECKING:
    from compiler.plan import Step
    from mlodsl._problem import Problem
    from mlodsl._runtime import Runtime
    from mlodsl._state import ProblemState

NAN_POLICIES = ("raise", "skip")


class Guard:
    def __init__(self, runtime: Runtime, nan_policy: str = "raise") -> None:
        self.runtime = runtime
        self.nan_policy = nan_policy  # "raise" | "skip" (see the module docstring)
        self._devices_checked: set[str] = set()
        self._may_fail: dict[str, bool] = {}

    def run(self, st: ProblemState, step: Step, body: Callable[[Step, ProblemState], None]) -> None:
        """Run ``body(step, st)`` (one step of ``st.problem``); on failure restore what it changed
        (module docstring). Plain try/except rather than context managers: this wraps every step."""
        p = st.problem
        fails = self._may_fail.get(p.name)
        if fails is None:  # the first step of this problem
            self.check_devices(st)
            fails = self._may_fail[p.name] = _may_fail_in_update(p)
        fails = fails or bool(p.hooks["after_step"] or p.hooks["after_unroll"])
        saved = Saved(self.runtime, st, step.first, fails)
        handle = p.optimizer.register_step_pre_hook(lambda *_: saved.take_params(p)) if fails else None
        token = _bindings.set_stepping(p)
        try:
            body(step, st)
        except BaseException as e:
            skip = isinstance(e, errors.NonFiniteError) and self.nan_policy == "skip"
            saved.restore(data=not skip)
            if skip:
                self._skip(st, step, e)
                return
            if isinstance(e, Exception) and not isinstance(e, errors.MlodslError):
                raise errors.ProblemError(errors.STEP_FAILED.format(
                    name=p.name, loc=p.loc, error=_error(e), where=where(e))) from e
            raise
        else:
            for s in saved.touched:
                s.batches.commit()
        finally:
            _bindings.reset_stepping(token)
            if handle is not None:
                handle.remove()

    def _skip(self, st: ProblemState, step: Step | None, e: Exception) -> None:
        p = st.problem
        self.runtime.count(f"skipped/{p.name}")
        count = self.runtime.stats[f"skipped/{p.name}"]
        warnings.warn(errors.STEP_SKIPPED.format(iteration=self.runtime.iteration, name=p.name, loc=p.loc,
                                                 count=count, reason=str(e)), errors.MlodslWarning, stacklevel=6)
        if step is not None and step.first:
            st.begin_round()
        if step is not None and step.last:
            st.end_round()

    def check_devices(self, st: ProblemState) -> None:
        """Once per problem: the modules its loss calls are on one device."""
        if st.problem.name in self._devices_checked:
            return
        found = {q.name: module_devices(q.module) for q in st.reach}
        if len(set().union(*found.values())) > 1:
            listed = ", ".join(f"{n!r} on {' and '.join(d)}" for n, d in found.items() if d)
            raise errors.ProblemError(errors.DEVICE_MISMATCH_MODULES.format(
                name=st.problem.name, loc=st.problem.loc, devices=listed))
        self._devices_checked.add(st.problem.name)


_BUILTIN = ("torch.optim.",)


def _may_fail_in_update(p: Problem) -> bool:
    """Whether ``optimizer.step()`` or what follows it can fail whatever the hooks: a scheduler,
    or an optimizer that is not one of torch's (fixed when the problem is made, so the guard
    caches it). With an ``after_step`` / ``after_unroll`` hook too, θ is copied before the
    update; otherwise the common step makes no copy of the parameters and optimizer state
    (torch's optimizers do not fail on a finite gradient)."""
    return p.scheduler is not None or not type(p.optimizer).__module__.startswith(_BUILTIN)


class Saved:
    """What one step may change (the module docstring lists it), taken when the step begins.

    Only what can change before the step fails is copied: ``.grad`` and the scheduler only when
    something can fail once the update has begun (``late``), buffers only where there are any,
    the ``Unrolled`` windows only where a touched problem records them.
    """

    def __init__(self, runtime: Runtime, st: ProblemState, early: bool, late: bool) -> None:
        p = st.problem
        self.runtime = runtime
        self.problem = p
        self.counters = (runtime.iteration, runtime.position, dict(runtime.stats), dict(runtime.diagnostics))
        self.touched = touched = runtime.touched[p.name]  # the states this step can change, listed once
        self.states = [vars(s).copy() for s in touched]
        self.marks = [s.batches.mark() for s in touched]
        self.windows = _window_lengths(touched) if runtime.touches_windows[p.name] else ()
        self.buffers = [(b, b.detach().clone()) for b in st.reach_buffers] if st.reach_buffers else ()
        self.grads = [(t, t.grad) for t in p.params] if late else ()
        self.scheduler = copy.deepcopy(p.scheduler.state_dict()) if p.scheduler is not None else None
        self.rng = torch.default_generator.clone_state()  # a copy, as a generator: cheaper than a state tensor
        self.cuda_rng = torch.cuda.get_rng_state_all() if _bindings.cuda_rng_usable() else None
        self.params: dict[str, ParamCopy] = {}
        if early and p.hooks["before_unroll"]:
            self.take_params(p)
        for low in runtime.roll_back_lowers[p.name]:
            self.take_params(low.problem)

    def take_params(self, p: Problem) -> None:
        """Copy θ and the optimizer state of ``p``, once per step."""
        if p.name not in self.params:
            self.params[p.name] = ParamCopy(p)

    def restore(self, data: bool = True) -> None:
        rt = self.runtime
        for saved_params in self.params.values():
            saved_params.restore()
        with torch.no_grad():
            for b, saved in self.buffers:
                b.copy_(saved)
        for t, g in self.grads:
            t.grad = g
        if self.scheduler is not None:
            self.problem.scheduler.load_state_dict(self.scheduler)
        torch.default_generator.set_state(self.rng.get_state())
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        self._restore_counters(data)

    def _restore_counters(self, data: bool) -> None:
        rt = self.runtime
        rt.iteration, rt.position, stats, diagnostics = self.counters
        rt.stats.clear()
        rt.stats.update(stats)
        rt.diagnostics.clear()
        rt.diagnostics.update(diagnostics)
        for s, saved, mark in zip(self.touched, self.states, self.marks):
            vars(s).update(saved)
            if data:
                s.batches.rewind(mark)
            else:
                s.batches.commit()
        for window, length in self.windows:
            del window.steps[length:]


class ParamCopy:
    """θ of a problem, its optimizer's per-parameter state and its param-group settings."""

    def __init__(self, p: Problem) -> None:
        self.problem = p
        self.theta = [t.detach().clone() for t in p.params]
        opt = p.optimizer
        self.state = {t: {k: _copy(v) for k, v in s.items()} for t, s in opt.state.items()}
        self.groups = [{k: _copy(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]

    def restore(self) -> None:
        with torch.no_grad():
            for t, saved in zip(self.problem.params, self.theta):
                t.copy_(saved)
        opt = self.problem.optimizer
        opt.state.clear()
        opt.state.update(self.state)
        for group, saved in zip(opt.param_groups, self.groups):
            group.update(saved)


def _copy(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)


def _window_lengths(states: list[ProblemState]) -> list[tuple[Any, int]]:
    """Each distinct ``Unrolled`` window (the last round, the round in progress) and its length."""
    seen: dict[int, tuple[Any, int]] = {}
    for s in states:
        for w in (getattr(s, "window", None), getattr(s, "pending", None)):
            if w is not None:
                seen.setdefault(id(w), (w, len(w.steps)))
    return list(seen.values())


def module_devices(module: torch.nn.Module) -> list[str]:
    tensors = [*module.parameters(), *module.buffers()]
    return list(dict.fromkeys(str(t.device) for t in tensors))


# -- explaining a failure ----------------------------------------------------------------
_LIBRARY = tuple({os.path.dirname(path) + os.sep for path in (torch.__file__, compiler.__file__, __file__)}
                 | {sysconfig.get_paths()[k] + os.sep for k in ("stdlib", "purelib", "platlib")})


def where(e: BaseException) -> str:
    """``file:line`` of the innermost frame of the user's code in ``e``'s traceback."""
    frames = list(traceback.walk_tb(e.__traceback__))
    user = [(f, line) for f, line in frames if not f.f_code.co_filename.startswith(_LIBRARY)]
    if not (user or frames):
        return "?"
    frame, line = (user or frames)[-1]
    return f"{_short(frame.f_code.co_filename)}:{line}"


def _short(path: str) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


def _error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


_STRUCTURE_HINTS = ("unpack", "not iterable", "not subscriptable", "is not a mapping")


def explain_loss_failure(p: Problem, batch: Any, e: Exception, reach: tuple[Problem, ...]
                         ) -> errors.ProblemError:
    """The :class:`ProblemError` for a loss that raised ``e``: a device mismatch, a batch of
    the wrong structure, or else the error and the line of the loss that raised it."""
    fmt = dict(name=p.name, loc=p.loc, error=_error(e), where=where(e))
    batch_devs = devices(batch)
    mods = {q.name: module_devices(q.module) for q in reach}
    if "device" in str(e) and len(set(batch_devs).union(*mods.values())) > 1:
        modules = ", ".join(f"the module of {n!r} is on {' and '.join(d)}" for n, d in mods.items() if d)
        target = (mods.get(p.name) or batch_devs or ["cpu"])[0]
        return errors.ProblemError(errors.DEVICE_MISMATCH_BATCH.format(
            batch_devices=" and ".join(batch_devs) or "no device (it holds no tensor)",
            modules=modules, device=target, **fmt))
    structure = isinstance(e, (ValueError, TypeError)) and any(h in str(e) for h in _STRUCTURE_HINTS)
    if structure or (isinstance(e, KeyError) and isinstance(batch, dict)):
        return errors.ProblemError(errors.BATCH_STRUCTURE.format(batch=describe(batch), **fmt))
    return errors.ProblemError(errors.LOSS_RAISED.format(batch=describe(batch), **fmt))
