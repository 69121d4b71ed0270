"""The verifier: invariants every graph and plan must keep after every pass.

A violation is a bug in a pass, not in the user's program, so it raises
:class:`InternalError` with the pass's name and the whole graph.
"""

from __future__ import annotations

from compiler import errors
from compiler.ir import EdgeKind, Graph


def verify(graph: Graph, after: str) -> None:
    problems = list(_graph_problems(graph))
    if problems:
        raise errors.InternalError(
            f"the graph is invalid after pass {after!r}:\n  " + "\n  ".join(problems)
            + "\n" + graph.describe())


def _graph_problems(graph: Graph):
    for node in graph:
        for up in node.above:
            if up not in graph:
                yield f"{node.name} is below unknown problem {up!r}"
            elif node.name in graph.node(up).above:
                yield f"{node.name} and {up} are each above the other"
        if node.level and any(graph.node(low).level >= node.level for low in graph.lowers(node.name)):
            yield f"{node.name} (level {node.level}) is not above all its lower problems"
    for edge in graph.edges:
        if edge.src not in graph or edge.dst not in graph:
            yield f"edge {edge} names an unknown problem"
            continue
        upper, lower = (edge.src, edge.dst) if edge.kind is EdgeKind.U2L else (edge.dst, edge.src)
        if upper not in graph.node(lower).above:
            yield f"edge {edge} does not go between an upper and a lower problem"
