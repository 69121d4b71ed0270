"""Pass: the transitive closure of ``upper=`` (an upper of an upper is an upper).

Before: nodes with ``above=()``. After: ``above`` holds every problem above
the node, in program order. A cycle is a :class:`CompileError`.
"""

from __future__ import annotations

from attrs import evolve

from compiler import errors
from compiler.ir import Graph


def close_uppers(graph: Graph) -> Graph:
    _check_acyclic(graph)
    order = graph.names
    nodes = []
    for node in graph:
        found: set[str] = set()
        stack = list(node.upper)
        while stack:
            up = stack.pop()
            if up not in found:
                found.add(up)
                stack.extend(graph.node(up).upper)
        nodes.append(evolve(node, above=tuple(n for n in order if n in found)))
    return evolve(graph, nodes=tuple(nodes))


def _check_acyclic(graph: Graph) -> None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for up in graph.node(name).upper:
            if state.get(up) == 1:
                cycle = path[path.index(up):] + [up]
                first = graph.node(cycle[0])
                raise errors.CompileError(errors.UPPER_CYCLE.format(
                    cycle=" -> upper ".join(cycle), name=first.name, loc=first.spec.loc))
            if up not in state:
                visit(up)
        path.pop()
        state[name] = 2

    for name in graph.names:
        if name not in state:
            visit(name)
