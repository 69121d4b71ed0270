"""Pass: dataflow edges from the references of each loss (DESIGN §2).

For each problem Q referenced by the loss of P (Q ≠ P): Q above P gives an
upper-to-lower edge Q → P; Q below P gives a lower-to-upper edge Q → P;
anything else is a :class:`CompileError` suggesting ``upper=``.
"""

from __future__ import annotations

from attrs import evolve

from compiler import errors
from compiler.ir import Edge, EdgeKind, Graph, Node, Reference


def infer_edges(graph: Graph) -> Graph:
    edges: list[Edge] = []
    for node in graph:
        for ref in node.spec.references:
            edge = _edge(graph, node, ref)
            if edge is not None and edge not in edges:
                edges.append(edge)
    return evolve(graph, edges=tuple(edges))


def _edge(graph: Graph, node: Node, ref: Reference) -> Edge | None:
    if ref.target == node.name:
        return None
    if ref.target not in graph:
        raise errors.CompileError(errors.UNKNOWN_REFERENCE.format(
            name=node.name, loc=ref.loc, other=ref.target))
    if ref.target in node.above:
        return Edge(ref.target, node.name, EdgeKind.U2L)
    if node.name in graph.node(ref.target).above:
        return Edge(ref.target, node.name, EdgeKind.L2U)
    other = graph.node(ref.target)
    raise errors.CompileError(errors.UNRELATED_REFERENCE.format(
        name=node.name, loc=ref.loc, other=other.name, other_loc=other.spec.loc))
