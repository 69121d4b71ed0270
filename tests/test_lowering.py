"""The plan lowered to a torch.fx GraphModule: what runs, and what `mlodsl plan --code` prints."""

from __future__ import annotations

import torch

from mlodsl import cli
from mlodsl._lowering import MAX_LOWERED, code, lower
from tests.quadratic import build, chain, diamond


def test_the_lowered_period_calls_one_step_node_per_scheduled_step():
    quad = build(chain("cg", steps=2))
    module = lower(quad.program.plan)
    assert isinstance(module, torch.fx.GraphModule)
    steps = [n.args[1:] for n in module.graph.nodes if n.op == "call_function" and n.target.__name__ == "step"]
    expected = [(s.problem, s.first, s.last) for it in quad.program.plan.schedule.period for s in it.steps]
    assert steps == expected
    ends = [n for n in module.graph.nodes if n.op == "call_function" and n.target.__name__ == "end_iteration"]
    assert len(ends) == len(quad.program.plan.schedule.period)


def test_running_whole_periods_through_fx_equals_the_interpreter():
    a, b = build(diamond("neumann", steps=2), seed=3), build(diamond("neumann", steps=2), seed=3)
    period = len(a.program.plan.schedule.prologue) + 2 * len(a.program.plan.schedule.period)
    a.program.run(iterations=period, progress=False)        # prologue interpreted, periods lowered
    b.program._runtime.run(period)                           # all interpreted
    assert a.program.iteration == b.program.iteration == period
    for name in a.specs:
        assert torch.equal(a.theta(name), b.theta(name))
    assert a.program.stats == b.program.stats


def test_plan_code_prints_the_generated_python(capsys):
    assert cli.main(["plan", "tests/programs/diamond.py", "--code"]) == 0
    out = capsys.readouterr().out
    assert "def forward(self, runtime):" in out
    assert "mlodsl__lowering_step(runtime, 'bottom', True, False)" in out
    assert "visit left:neumann" in out or "visit" in out


def test_a_very_long_period_stays_interpreted():
    from compiler import ProblemSpec, Reference, SourceLoc, compile_specs

    loc = SourceLoc("p.py", 1)
    plan = compile_specs([ProblemSpec("up", loc, references=(Reference("low", loc),)),
                          ProblemSpec("low", loc, upper=("up",), steps=MAX_LOWERED + 1)])
    assert len(plan.schedule.period) == MAX_LOWERED + 1
    assert lower(plan) is None
    assert "runs interpreted" in code(plan)
