"""Pass: warn about declared levels that no data flows through (DESIGN §2).

Before and after: the same graph (this pass only looks). For each declaration
"L lists P in upper=", some edge must join P with L or a problem below L: P's
loss reads one of their optima (an l2u edge into P), or one of their losses
reads θ_P (a u2l edge out of P). Otherwise P gets no hypergradient through L
and the level only orders the steps.

Why a warning (:class:`MlodslWarning`) and not a :class:`CompileError`: data
can flow where the compiler does not look (a hook that copies weights, a data
iterable that calls a module, a module called directly instead of through its
problem), so such a program may be meant. What is certainly wrong at compile
time (a reference between unrelated problems) is an error in ``infer_edges``.
A lower problem that reads an optimum but does not depend on θ_P (the paper's
finetune reading θ*_pretrain) is legitimate and not flagged.
"""

from __future__ import annotations

import warnings

from compiler import errors
from compiler.ir import EdgeKind, Graph


def check_dataflow(graph: Graph) -> Graph:
    for upper, lower in dead_levels(graph):
        warnings.warn(errors.NO_DATAFLOW.format(
            lower=lower, lower_loc=graph.node(lower).spec.loc, upper=upper,
            upper_loc=graph.node(upper).spec.loc), errors.MlodslWarning, stacklevel=2)
    return graph


def dead_levels(graph: Graph) -> list[tuple[str, str]]:
    """(upper, lower) for each declared ``upper=`` that no data flows through."""
    return [(up, n.name) for n in graph for up in n.upper if not _connected(graph, up, n.name)]


def _connected(graph: Graph, upper: str, lower: str) -> bool:
    subtree = {lower} | {n.name for n in graph if lower in n.above}
    return any((e.kind is EdgeKind.L2U and e.dst == upper and e.src in subtree)
               or (e.kind is EdgeKind.U2L and e.src == upper and e.dst in subtree)
               for e in graph.edges)
