"""Property-based tests (hypothesis): random programs against independent statements of the rules.

- Graphs: random hierarchies and reference sets (duplicates, cycles, unknown
  and self ``upper=``, unrelated and unknown references, bad ``steps``) either
  compile to exactly the graph, levels, dataflow warnings and schedule that a
  reimplementation of DESIGN §2 written here gives, or raise ``CompileError``
  when that reimplementation finds a broken rule; never anything else. Once on
  bare specs (the torch-free compiler), once through ``@problem`` and
  ``Program`` (collect, torch-side checks).
- Hypergradients: random quadratic multilevel programs (2–5 problems, a random
  DAG of ``upper=``, random reads, dims 1–3, a random method per problem, a
  random number of steps and iterations) give, for every problem, the gradient
  that ``tests/quadratic.expected_gradient`` computes by forward Jacobians
  over the paper's paths: CG with iterations ≥ dim on converged lowers equals
  the exact implicit hypergradient; Neumann, FD, Unrolled and first order
  equal their own formulas (DESIGN §3).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

from compiler import CompileError, EdgeKind, ProblemSpec, Reference, SourceLoc, compile_specs
from mlodsl import MlodslWarning, Program, problem
from mlodsl.hypergrad import CG, FiniteDifference, FirstOrder, Neumann, Unrolled
from tests.quadratic import DT, Q, build, converge, expected_gradient, neumann_S

EXAMPLES = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NAMES = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta"]
LOC = SourceLoc("random.py", 1)


# -- DESIGN §2, restated ------------------------------------------------------------------
class Broken(Exception):
    """The restatement found a broken rule: the compiler must raise CompileError."""


def expected_graph(specs: Sequence[ProblemSpec]) -> dict:
    """Above-sets, levels, typed edges and dead levels of a program, or :class:`Broken`."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise Broken("duplicate name")
    by = {s.name: s for s in specs}
    for s in specs:
        if (type(s.steps) is not int or s.steps < 1 or s.name in s.upper or set(s.upper) - set(names)
                or len(set(s.upper)) != len(s.upper)):
            raise Broken("bad steps or upper=")
    above = {n: _closure(by, n) for n in names}
    if any(n in above[n] for n in names):
        raise Broken("cycle")
    edges = set()
    for s in specs:
        for r in {r.target for r in s.references} - {s.name}:
            if r not in by:
                raise Broken("unknown reference")
            if r in above[s.name]:
                edges.add((r, s.name, EdgeKind.U2L))
            elif s.name in above[r]:
                edges.add((r, s.name, EdgeKind.L2U))
            else:
                raise Broken("unrelated reference")
    lowers = {n: [m for m in names if n in by[m].upper] for n in names}
    levels: dict[str, int] = {}

    def level(n: str) -> int:
        if n not in levels:
            levels[n] = 1 + max((level(m) for m in lowers[n]), default=0)
        return levels[n]

    dead = set()
    for s in specs:
        for up in s.upper:
            sub = {s.name} | {m for m in names if s.name in above[m]}
            if not any((a == up and b in sub) or (b == up and a in sub) for a, b, _ in edges):
                dead.add((up, s.name))
    return {"above": {n: set(a) for n, a in above.items()}, "level": {n: level(n) for n in names},
            "edges": edges, "dead": dead}


def _closure(by: dict[str, ProblemSpec], name: str) -> set[str]:
    found, stack = set(), list(by[name].upper)
    while stack:
        up = stack.pop()
        if up not in found:
            found.add(up)
            stack.extend(by[up].upper if up in by else ())
        if len(found) > len(by):
            break
    return found


