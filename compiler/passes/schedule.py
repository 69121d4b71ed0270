"""Plan pass: the static schedule of one period (the paper's execution order).

The lowermost problems step every iteration, in program order. A problem that
has taken ``steps`` steps signals each problem in its ``upper=``; an upper
problem steps (at once, depth first, as Betty does) when every problem that
lists it in ``upper=`` has signalled since its last step. The state of this
machine (step counters and signals) is finite, so the sequence of iterations
is a prologue followed by a period that repeats forever; both are simulated
here once, and the runtime only indexes them.
"""

from __future__ import annotations

from compiler import errors
from compiler.ir import Graph
from compiler.plan import Iteration, Schedule, Step

MAX_PERIOD = 100_000

_State = tuple[tuple[int, ...], tuple[frozenset[str], ...]]


def schedule(graph: Graph) -> Schedule:
    sim = _Simulator(graph)
    seen: dict[_State, int] = {}
    iterations: list[Iteration] = []
    while (state := sim.state()) not in seen:
        if len(iterations) > MAX_PERIOD:
            deep = [f"{n.name!r} ({n.spec.loc}, steps={n.steps})" for n in graph if n.steps > 1]
            raise errors.CompileError(errors.SCHEDULE_TOO_LONG.format(
                period=MAX_PERIOD, limit=MAX_PERIOD, names=", ".join(deep)))
        seen[state] = len(iterations)
        iterations.append(sim.iteration())
    start = seen[state]
    return Schedule(prologue=tuple(iterations[:start]), period=tuple(iterations[start:]))


class _Simulator:
    """Betty's signalling semantics, run on names only."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.names = graph.names
        self.lowers = {n: frozenset(graph.lowers(n)) for n in self.names}
        self.count = {n: 0 for n in self.names}
        self.ready: dict[str, set[str]] = {n: set() for n in self.names}
        self.steps: list[Step] = []

    def state(self) -> _State:
        return (tuple(self.count[n] for n in self.names),
                tuple(frozenset(self.ready[n]) for n in self.names))

    def iteration(self) -> Iteration:
        self.steps = []
        for leaf in self.graph.lowermost():
            self._step(leaf)
        return Iteration(steps=tuple(self.steps))

    def _step(self, name: str) -> None:
        if self.ready[name] != self.lowers[name]:
            return
        node = self.graph.node(name)
        first, last = self.count[name] == 0, self.count[name] + 1 == node.steps
        self.steps.append(Step(problem=name, first=first, last=last))
        self.ready[name] = set()
        self.count[name] = (self.count[name] + 1) % node.steps
        if last:
            for up in node.upper:
                self.ready[up].add(name)
                self._step(up)
