"""The mlodsl compiler: problem specs → dataflow graph → verified passes → plan.

The pipeline, one file per stage::

    ir.ProblemSpec  (what mlodsl collected from the decorated losses)
      └─ build.build_graph          bare nodes, names and upper= checked
          └─ passes.PIPELINE        close_uppers → infer_levels → infer_edges → check_dataflow
              │   (verify.verify after each pass)
              └─ passes.schedule, passes.plan_hypergrads
                  └─ plan.Plan      frozen, printable, executed by the runtime

Everything here is plain Python: it does not import torch, needs no data, and
runs nothing of the user's code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from compiler.build import build_graph
from compiler.errors import CompileError, InternalError, MlodslError, ProblemError, UsageError
from compiler.ir import Edge, EdgeKind, Graph, Node, ProblemSpec, Reference, SourceLoc
from compiler.passes import PIPELINE
from compiler.passes.plan_hypergrads import plan_hypergrads
from compiler.passes.schedule import schedule
from compiler.plan import HypergradPlan, Iteration, Plan, Schedule, Step, Visit
from compiler.verify import verify

Pass = Callable[[Graph], Graph]


def run_passes(graph: Graph, passes: Sequence[Pass] = PIPELINE) -> Graph:
    verify(graph, after="build_graph")
    for p in passes:
        graph = p(graph)
        verify(graph, after=p.__name__)
    return graph


def compile_specs(specs: Sequence[ProblemSpec]) -> Plan:
    """Compile problem specs to a verified :class:`Plan` (its ``graph`` is the dataflow graph)."""
    graph = run_passes(build_graph(tuple(specs)))
    return Plan(graph=graph, schedule=schedule(graph), hypergrads=plan_hypergrads(graph))


__all__ = [
    "CompileError", "Edge", "EdgeKind", "Graph", "HypergradPlan", "InternalError", "Iteration",
    "MlodslError", "Node", "Plan", "ProblemError", "ProblemSpec", "Reference", "Schedule",
    "SourceLoc", "Step", "UsageError", "Visit", "compile_specs", "run_passes",
]