def expected_schedule(specs: Sequence[ProblemSpec], iterations: int) -> list[list[tuple[str, bool, bool]]]:
    """Betty's order (DESIGN §2): the lowermost step every iteration; a problem that has taken
    ``steps`` steps signals its uppers; an upper steps once all its lowers have signalled."""
    by = {s.name: s for s in specs}
    lowers = {n: {m for m in by if n in by[m].upper} for n in by}
    count = {n: 0 for n in by}
    signals: dict[str, set[str]] = {n: set() for n in by}
    out: list[list[tuple[str, bool, bool]]] = []

    def step(n: str) -> None:
        first, last = count[n] % by[n].steps == 0, (count[n] + 1) % by[n].steps == 0
        out[-1].append((n, first, last))
        count[n] += 1
        if last:
            for up in by[n].upper:
                signals[up].add(n)
                if signals[up] == lowers[up]:
                    signals[up] = set()
                    step(up)

    for _ in range(iterations):
        out.append([])
        for n in by:
            if not lowers[n]:
                step(n)
    return out


# -- random programs --------------------------------------------------------------------
@st.composite
def random_specs(draw) -> list[ProblemSpec]:
    """Mostly well-formed hierarchies (uppers drawn from earlier problems, references from related
    ones), with every kind of mistake mixed in at a low rate."""
    n = draw(st.integers(1, 6))
    names = draw(st.lists(st.sampled_from(NAMES), min_size=n, max_size=n, unique=True))
    if draw(st.integers(0, 19)) == 0:
        names[-1] = names[0]                                      # a duplicate name
    uppers: list[list[str]] = []
    for i, name in enumerate(names):
        up = draw(st.lists(st.sampled_from(names[:i]), unique=True, max_size=2)) if i else []
        if draw(st.integers(0, 14)) == 0:
            up.append(draw(st.sampled_from(names + ["ghost"])))   # a cycle, self, or unknown upper
        uppers.append(up)
    related = _related(names, uppers)
    specs = []
    for i, name in enumerate(names):
        if draw(st.integers(0, 9)) == 0:                          # maybe unrelated or unknown
            refs = draw(st.lists(st.sampled_from(names + ["ghost"]), unique=True, max_size=2))
        else:
            refs = [r for r in sorted(related[name]) if draw(st.integers(0, 9)) < 6]
        steps = draw(st.sampled_from([1, 1, 1, 2, 3] + ([0] if draw(st.integers(0, 19)) == 0 else [])))
        specs.append(ProblemSpec(name=name, loc=LOC, upper=tuple(uppers[i]), steps=steps,
                                 references=tuple(Reference(r, LOC) for r in refs)))
    return specs


def _related(names: list[str], uppers: list[list[str]]) -> dict[str, set[str]]:
    by = dict(zip(names, uppers))
    above = {}
    for n in names:
        found, stack = set(), list(by[n])
        while stack:
            u = stack.pop()
            if u in by and u not in found and u != n:
                found.add(u)
                stack.extend(by[u])
        above[n] = found
    return {n: above[n] | {m for m in names if n in above[m]} for n in names}


def check_compiles_as_the_rules_say(specs: Sequence[ProblemSpec], compile_fn) -> None:
    try:
        want = expected_graph(specs)
    except Broken:
        want = None
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        try:
            plan = compile_fn()
        except CompileError:
            assert want is None, "CompileError for a program that follows every rule"
            event("CompileError")
            return
    assert want is not None, "a broken program compiled"
    event(f"compiles, {len(plan.graph.edges)} edges, {len(want['dead'])} dead levels")
    g = plan.graph
    assert {n.name: set(n.above) for n in g} == want["above"]
    assert {n.name: n.level for n in g} == want["level"]
    assert {(e.src, e.dst, e.kind) for e in g.edges} == want["edges"]
    warned = [str(w.message) for w in record if issubclass(w.category, MlodslWarning)]
    assert len(warned) == len(want["dead"])
    assert all(any(f"lists {up!r}" in m and m.startswith(f"problem {low!r}") for m in warned)
               for up, low in want["dead"])
    n = len(plan.schedule.prologue) + 2 * len(plan.schedule.period)
    got = [[(s.problem, s.first, s.last) for s in plan.schedule.iteration(i).steps] for i in range(n)]
    assert got == expected_schedule(specs, n)


