"""The runtime: executes a compiled :class:`Plan` step by step.

Each scheduled step of a problem P draws a batch, evaluates C_P with θ_P and
the lower optima it reads bound live (everything else detached, so no graph is
built for parameters nobody differentiates), forms the direct gradient and the
seeds of the adjoints, visits the lower problems in the plan's order calling
each one's method once, and applies the total gradient with P's optimizer.
Nothing is changed until the whole gradient is known to be finite, so a
failing step leaves parameters, optimizer state and counters as they were.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import warnings

import attrs
import torch

from compiler import EdgeKind, Plan, Step, errors
from mlodsl import _tree as T
from mlodsl._bindings import LIVE, Bindings, bound, detached
from mlodsl._data import Batches
from mlodsl._guard import Guard
from mlodsl._hypergrad import Unrolled, _unroll
from mlodsl._lower import LowerView
from mlodsl._problem import Problem


@attrs.define
class Window:
    """The updates ``Unrolled`` replays: a snapshot of θ and optimizer state, then (batch, settings)."""

    theta: list[torch.Tensor]
    states: list[dict]
    steps: list[tuple[Any, list[dict]]] = attrs.field(factory=list)


class ProblemState:
    """What the runtime keeps per problem between steps."""

    def __init__(self, problem: Problem, reach: Sequence[Problem], records_unroll: bool) -> None:
        self.problem = problem
        self.reach = tuple(reach)
        self.batches = Batches(problem.name, problem.loc, problem.data)
        self.last_batch: Any = None
        self.has_batch = False
        self.count = 0
        self.last_loss: torch.Tensor | None = None
        self.records_unroll = records_unroll
        self.window: Window | None = None     # the last complete round (+ the round in progress)
        self._pending: Window | None = None

    def current_batch(self) -> Any:
        """The batch of Q's last step (what methods evaluate C_Q on); drawn once if Q never stepped."""
        if not self.has_batch:
            self.last_batch, self.has_batch = self.batches.next(), True
        return self.last_batch

    def begin_round(self) -> None:
        if self.records_unroll:
            p = self.problem
            self._pending = Window(theta=[t.detach().clone() for t in p.params],
                                   states=_unroll.snapshot_state(p.optimizer, p.params))

    def record_update(self, batch: Any) -> None:
        if self.records_unroll and self._pending is not None:
            entry = (batch, _unroll.hyperparams(self.problem.optimizer, self.problem.params))
            self._pending.steps.append(entry)
            if self.window is not None and self.window is not self._pending:
                self.window.steps.append(entry)

    def end_round(self) -> None:
        if self.records_unroll and self._pending is not None:
            self.window, self._pending = self._pending, None


