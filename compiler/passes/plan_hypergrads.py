"""Plan pass: for each problem P, the adjoint accumulation of its hypergradient.

θ_P reaches the loss of P through paths θ_P → θ*_l → … → θ*_m (paper eq. 2):
one upper-to-lower edge out of P, then lower-to-upper edges, ending at a θ*_m
that P's loss reads. The plan seeds an adjoint v_m = ∂C_P/∂θ*_m for each such
m, and visits the problems on those paths consumers first, so that each visited
problem Q calls its method once with its accumulated adjoint and hands the
result to θ_P and/or to the lower optima its own loss reads. A problem whose
method is ``first_order`` passes nothing on, so paths through it are cut here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from compiler.ir import EdgeKind, Graph
from compiler.plan import HypergradPlan, Visit

FIRST_ORDER = "first_order"


def plan_hypergrads(graph: Graph) -> tuple[HypergradPlan, ...]:
    return tuple(_plan_for(graph, node.name) for node in graph)


def _plan_for(graph: Graph, top: str) -> HypergradPlan:
    reads = [e.src for e in graph.edges_of(EdgeKind.L2U) if e.dst == top]
    depends = _depends_on(graph, top)
    relevant = _reaching(graph, depends, set(reads) & depends)
    seeds = tuple(r for r in reads if r in relevant)
    visits = tuple(_visit(graph, top, q, relevant) for q in _consumers_first(graph, relevant))
    return HypergradPlan(problem=top, seeds=seeds, visits=visits)


def _depends_on(graph: Graph, top: str) -> set[str]:
    """Problems below ``top`` whose optimum moves with θ_top (through non-first-order methods)."""
    below = {n.name for n in graph if top in n.above and n.method != FIRST_ORDER}
    start = {e.dst for e in graph.edges_of(EdgeKind.U2L) if e.src == top and e.dst in below}
    readers = {n: [e.dst for e in graph.edges_of(EdgeKind.L2U) if e.src == n and e.dst in below] for n in below}
    return _closure(start, lambda n: readers.get(n, []))


def _reaching(graph: Graph, within: set[str], targets: set[str]) -> set[str]:
    """Problems in ``within`` from which a target is reachable by l2u edges inside ``within``."""
    read = {n: [e.src for e in graph.edges_of(EdgeKind.L2U) if e.dst == n and e.src in within]
            for n in graph.names}
    return _closure(set(targets), lambda n: read[n])


def _closure(start: set[str], neighbours: Callable[[str], Iterable[str]]) -> set[str]:
    """Everything reachable from ``start`` (included) by repeatedly taking ``neighbours``."""
    found, frontier = set(start), list(start)
    while frontier:
        for nxt in neighbours(frontier.pop()):
            if nxt not in found:
                found.add(nxt)
                frontier.append(nxt)
    return found


def _consumers_first(graph: Graph, relevant: set[str]) -> list[str]:
    """Order ``relevant`` so that Q comes before every R whose optimum Q's loss reads."""
    l2u = [e for e in graph.edges_of(EdgeKind.L2U) if e.src in relevant and e.dst in relevant]
    pending = {q: sum(1 for e in l2u if e.src == q) for q in relevant}
    order: list[str] = []
    ready = [q for q in graph.names if q in relevant and pending[q] == 0]
    while ready:
        q = ready.pop(0)
        order.append(q)
        for e in l2u:
            if e.dst == q:
                pending[e.src] -= 1
                if pending[e.src] == 0:
                    ready.append(e.src)
    return order


def _visit(graph: Graph, top: str, q: str, relevant: set[str]) -> Visit:
    node = graph.node(q)
    to_lowers = tuple(e.src for e in graph.edges_of(EdgeKind.L2U) if e.dst == q and e.src in relevant)
    return Visit(problem=q, method=node.method, method_repr=node.spec.method_repr,
                 to_upper=graph.has_edge(top, q, EdgeKind.U2L), to_lowers=to_lowers)