@EXAMPLES
@given(random_specs())
def test_random_specs_compile_to_the_rules_graph_or_raise_compile_error(specs):
    check_compiles_as_the_rules_say(specs, lambda: compile_specs(specs))


@EXAMPLES
@given(random_specs())
def test_random_programs_through_problem_and_program(specs):
    """The same through the public API: modules, optimizers, upper= by name, references by uses=."""
    problems = []
    for s in specs:
        m = nn.Linear(1, 1)
        p = problem(module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1), upper=list(s.upper),
                    uses=[r.target for r in s.references], steps=s.steps, name=s.name)(lambda: 0)
        problems.append(p)
    check_compiles_as_the_rules_say(specs, lambda: Program(problems).plan)


# -- hypergradients of random quadratic programs ------------------------------------------
METHODS = ["cg", "neumann", "fd", "itd", "first_order"]


@st.composite
def random_quadratics(draw) -> tuple[list[Q], int, int]:
    n = draw(st.integers(2, 5))
    names = [f"q{i}" for i in range(n)]
    uppers = [draw(st.lists(st.sampled_from(names[:i]), unique=True, min_size=min(i, 1), max_size=2))
              if i else [] for i in range(n)]
    related = _related(names, uppers)
    qs = []
    for i, name in enumerate(names):
        dim = draw(st.integers(1, 3))
        kind = draw(st.sampled_from(METHODS))
        method = {"cg": CG(iterations=dim + draw(st.integers(0, 2))),
                  "neumann": Neumann(iterations=draw(st.integers(0, 3))), "fd": FiniteDifference(eps=0.1),
                  "itd": Unrolled(), "first_order": FirstOrder()}[kind]
        reads = [r for r in sorted(related[name]) if draw(st.integers(0, 9)) < 6]
        qs.append(Q(name, dim, reads=reads, upper=uppers[i], method=method,
                    steps=draw(st.integers(1, 2)), lr=draw(st.sampled_from([0.05, 0.1]))))
    return qs, draw(st.integers(0, 5)), draw(st.integers(0, 2 ** 16))


def method_S(quad, name: str) -> torch.Tensor:
    """The matrix standing in for A_q⁻¹ in the method of q (DESIGN §3)."""
    q, A = quad.specs[name], quad.A[name]
    eye = torch.eye(q.n, dtype=DT)
    if isinstance(q.method, CG):
        return torch.linalg.inv(A)
    if isinstance(q.method, Neumann):
        return neumann_S(A, q.lr, q.method.iterations)
    if isinstance(q.method, FiniteDifference):
        return q.lr * eye
    if isinstance(q.method, Unrolled):  # plain SGD over the T recorded updates
        window = quad.program._runtime.state[name].window
        T = len(window.steps) if window is not None else 0
        return neumann_S(A, q.lr, T - 1) if T else 0 * eye
    return 0 * eye


@EXAMPLES
@given(random_quadratics())
def test_random_quadratic_programs_match_the_closed_form(case):
    qs, iterations, seed = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quad = build(qs, seed=seed)
        quad.program.run(iterations=iterations)
        by_level = sorted(quad.specs, key=lambda n: quad.program.graph.node(n).level)
        for top in by_level:
            below = [n for n in by_level if top in quad.above(n)]
            converge(quad, below)
            S = {n: method_S(quad, n) for n in quad.specs}
            for visit in quad.program.plan.hypergrad(top).visits:
                lower = quad.specs[visit.problem]
                window = quad.program._runtime.state[lower.name].window
                T = f" over {len(window.steps)} updates" if isinstance(lower.method, Unrolled) and window else ""
                event(f"visits a lower with {type(lower.method).__name__}{T}")
            (got,) = quad.program.gradient(top)
            want = expected_gradient(quad, top, S)
            assert float((got - want).norm()) <= 1e-8 * (1.0 + float(want.norm())), (top, got, want)