class Runtime:
    def __init__(self, plan: Plan, problems: Mapping[str, Problem], reach: Mapping[str, Sequence[str]]) -> None:
        self.plan = plan
        self.problems = dict(problems)
        self.state = {
            name: ProblemState(p, [self.problems[r] for r in reach[name]],
                               isinstance(p.hypergrad, Unrolled) and bool(plan.graph.node(name).upper))
            for name, p in self.problems.items()
        }
        self.iteration = 0   # iterations completed
        self.position = 0    # steps of the current iteration completed
        self.stats: Counter[str] = Counter()
        self.diagnostics: dict[str, Any] = {}
        self._warned: set[str] = set()
        self.guard = Guard(self)

    def count(self, key: str, n: int = 1) -> None:
        self.stats[key] += n

    # -- the schedule ------------------------------------------------------------
    def run(self, iterations: int) -> None:
        end = self.iteration + iterations
        while self.iteration < end:
            steps = self.plan.schedule.iteration(self.iteration).steps
            while self.position < len(steps):
                self.step(steps[self.position])
                self.position += 1
            self.iteration += 1
            self.position = 0

    def step(self, step: Step) -> None:
        st = self.state[step.problem]
        with self.guard.transaction(st):
            self._step(step, st)

    def _step(self, step: Step, st: ProblemState) -> None:
        p = st.problem
        if step.first:
            p.run_hooks("before_unroll")
            st.begin_round()
        batch = st.batches.next()
        grads, loss = self.total_gradient(p, batch)
        self._check_finite(p, loss, grads, st.count)
        st.record_update(batch)
        for t, g in zip(p.params, grads):
            t.grad = g.detach()
        p.optimizer.step()
        p.optimizer.zero_grad(set_to_none=True)
        if p.scheduler is not None:
            p.scheduler.step()
        st.last_batch, st.has_batch = batch, True
        st.last_loss = loss.detach()
        st.count += 1
        self.count(f"steps/{p.name}")
        p.run_hooks("after_step")
        if step.last:
            st.end_round()
            p.run_hooks("after_unroll")

    # -- gradients ---------------------------------------------------------------
    def evaluate(self, p: Problem, batch: Any, live: Iterable[Problem] = (),
                 override: Mapping[Problem, Mapping[str, torch.Tensor]] | None = None) -> torch.Tensor:
        """C_P on ``batch``: ``live`` problems use their own parameters, ``override`` given ones."""
        live, override = set(live), override or {}
        table = {}
        for r in self.state[p.name].reach:
            table[r] = override[r] if r in override else (LIVE if r in live else detached(r))
        try:
            with bound(Bindings(p, table)):
                out = p.fn() if p.data is None else p.fn(batch)
        except errors.MlodslError:
            raise
        except Exception as e:
            raise errors.ProblemError(errors.LOSS_FAILED.format(
                name=p.name, loc=p.loc, error=f"{type(e).__name__}: {e}")) from e
        _check_loss(p, out)
        return out

    def total_gradient(self, p: Problem, batch: Any) -> tuple[T.Vec, torch.Tensor]:
        """dC_P/dθ_P: the direct gradient plus every path through the lower optima (DESIGN §3)."""
        hp = self.plan.hypergrad(p.name)
        seeds = [self.problems[s] for s in hp.seeds]
        loss = self.evaluate(p, batch, live=[p, *seeds])
        if not loss.requires_grad:
            return self._no_gradient(p), loss
        diff = p.params + [t for s in seeds for t in s.params]
        grads = T.fill_none(torch.autograd.grad(loss, diff, allow_unused=True), diff)
        parts = T.split(grads, [len(p.params)] + [len(s.params) for s in seeds])
        direct, adjoints = parts[0], dict(zip(hp.seeds, parts[1:]))
        for visit in hp.visits:
            q = self.problems[visit.problem]
            inputs = ([p] if visit.to_upper else []) + [self.problems[r] for r in visit.to_lowers]
            self.count(f"method_calls/{q.name}")
            out = q.hypergrad(LowerView(self, q, inputs), adjoints.pop(visit.problem))
            if visit.to_upper:
                direct, out = T.add(direct, out[0]), out[1:]
            for r, contribution in zip(visit.to_lowers, out):
                adjoints[r] = T.add(adjoints[r], contribution) if r in adjoints else contribution
        return direct, loss

    def _no_gradient(self, p: Problem) -> T.Vec:
        """A loss with no graph: zero when it reads θ_P only through first-order lowers, else an error."""
        if not any(e.dst == p.name for e in self.plan.graph.edges_of(EdgeKind.L2U)):
            raise errors.ProblemError(errors.LOSS_NOT_DIFFERENTIABLE.format(name=p.name, loc=p.loc))
        if p.name not in self._warned:
            self._warned.add(p.name)
            warnings.warn(errors.ZERO_GRADIENT.format(name=p.name, loc=p.loc), stacklevel=4)
        return T.zeros_like(p.params)

    def _check_finite(self, p: Problem, loss: torch.Tensor, grads: T.Vec, step: int) -> None:
        flags = torch.stack([torch.isfinite(loss).all()] + [torch.isfinite(g).all() for g in grads])
        if bool(flags.all()):
            return
        if not bool(flags[0]):
            raise errors.ProblemError(errors.LOSS_NOT_FINITE.format(
                name=p.name, loc=p.loc, value=float(loss.detach()), step=step))
        bad = [n for n, ok in zip(p.param_names, flags[1:].tolist()) if not ok]
        raise errors.ProblemError(errors.GRAD_NOT_FINITE.format(
            name=p.name, loc=p.loc, where=", ".join(bad), step=step))


def _check_loss(p: Problem, out: Any) -> None:
    if not isinstance(out, torch.Tensor):
        raise errors.ProblemError(errors.LOSS_NOT_TENSOR.format(
            name=p.name, loc=p.loc, got=f"{type(out).__name__} {out!r}"[:80]))
    if out.numel() != 1:
        raise errors.ProblemError(errors.LOSS_NOT_SCALAR.format(name=p.name, loc=p.loc, shape=tuple(out.shape)))
