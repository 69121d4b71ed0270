"""Lowering: the compiler's plan becomes a ``torch.fx`` GraphModule that runs one period.

The plan (plain Python, frozen) is lowered once. Each node of the graph calls a
runtime primitive: ``step`` (one optimizer step of a problem, with its direct
gradient and, for an upper problem, the adjoint accumulation through the lower
problems the plan lists) and ``end_iteration``. Calling the module runs one
period of the schedule; its generated Python is what ``mlodsl plan --code``
prints. Periods longer than :data:`MAX_LOWERED` iterations stay interpreted
(the runtime walks the same plan step by step).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.fx

from compiler import Plan, Step

if TYPE_CHECKING:
    from mlodsl._runtime import Runtime

MAX_LOWERED = 512  # iterations per period


_STEPS: dict[tuple[str, bool, bool], Step] = {}


def step(runtime: Runtime, problem: str, first: bool, last: bool) -> None:
    """One optimizer step of ``problem`` (a round of ``steps`` opens at ``first``, closes at ``last``)."""
    key = (problem, first, last)
    s = _STEPS.get(key)
    if s is None:
        s = _STEPS[key] = Step(problem=problem, first=first, last=last)
    runtime.step(s)
    runtime.position += 1


def end_iteration(runtime: Runtime) -> None:
    runtime.iteration += 1
    runtime.position = 0


torch.fx.wrap("step")
torch.fx.wrap("end_iteration")


class _Period(torch.nn.Module):
    """Holder module: the GraphModule needs a root; the plan has no parameters of its own."""


def lower(plan: Plan) -> torch.fx.GraphModule | None:
    """The period of ``plan`` as a GraphModule ``forward(runtime)``, or None when too long."""
    period = plan.schedule.period
    if len(period) > MAX_LOWERED:
        return None
    graph = torch.fx.Graph()
    runtime = graph.placeholder("runtime")
    for i, iteration in enumerate(period, start=len(plan.schedule.prologue) + 1):
        for s in iteration.steps:
            node = graph.call_function(step, (runtime, s.problem, s.first, s.last))
            node.name = f"iter{i}_{s.problem}"
        graph.call_function(end_iteration, (runtime,)).name = f"end_iter{i}"
    graph.output(None)
    graph.lint()
    module = torch.fx.GraphModule(_Period(), graph, class_name="Period")
    return module


def code(plan: Plan) -> str:
    """The generated Python of the lowered period, annotated with each upper step's hypergradient."""
    module = lower(plan)
    if module is None:
        return (f"# the period has {len(plan.schedule.period)} iterations (> {MAX_LOWERED}): "
                "it runs interpreted, step by step\n")
    notes = []
    for hp in plan.hypergrads:
        if hp.visits:
            chain = " -> ".join(f"{v.problem}:{v.method}" for v in hp.visits)
            notes.append(f"#   step of {hp.problem}: seed {', '.join(hp.seeds)}; visit {chain}")
    header = "# one call runs one period of the schedule\n"
    if notes:
        header += "# hypergradients (adjoint accumulation inside each step):\n" + "\n".join(notes) + "\n"
    return header + module.code.strip() + "\n"
