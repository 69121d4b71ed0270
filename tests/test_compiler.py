"""The compiler alone: plain Python specs in, graph and plan out (no torch, milliseconds)."""

from __future__ import annotations

import pytest

from compiler import CompileError, EdgeKind, ProblemSpec, Reference, SourceLoc, compile_specs, errors
from compiler.build import build_graph
from compiler.passes import close_uppers, infer_edges, infer_levels
from compiler.plan import Iteration, Step

LOC = SourceLoc("prog.py", 10)


def spec(name: str, upper=(), reads=(), steps: int = 1, method: str = "fd") -> ProblemSpec:
    refs = tuple(Reference(r, SourceLoc("prog.py", 20)) for r in reads)
    return ProblemSpec(name=name, loc=LOC, upper=tuple(upper), references=refs, steps=steps, method=method)


def chain(**steps):
    return [spec("top", reads=["mid"], steps=steps.get("top", 1)),
            spec("mid", upper=["top"], reads=["low"], steps=steps.get("mid", 1)),
            spec("low", upper=["mid"], reads=["top"], steps=steps.get("low", 1))]


def test_close_uppers_before_and_after():
    before = build_graph(tuple(chain()))
    assert [n.above for n in before] == [(), (), ()]
    after = close_uppers(before)
    assert {n.name: n.above for n in after} == {"top": (), "mid": ("top",), "low": ("top", "mid")}
    assert before.nodes[2].above == ()  # passes return new graphs


def test_infer_levels_puts_the_lowermost_at_one():
    g = infer_levels(close_uppers(build_graph(tuple(chain()))))
    assert {n.name: n.level for n in g} == {"top": 3, "mid": 2, "low": 1}


def test_infer_edges_types_each_reference():
    g = infer_edges(infer_levels(close_uppers(build_graph(tuple(chain())))))
    assert {(e.src, e.dst, e.kind) for e in g.edges} == {
        ("mid", "top", EdgeKind.L2U), ("low", "mid", EdgeKind.L2U), ("top", "low", EdgeKind.U2L)}


def test_a_transitive_upper_gives_an_upper_to_lower_edge():
    specs = [spec("top"), spec("mid", upper=["top"]), spec("low", upper=["mid"], reads=["top", "mid"])]
    g = compile_specs(specs).graph
    assert {(e.src, e.kind) for e in g.edges if e.dst == "low"} == {("top", EdgeKind.U2L), ("mid", EdgeKind.U2L)}


@pytest.mark.parametrize("specs, message", [
    ([spec("a", upper=["b"]), spec("b", upper=["a"])], "form a cycle: a -> upper b -> upper a"),
    ([spec("a", upper=["a"])], "lists itself in upper="),
    ([spec("a", upper=["nope"])], "lists upper='nope', which is not a problem of this Program"),
    ([spec("a"), spec("b", reads=["a"])], "calls problem 'a' (defined at prog.py:10), but neither is above"),
    ([spec("a", reads=["ghost"])], "uses problem 'ghost', which is not part of this Program"),
    ([spec("a"), spec("a")], "two problems are named 'a'"),
    ([spec("a", steps=0)], "has steps=0"),
])
def test_broken_programs_fail_with_a_teaching_message(specs, message):
    with pytest.raises(CompileError, match="Fix:") as info:
        compile_specs(specs)
    assert message in str(info.value)


def test_unrelated_reference_names_the_line_of_the_reference():
    with pytest.raises(CompileError) as info:
        compile_specs([spec("a"), spec("b", reads=["a"])])
    assert "'b' (prog.py:20)" in str(info.value) and "upper=['a']" in str(info.value)


def test_schedule_with_steps_three_steps_the_lower_three_times_per_upper_step():
    plan = compile_specs([spec("up", reads=["low"]), spec("low", upper=["up"], steps=3)])
    assert [str(it) for it in plan.schedule.period] == ["low", "low", "low, up"]
    assert plan.schedule.count("low") == 3 and plan.schedule.count("up") == 1
    assert [s.first for it in plan.schedule.period for s in it.steps if s.problem == "low"] == [True, False, False]


def test_an_upper_waits_for_all_its_lower_problems():
    plan = compile_specs([spec("up", reads=["a", "b"]), spec("a", upper=["up"], steps=2),
                          spec("b", upper=["up"], steps=3)])
    ups = [i for i in range(12) if "up" in str(plan.schedule.iteration(i))]
    assert ups == [2, 5, 8, 11]  # 0-based: both have signalled at iterations 3, 6, 9, 12
    assert len(plan.schedule.period) == 6 and not plan.schedule.prologue  # lcm of the counters


def test_nested_steps_multiply_along_a_chain():
    plan = compile_specs(chain(low=2, mid=3))
    assert len(plan.schedule.period) == 6
    assert plan.schedule.count("low") == 6 and plan.schedule.count("mid") == 3 and plan.schedule.count("top") == 1
    assert plan.schedule.period[-1] == Iteration((Step("low", False, True), Step("mid", False, True), Step("top")))


def test_hypergradient_plan_of_a_diamond_visits_the_bottom_once():
    plan = compile_specs([spec("top", reads=["l", "r"]), spec("l", upper=["top"], reads=["b"]),
                          spec("r", upper=["top"], reads=["b"]), spec("b", upper=["l", "r"], reads=["top"])])
    hp = plan.hypergrad("top")
    assert hp.seeds == ("l", "r")
    assert [v.problem for v in hp.visits] == ["l", "r", "b"]
    assert [(v.to_upper, v.to_lowers) for v in hp.visits] == [(False, ("b",)), (False, ("b",)), (True, ())]


def test_first_order_cuts_paths():
    specs = chain()
    specs[1] = spec("mid", upper=["top"], reads=["low"], method="first_order")
    assert compile_specs(specs).hypergrad("top").visits == ()


def test_plan_prints_schedule_and_hypergradients():
    text = str(compile_specs(chain(low=2)))
    assert "iter 1         step low" in text and "iter 2         step low -> mid -> top" in text
    assert "top: direct gradient + adjoints seeded at mid" in text
    assert "low: FiniteDifference() -> θ_top" in text


def test_verifier_reports_a_broken_pass_with_the_graph():
    from attrs import evolve

    from compiler import InternalError, run_passes
    from compiler.ir import Edge

    def bad_pass(g):
        return evolve(g, edges=(Edge("low", "top", EdgeKind.U2L),))
    bad_pass.__name__ = "bad_pass"
    graph = build_graph(tuple(chain()))
    with pytest.raises(InternalError, match="after pass 'bad_pass'") as info:
        run_passes(graph, (close_uppers, infer_levels, bad_pass))
    assert "Graph with 3 problems" in str(info.value)


def test_compiler_does_not_import_torch():
    import subprocess
    import sys
    code = "import sys, compiler; compiler.compile_specs([]); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
