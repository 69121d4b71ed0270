"""``Program``: collect → compile → run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from compiler import Graph, Plan, compile_specs, errors
from mlodsl._check import public
from mlodsl._collect import collect
from mlodsl._problem import Problem
from mlodsl._runtime import Runtime

NOT_A_PROBLEM = (
    "Program([...]) got {got!r} at position {index}, which is not a problem.\n"
    "Rule: Program takes the functions decorated with @problem(...).\n"
    "Fix: decorate it with @problem(module=..., optimizer=...), or remove it from the list."
)


class Program:
    """A compiled multilevel program.

    ``Program(problems)`` infers the dataflow graph from the losses' code,
    checks it and emits the plan; a broken program raises :class:`CompileError`
    here, before any data is touched. ``program.graph`` is the graph,
    ``program.plan`` the plan (``print`` it), ``program.run(iterations=N)``
    executes N iterations (steps of the lowermost problems), continuing where
    the previous ``run`` stopped.
    """

    @public
    def __init__(self, problems: Sequence[Problem], *, nan_policy: Literal["raise", "skip"] = "raise") -> None:
        self.problems = tuple(problems)
        specs, reach = collect(self.problems)
        self.plan: Plan = compile_specs(specs)
        self.graph: Graph = self.plan.graph
        self._runtime = Runtime(self.plan, {p.name: p for p in self.problems}, reach)
        self._runtime.guard.nan_policy = nan_policy

    @public
    def run(self, iterations: int) -> None:
        """Run ``iterations`` more iterations of the schedule."""
        if iterations < 0:
            raise errors.UsageError(f"Program.run(): iterations={iterations} must be >= 0.")
        self._runtime.run(iterations)

    def __getitem__(self, name: str) -> Problem:
        return next(p for p in self.problems if p.name == name)

    @property
    def iteration(self) -> int:
        """Iterations completed so far (steps of the lowermost problems)."""
        return self._runtime.iteration

    @property
    def stats(self) -> dict[str, int]:
        """Counters: steps per problem, method calls per lower problem, Hessian-vector products."""
        return dict(self._runtime.stats)

    def reset_stats(self) -> None:
        self._runtime.stats.clear()

    @property
    def diagnostics(self) -> dict[str, Any]:
        """The latest solver diagnostics (CG residual, Neumann term norm, FD epsilon) per problem."""
        return dict(self._runtime.diagnostics)

    def losses(self) -> dict[str, float]:
        """The loss of each problem at its latest step."""
        return {n: float(s.last_loss) for n, s in self._runtime.state.items() if s.last_loss is not None}

    def gradient(self, problem: Problem | str, batch: Any = None) -> list[torch.Tensor]:
        """The total gradient dC_P/dθ_P that P's next step would apply, without stepping.

        ``batch`` defaults to the next batch of P's data. Lower problems use the
        batch of their latest step.
        """
        p = problem if isinstance(problem, Problem) else self[problem]
        st = self._runtime.state[p.name]
        if batch is None:
            batch = st.batches.next()
        grads, _ = self._runtime.total_gradient(p, batch)
        return [g.detach() for g in grads]

    def __repr__(self) -> str:
        return f"Program({[p.name for p in self.problems]})"
