"""Build the first graph from problem specs: one node per problem, no edges yet."""

from __future__ import annotations

import difflib

from compiler import errors
from compiler.ir import Graph, Node, ProblemSpec


def build_graph(specs: tuple[ProblemSpec, ...]) -> Graph:
    """Check names, ``upper=`` targets and ``steps``; return a graph of bare nodes."""
    seen: dict[str, ProblemSpec] = {}
    for spec in specs:
        if spec.name in seen:
            raise errors.CompileError(errors.DUPLICATE_NAME.format(
                name=spec.name, first=seen[spec.name].loc, second=spec.loc))
        seen[spec.name] = spec
    for spec in specs:
        _check_spec(spec, seen)
    return Graph(nodes=tuple(Node(spec=s) for s in specs))


def _check_spec(spec: ProblemSpec, known: dict[str, ProblemSpec]) -> None:
    if not isinstance(spec.steps, int) or isinstance(spec.steps, bool) or spec.steps < 1:
        raise errors.CompileError(errors.BAD_STEPS.format(name=spec.name, loc=spec.loc, steps=spec.steps))
    for up in spec.upper:
        if spec.upper.count(up) > 1:
            raise errors.CompileError(errors.DUPLICATE_UPPER.format(
                name=spec.name, loc=spec.loc, upper=up, count=spec.upper.count(up)))
        if up == spec.name:
            raise errors.CompileError(errors.SELF_UPPER.format(name=spec.name, loc=spec.loc))
        if up not in known:
            fix = f"add the problem {up!r} to Program([...])"
            close = difflib.get_close_matches(up, [k for k in known if k != spec.name], n=1, cutoff=0.6)
            if close:
                fix += f", or did you mean {close[0]!r}?"
            raise errors.CompileError(errors.UNKNOWN_UPPER.format(
                name=spec.name, loc=spec.loc, upper=up, fix=fix))
