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

import functools
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import warnings

import torch
from torch.utils._pytree import tree_map_only

from compiler import EdgeKind, Plan, Step, errors
from mlodsl import _compile
from mlodsl import _tree as T
from mlodsl._bindings import FROZEN, LIVE, Bindings, evaluate
from mlodsl._guard import Guard, explain_loss_failure
from mlodsl._hypergrad import Unrolled
from mlodsl._lower import LowerView
from mlodsl._problem import Problem
from mlodsl._solvers import check_solvers
from mlodsl._state import ProblemState


class Runtime:
    def __init__(self, plan: Plan, problems: Mapping[str, Problem], reach: Mapping[str, Sequence[str]],
                 device: torch.device | None = None, autocast: torch.dtype | None = None) -> None:
        self.plan = plan
        self.problems = dict(problems)
        self.device = device
        self.autocast = autocast
        self.solver_policy = "warn"  # "warn" | "raise" | "off": what unhealthy solver diagnostics do
        # per-rank quantities -> the combined batch's (mlodsl._distributed); one process: as they are
        self.reduce: Callable[[T.Vec, str], T.Vec] = _as_is
        self.compiled = False  # modules under torch.compile (Program(compile=...))
        self.graphs: Any = None  # mlodsl._graphs.Graphs: whole iterations captured and replayed
        self.scaler = LossScaler() if autocast is torch.float16 else None
        self.checks = "step"  # "step": finite check (a host sync) each step | "log": at sync points only
        self._deferred: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # name -> (all ok, first bad, step)
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
        self.warned_solvers: set[tuple[str, str]] = set()
        self.stop_requested: Callable[[], bool] | None = None  # set by the training loop (Ctrl-C)
        # static tables, so the hot loop does no graph walks or searches
        self.hypergrads = {hp.problem: hp for hp in plan.hypergrads}
        self.roll_back_lowers = {name: [self.state[low] for low in plan.graph.lowers(name)
                                        if self.problems[low].options.roll_back] for name in self.problems}
        # what one step of a problem can change: its own state and those of the lower problems its
        # hypergradient visits (a never-stepped lower draws its batch); a failed step restores them
        self.touched = {name: [self.state[n] for n in dict.fromkeys(
            [name, *(v.problem for v in self.hypergrads[name].visits),
             *(low.problem.name for low in self.roll_back_lowers[name])])] for name in self.problems}
        self.touches_windows = {name: any(s.records_unroll for s in states) for name, states in self.touched.items()}
        # the seeds of each problem's adjoints, and the problems its own loss evaluation binds live
        self.seeds = {name: ([self.problems[s] for s in hp.seeds],
                             frozenset([p, *(self.problems[s] for s in hp.seeds)]))
                      for name, p in self.problems.items() for hp in [self.hypergrads[name]]}
        self._bindings: dict[tuple[Problem, frozenset[Problem]], Bindings] = {}
        self._flags: dict[str, tuple[torch.Tensor, bool]] = {}  # per problem: the finite check's flag, fused?
        self.guard = Guard(self)
        from mlodsl._lowering import lower
        self.lowered = lower(plan)  # one period as a torch.fx GraphModule (None: interpreted)

    def read_diagnostics(self, prefix: str = "") -> dict[str, Any]:
        """The solver diagnostics whose keys start with ``prefix``, computed now (methods record
        them as tensors or as thunks, so that nothing is computed or read in the hot loop)."""
        return {k: (v() if callable(v) else v) for k, v in self.diagnostics.items() if k.startswith(prefix)}

    def count(self, key: str, n: int = 1) -> None:
        self.stats[key] += n

    # -- the schedule ------------------------------------------------------------
    def run(self, iterations: int) -> None:
        for _ in range(iterations):
            self.run_iteration()

    def finish_run(self) -> None:
        """A sync point (a log iteration, the end of a run): raise what ``checks="log"`` deferred.

        The verdicts live in tensors updated in place (a captured CUDA graph writes to the same
        memory at each replay), read here with one host sync and reset in place."""
        if not self._deferred:
            return
        names = list(self._deferred)
        flags = torch.stack([self._deferred[n][0].to("cpu") for n in names]).tolist()  # the one host sync
        bad = [(n, int(self._deferred[n][1])) for n, ok in zip(names, flags) if not ok]
        for name, (all_ok, first, seen) in self._deferred.items():
            all_ok.fill_(True)
            first.fill_(-1.0)
            seen.fill_(float(self.state[name].count))
        if bad:
            name, step = bad[0]
            p = self.problems[name]
            raise errors.ProblemError(errors.DEFERRED_NOT_FINITE.format(
                name=name, loc=p.loc, step=step, iteration=self.iteration))

    def run_periods(self, iterations: int) -> int:
        """Run whole periods through the lowered GraphModule while they fit; return how many
        iterations ran. Partial periods (and a step left failed mid-iteration) are interpreted."""
        if self.lowered is None or self.position or (self.graphs is not None and self.graphs.off is None):
            return 0
        schedule = self.plan.schedule
        n, done = len(schedule.period), 0
        while (iterations - done >= n and self.iteration >= len(schedule.prologue)
               and (self.iteration - len(schedule.prologue)) % n == 0 and self.stop_requested is None):
            self.lowered(self)
            done += n
        return done

    def run_iteration(self) -> None:
        """Finish the current iteration of the schedule (from where a failed step left it): from
        its captured graph where there is one (``mlodsl._graphs``), else step by step."""
        if self.graphs is not None and not self.position and self.graphs.run_iteration():
            return
        self.run_steps()

    def run_steps(self) -> None:
        """Finish the current iteration eagerly, step by step."""
        steps = self.plan.schedule.iteration(self.iteration).steps
        while self.position < len(steps):
            self.step(steps[self.position])
            self.position += 1
            if self.stop_requested is not None and self.stop_requested() and self.position < len(steps):
                from mlodsl._loop import _Stopped
                raise _Stopped
        self.iteration += 1
        self.position = 0

    def step(self, step: Step) -> None:
        st = self.state[step.problem]
        try:
            self.guard.run(st, step, self._step)
        except errors.MlodslError as e:
            if not (self.compiled and _compile.is_compile_error(e)):
                raise
            _compile.undo(self.problems.values())   # rolled back: retry eagerly, once
            self.compiled = False
            _compile.warn_fallback(e)
            self.guard.run(st, step, self._step)

    def _step(self, step: Step, st: ProblemState) -> None:
        p = st.problem
        if self.iteration < p.options.warmup:
            self.count(f"warmup/{p.name}")
            return
        if step.first:
            if p.hooks["before_unroll"]:
                p.run_hooks("before_unroll")
            st.begin_round()
        st.keep_gradient(None)  # the previous step's gradient is not kept through this one
        if p.options.grad_accumulation == 1:
            batches = [self.draw(st)]
            grads, loss = self.total_gradient(p, batches[0])
        else:
            batches = [self.draw(st) for _ in range(p.options.grad_accumulation)]
            grads, loss = self.accumulated_gradient(p, batches)
        if self.scaler is not None and not self.scaler.update(loss, grads):
            self.count(f"fp16_overflow/{p.name}")  # skipped: the scale was too large for fp16
            if step.last:
                st.end_round()
            return
        self._check_finite(p, loss, grads, st.count)
        if st.count == 0 and self.checks == "step" and self.hypergrads[p.name].visits:
            check_solvers(self, p.name)  # before the update, so that solvers="raise" rolls back cleanly
        if st.records_unroll:
            st.record_update(batches)
        self._apply(st, grads)
        st.last_batch, st.has_batch = batches[-1], True
        st.last_loss = loss.detach()
        st.count += 1
        self.stats[st.steps_key] += 1
        if p.hooks["after_step"]:
            p.run_hooks("after_step")
        if step.last:
            st.end_round()
            if p.hooks["after_unroll"]:
                p.run_hooks("after_unroll")
        for low in self.roll_back_lowers[p.name]:
            low.roll_back()

    def _apply(self, st: ProblemState, grads: T.Vec) -> None:
        """Clip, step the optimizer and the scheduler; keep the gradient for its norm (no sync)."""
        p = st.problem
        for t, g in zip(p.params, grads):  # contiguous: torch's fused CPU kernels misread strided grads
            t.grad = (g.detach() if g.requires_grad else g).contiguous()
        if p.options.clip_grad_norm is not None:
            st.grad_norm = T.norm(grads)  # before clipping, as torch's clip_grad_norm_ reports it
            torch.nn.utils.clip_grads_with_norm_(p.params, p.options.clip_grad_norm, st.grad_norm)
        else:
            st.keep_gradient(grads)
        p.optimizer.step()
        for t in p.params:  # zero_grad(set_to_none=True) on exactly what was set (8 µs less per step)
            t.grad = None
        if p.scheduler is not None:
            p.scheduler.step()

    def draw(self, st: ProblemState) -> Any:
        """The next batch of a problem, on the device (a captured graph replaces it by its inputs)."""
        return self.to_device(st.batches.next())

    def to_device(self, batch: Any) -> Any:
        if self.device is None:
            return batch
        return tree_map_only(torch.Tensor, lambda t: t.to(self.device, non_blocking=True), batch)

    # -- gradients ---------------------------------------------------------------
    def evaluate(self, p: Problem, batch: Any, live: Iterable[Problem] = (),
                 override: Mapping[Problem, Mapping[str, torch.Tensor]] | None = None) -> torch.Tensor:
        """C_P on ``batch``: ``live`` problems use their own parameters, ``override`` given ones."""
        if override:
            bindings = Bindings(p, {r: override[r] if r in override else (LIVE if r in live else FROZEN)
                                    for r in self.state[p.name].reach})
        else:  # the same few bindings every iteration: made once
            key = (p, frozenset(live))
            bindings = self._bindings.get(key)
            if bindings is None:
                bindings = self._bindings[key] = Bindings(
                    p, {r: LIVE if r in live else FROZEN for r in self.state[p.name].reach})
        fn = p.fn if p.data is None else functools.partial(p.fn, batch)
        if self.autocast is not None:
            fn = functools.partial(self._autocast_call, fn)
        try:
            out = evaluate(bindings, fn)
        except errors.MlodslError:
            raise
        except Exception as e:
            raise explain_loss_failure(p, batch, e, self.state[p.name].reach) from e
        if type(out) is not torch.Tensor or out.numel() != 1:
            _check_loss(p, out)
        return out

    def _autocast_call(self, fn: Callable[[], Any]) -> Any:
        device_type = self.device.type if self.device is not None else "cpu"
        with torch.autocast(device_type=device_type, dtype=self.autocast):
            return fn()

    def accumulated_gradient(self, p: Problem, batches: list[Any]) -> tuple[T.Vec, torch.Tensor]:
        """The total gradient averaged over ``batches`` (``grad_accumulation``), and the mean loss."""
        grads, loss = self.total_gradient(p, batches[0])
        for batch in batches[1:]:
            more, more_loss = self.total_gradient(p, batch)
            grads, loss = T.add(grads, more), loss + more_loss
        n = len(batches)
        return (grads, loss) if n == 1 else (T.scale(grads, 1.0 / n), loss / n)

    def total_gradient(self, p: Problem, batch: Any) -> tuple[T.Vec, torch.Tensor]:
        """dC_P/dθ_P: the direct gradient plus every path through the lower optima (DESIGN §3)."""
        hp = self.hypergrads[p.name]
        seeds, live = self.seeds[p.name]
        loss = self.evaluate(p, batch, live=live)
        if not loss.requires_grad:
            return self._no_gradient(p), loss
        diff = p.params + [t for s in seeds for t in s.params]
        scale = self.scaler.scale if self.scaler is not None else None
        seeded = loss if scale is None else loss * scale  # fp16: every method is linear in v
        raw = torch.autograd.grad(seeded, diff, allow_unused=True)
        n = len(p.params)
        # no direct path (the loss reads θ_P only through lowers, as in MWN): the first method's
        # result is the gradient, rather than zeros plus it (in one process: a distributed
        # reduction keeps its one layout of direct gradient and seeds)
        no_direct = self.reduce is _as_is and bool(hp.visits) and all(g is None for g in raw[:n])
        if no_direct:
            direct, rest, loss = None, T.fill_none(raw[n:], diff[n:]), loss.detach()
        else:
            *grads, loss = self.reduce([*T.fill_none(raw, diff), loss.detach()], "seed")
            direct, rest = grads[:n], grads[n:]
        adjoints = dict(zip(hp.seeds, T.split(rest, [len(s.params) for s in seeds])))
        for visit in hp.visits:
            q = self.problems[visit.problem]
            inputs = ([p] if visit.to_upper else []) + [self.problems[r] for r in visit.to_lowers]
            self.stats[self.state[q.name].calls_key] += 1
            out = q.hypergrad(LowerView(self, q, inputs), adjoints.pop(visit.problem))
            if visit.to_upper:
                direct, out = (out[0] if direct is None else T.add(direct, out[0])), out[1:]
            for r, contribution in zip(visit.to_lowers, out):
                adjoints[r] = T.add(adjoints[r], contribution) if r in adjoints else contribution
        if direct is None:  # no visit led back to P
            direct = T.zeros_like(p.params)
        *direct, loss = self.reduce([*direct, loss], "total")
        if scale is not None:
            direct = T.scale(direct, 1.0 / scale)
        return direct, loss

    def _no_gradient(self, p: Problem) -> T.Vec:
        """A loss with no graph: zero when it reads θ_P only through first-order lowers, else an error."""
        if not any(e.dst == p.name for e in self.plan.graph.edges_of(EdgeKind.L2U)):
            raise errors.ProblemError(errors.LOSS_NOT_DIFFERENTIABLE.format(name=p.name, loc=p.loc))
        if p.name not in self._warned:
            self._warned.add(p.name)
            warnings.warn(errors.ZERO_GRADIENT.format(name=p.name, loc=p.loc), errors.MlodslWarning,
                          stacklevel=4)
        return T.zeros_like(p.params)

    def _check_finite(self, p: Problem, loss: torch.Tensor, grads: T.Vec, step: int) -> None:
        """One host sync: a fused check over every gradient entry, and the loss's value.

        With ``checks="log"`` nothing is read here: the verdict accumulates on the device
        and :meth:`finish_run` reads it at the next sync point.
        """
        loss = loss.detach()
        if self.checks == "log":
            entry = self._deferred.get(p.name)
            if entry is None:  # made once per problem: (all finite so far, first bad step, step number)
                entry = self._deferred[p.name] = (torch.ones((), dtype=torch.bool, device=loss.device),
                                                  torch.full((), -1.0, device=loss.device),
                                                  torch.full((), float(step), device=loss.device))
            all_ok, first, seen = entry  # updated in place: no Python number enters the arithmetic
            ok = T.nonfinite_flag([*grads, loss])[0] == 0  # the loss in the same fused check
            first.copy_(torch.where(all_ok & ~ok, seen, first))
            all_ok.logical_and_(ok)
            seen.add_(1.0)
            return
        # one fused kernel over the gradient and the (detached, 0-dim) loss, scaled in place by exactly 1,
        # into a flag that stays zero while every step is finite; one read
        checked = [*grads, loss]
        flag, fused = self._flags.get(p.name, (None, False))
        if flag is None:  # made once per problem
            flag, fused = torch.zeros(1, dtype=torch.float32, device=loss.device), T.fusable(checked, loss.device)
            self._flags[p.name] = (flag, fused)
        if not T.any_nonfinite(checked, flag, fused):
            return
        flag.zero_()
        if not math.isfinite(loss.item()):
            raise errors.NonFiniteError(errors.LOSS_NOT_FINITE.format(
                name=p.name, loc=p.loc, value=loss.item(), step=step))
        bad = [n for n, g in zip(p.param_names, grads) if not bool(torch.isfinite(g).all())]
        raise errors.NonFiniteError(errors.GRAD_NOT_FINITE.format(
            name=p.name, loc=p.loc, where=", ".join(bad), step=step))


