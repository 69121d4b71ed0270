"""Pass: levels. The lowermost problems are level 1; a problem is one level above
the highest of the problems that list it in ``upper=``."""

from __future__ import annotations

from functools import cache

from attrs import evolve

from compiler.ir import Graph


def infer_levels(graph: Graph) -> Graph:
    @cache
    def level(name: str) -> int:
        return 1 + max((level(low) for low in graph.lowers(name)), default=0)

    return evolve(graph, nodes=tuple(evolve(n, level=level(n.name)) for n in graph))
