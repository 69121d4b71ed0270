"""The execution plan: frozen, plain Python, readable by a person.

A :class:`Plan` holds the graph it was made from, the static :class:`Schedule`
(prologue + one repeating period of iterations, each a tuple of problem steps)
and, per problem, the :class:`HypergradPlan` of its adjoint accumulation.
``str(plan)`` is what ``print(program.plan)`` and ``mlodsl plan`` show.
"""

from __future__ import annotations

from attrs import frozen

from compiler.ir import EdgeKind, Graph


@frozen
class Step:
    """One optimizer step of ``problem``; ``first``/``last`` open and close a round of ``steps``."""

    problem: str
    first: bool = True
    last: bool = True


@frozen
class Iteration:
    """What runs in one iteration (one step of each lowermost problem, and what it triggers)."""

    steps: tuple[Step, ...]

    def __str__(self) -> str:
        return ", ".join(s.problem for s in self.steps)


@frozen
class Schedule:
    prologue: tuple[Iteration, ...]
    period: tuple[Iteration, ...]

    def iteration(self, index: int) -> Iteration:
        """The iteration at 0-based ``index`` since the program started."""
        if index < len(self.prologue):
            return self.prologue[index]
        return self.period[(index - len(self.prologue)) % len(self.period)]

    def count(self, problem: str) -> int:
        """Steps of ``problem`` in one period."""
        return sum(1 for it in self.period for s in it.steps if s.problem == problem)


@frozen
class Visit:
    """Apply ``problem``'s method to its accumulated adjoint, passing the result on."""

    problem: str
    method: str
    method_repr: str
    to_upper: bool
    to_lowers: tuple[str, ...]


@frozen
class HypergradPlan:
    """How the gradient of ``problem`` is formed: direct gradient plus the visits."""

    problem: str
    seeds: tuple[str, ...]
    visits: tuple[Visit, ...]

    def method_calls(self) -> int:
        return len(self.visits)


@frozen
class Plan:
    graph: Graph
    schedule: Schedule
    hypergrads: tuple[HypergradPlan, ...]

    def hypergrad(self, problem: str) -> HypergradPlan:
        return next(h for h in self.hypergrads if h.problem == problem)

    def __str__(self) -> str:
        return format_plan(self)


def format_plan(plan: Plan) -> str:
    g = plan.graph
    lines = [f"Plan: {len(g.nodes)} problems, {len(g.edges)} edges, "
             f"period of {len(plan.schedule.period)} iteration(s)", "", "problems (top level first):"]
    for node in sorted(g.nodes, key=lambda n: -n.level):
        extra = "".join(f"  {k}={v}" for k, v in node.spec.info)
        method = node.spec.method_repr if node.upper else "- (top level)"
        lines.append(f"  L{node.level} {node.name:<14} steps={node.steps}  hypergrad={method}"
                     f"{extra}  ({node.spec.loc})")
    lines += ["", "edges:"] + [f"  {e.src} -> {e.dst}  ({e.kind.value})" for e in g.edges]
    if not g.edges:
        lines.append("  (none)")
    if plan.schedule.prologue:
        lines += ["", "schedule, prologue (runs once):"] + _runs(plan.schedule.prologue, 1)
    lines += ["", "schedule, one period (repeats):"]
    lines += _runs(plan.schedule.period, len(plan.schedule.prologue) + 1)
    lines += ["", "hypergradients:"]
    for hp in plan.hypergrads:
        lines += _format_hypergrad(g, hp)
    return "\n".join(lines)


def _runs(iterations: tuple[Iteration, ...], start: int) -> list[str]:
    """Iterations, with runs of identical ones collapsed into a range."""
    out: list[str] = []
    i = 0
    while i < len(iterations):
        j = i
        while j + 1 < len(iterations) and str(iterations[j + 1]) == str(iterations[i]):
            j += 1
        label = f"{start + i}" if i == j else f"{start + i}-{start + j}"
        out.append(f"  iter {label:<9} step {str(iterations[i]).replace(', ', ' -> ')}")
        i = j + 1
    return out


def _format_hypergrad(g: Graph, hp: HypergradPlan) -> list[str]:
    if not hp.visits:
        reads = [e.src for e in g.edges_of(EdgeKind.L2U) if e.dst == hp.problem]
        why = " (reads no lower optimum)" if not reads else " (no path back to its parameters)"
        return [f"  {hp.problem}: direct gradient only{why}"]
    out = [f"  {hp.problem}: direct gradient + adjoints seeded at {', '.join(hp.seeds)}"]
    for v in hp.visits:
        targets = ([f"θ_{hp.problem}"] if v.to_upper else []) + [f"θ*_{r}" for r in v.to_lowers]
        out.append(f"    {v.problem}: {v.method_repr} -> {', '.join(targets)}")
    return out
