"""The frozen, typed IR of the compiler: problem specs, the dataflow graph and its parts.

Nothing here imports torch. Passes take a :class:`Graph` and return a new one
(``attrs.evolve``); they never mutate.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator

from attrs import field, frozen


@frozen
class SourceLoc:
    """Where a user's function (or a reference in it) lives."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@frozen
class Reference:
    """One problem a loss reads: found in its code, or declared with ``uses=``."""

    target: str
    loc: SourceLoc
    declared: bool = False


@frozen
class ProblemSpec:
    """What the compiler needs to know of one decorated problem (no torch objects).

    ``method`` is the hypergradient method's registered name (``"neumann"``);
    ``method_repr`` is how it prints (``"Neumann(iterations=3)"``). ``info`` is
    display-only: module class, parameter count, optimizer and lr, for the plan
    and the picture.
    """

    name: str
    loc: SourceLoc
    upper: tuple[str, ...] = ()
    references: tuple[Reference, ...] = ()
    steps: int = 1
    method: str = "fd"
    method_repr: str = "FiniteDifference()"
    info: tuple[tuple[str, str], ...] = ()


class EdgeKind(enum.Enum):
    """The two kinds of dataflow edge of the paper (Figure 2)."""

    U2L = "upper-to-lower"  # θ_src (non-optimal) constrains dst; src is above dst
    L2U = "lower-to-upper"  # dst's loss reads θ*_src; src is below dst


@frozen
class Edge:
    src: str
    dst: str
    kind: EdgeKind

    def __str__(self) -> str:
        arrow = "-u2l->" if self.kind is EdgeKind.U2L else "-l2u->"
        return f"{self.src} {arrow} {self.dst}"


@frozen
class Node:
    """One problem in the graph.

    ``upper`` are the direct uppers declared with ``upper=``; ``above`` is their
    transitive closure (filled by ``close_uppers``); ``level`` is 1 for the
    lowermost problems (filled by ``infer_levels``).
    """

    spec: ProblemSpec
    above: tuple[str, ...] = ()
    level: int = 0

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def upper(self) -> tuple[str, ...]:
        return self.spec.upper

    @property
    def steps(self) -> int:
        return self.spec.steps

    @property
    def method(self) -> str:
        return self.spec.method


@frozen
class Graph:
    """The multilevel dataflow graph: problems and typed edges, in program order."""

    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...] = ()
    _index: dict[str, int] = field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_index", {n.name: i for i, n in enumerate(self.nodes)})

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def node(self, name: str) -> Node:
        return self.nodes[self._index[name]]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.nodes)

    def edges_of(self, kind: EdgeKind) -> tuple[Edge, ...]:
        return tuple(e for e in self.edges if e.kind is kind)

    def has_edge(self, src: str, dst: str, kind: EdgeKind) -> bool:
        return Edge(src, dst, kind) in self.edges

    def lowers(self, name: str) -> tuple[str, ...]:
        """Problems that list ``name`` directly in their ``upper=``."""
        return tuple(n.name for n in self.nodes if name in n.upper)

    def below(self, name: str, other: str) -> bool:
        """True when ``name`` is (transitively) below ``other``."""
        return other in self.node(name).above

    def lowermost(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.nodes if not self.lowers(n.name))

    def describe(self) -> str:
        """The whole graph as text, for verifier errors and debugging."""
        lines = [f"Graph with {len(self.nodes)} problems, {len(self.edges)} edges:"]
        for n in self.nodes:
            lines.append(
                f"  {n.name}: level={n.level} upper={list(n.upper)} above={list(n.above)} "
                f"steps={n.steps} method={n.method} ({n.spec.loc})"
            )
        lines.extend(f"  edge {e}" for e in self.edges)
        return "\n".join(lines)