def _as_is(vec: T.Vec, kind: str = "product") -> T.Vec:
    return vec


def _check_loss(p: Problem, out: Any) -> None:
    if not isinstance(out, torch.Tensor):
        raise errors.ProblemError(errors.LOSS_NOT_TENSOR.format(
            name=p.name, loc=p.loc, got=f"{type(out).__name__} {out!r}"[:80]))
    if out.numel() != 1:
        raise errors.ProblemError(errors.LOSS_NOT_SCALAR.format(name=p.name, loc=p.loc, shape=tuple(out.shape)))


def state_dict(runtime: Runtime) -> dict[str, Any]:
    return {"iteration": runtime.iteration, "position": runtime.position, "stats": dict(runtime.stats),
            "problems": {n: st.state_dict() for n, st in runtime.state.items()}}


def load_state_dict(runtime: Runtime, sd: dict[str, Any]) -> None:
    runtime.iteration, runtime.position = sd["iteration"], sd["position"]
    runtime.stats = Counter(sd["stats"])
    for name, st in runtime.state.items():
        st.load_state_dict(sd["problems"][name])
        if runtime.device is not None:
            st.to_device(runtime.to_device)


class LossScaler:
    """Dynamic loss scaling for ``precision="fp16"`` (what ``torch.amp.GradScaler`` does, applied
    to the stepping problem's loss, so to its direct gradient and to the adjoint seeds; every
    method is linear in its adjoint, so the whole total gradient is scaled and unscaled once).

    A step whose scaled gradient overflows (the loss itself finite) is skipped and the scale
    halved; after ``growth_interval`` good steps in a row it doubles.
    """

    def __init__(self, scale: float = 2.0 ** 16, growth_interval: int = 2000) -> None:
        self.scale, self.growth_interval, self.good = scale, growth_interval, 0

    def update(self, loss: torch.Tensor, grads: list[torch.Tensor]) -> bool:
        """False when the step overflowed (a host sync, as in GradScaler)."""
        if not T.nonfinite_flag(grads).item() or not bool(torch.isfinite(loss.detach()).all()):
            self.good += 1
            if self.good >= self.growth_interval:
                self.scale, self.good = self.scale * 2.0, 0
            return True
        self.scale, self.good = self.scale / 2.0, 0
        return False
