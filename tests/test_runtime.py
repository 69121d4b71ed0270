"""The runtime: schedule semantics, continuation, hooks, rollback and run-time errors."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from mlodsl import Problem, ProblemError, Program, UsageError, problem
from mlodsl.hypergrad import CG
from tests.quadratic import build, diamond


def bilevel(low_steps: int = 1, seed: int = 0, log: list | None = None, low_loss=None):
    torch.manual_seed(seed)
    up_m, low_m = nn.Linear(2, 1), nn.Linear(2, 1)
    data = [torch.randn(4, 2) for _ in range(3)]

    @problem(module=up_m, optimizer=torch.optim.Adam(up_m.parameters(), lr=0.01), data=data)
    def up(x):
        return (low(x) - 1).pow(2).mean()

    @problem(module=low_m, optimizer=torch.optim.SGD(low_m.parameters(), lr=0.1, momentum=0.9),
             data=data, upper=[up], steps=low_steps, hypergrad="neumann")
    def low(x):
        if low_loss is not None:
            return low_loss(x)
        return (low(x) - up(x)).pow(2).mean()

    if log is not None:
        up.after_step(lambda m: log.append("up"))
        low.after_step(lambda m: log.append("low"))
        low.before_unroll(lambda m: log.append("low:begin"))
        low.after_unroll(lambda m: log.append("low:end"))
    return Program([up, low])


def params(program: Program) -> list[torch.Tensor]:
    return [p.detach().clone() for q in program.problems for p in q.module.parameters()]


def test_a_problem_with_steps_three_steps_three_times_per_upper_step():
    log: list[str] = []
    program = bilevel(low_steps=3, log=log)
    program.run(iterations=6)
    assert log == ["low:begin", "low", "low", "low", "low:end", "up"] * 2
    assert program.stats["steps/low"] == 6 and program.stats["steps/up"] == 2


def test_an_upper_with_two_lowers_of_different_steps_waits_for_both():
    torch.manual_seed(0)
    mods = {n: nn.Linear(2, 1) for n in ("top", "a", "b")}
    opt = {n: torch.optim.SGD(m.parameters(), lr=0.01) for n, m in mods.items()}
    x = torch.ones(1, 2)
    order: list[str] = []

    @problem(module=mods["top"], optimizer=opt["top"])
    def top():
        return (a(x) + b(x)).pow(2).sum()

    @problem(module=mods["a"], optimizer=opt["a"], upper=[top], steps=2)
    def a():
        return (a(x) - top(x)).pow(2).sum()

    @problem(module=mods["b"], optimizer=opt["b"], upper=[top], steps=3)
    def b():
        return (b(x) + top(x)).pow(2).sum()

    for p in (top, a, b):
        p.after_step(lambda m, name=p.name: order.append(name))
    Program([top, a, b]).run(iterations=6)
    tops = [i for i, n in enumerate(order) if n == "top"]
    assert len(tops) == 2
    assert order[:tops[0]].count("a") == 3 and order[:tops[0]].count("b") == 3  # b needed 3, a went on
    assert order[tops[0] + 1:tops[1]].count("b") == 3


def test_iteration_counts_continue_across_runs():
    one, two = bilevel(low_steps=2, seed=1), bilevel(low_steps=2, seed=1)
    one.run(iterations=7)
    two.run(iterations=3)
    two.run(iterations=4)
    assert one.iteration == two.iteration == 7
    assert all(torch.equal(a, b) for a, b in zip(params(one), params(two)))


def test_on_the_diamond_each_lower_method_runs_once_per_upper_step():
    quad = build(diamond(CG(iterations=3)))
    quad.program.run(iterations=5)
    s = quad.program.stats
    assert s["steps/top"] == 5
    for name in ("left", "right", "bottom"):
        assert s[f"method_calls/{name}"] == 5, name


def test_outside_a_program_a_problem_is_its_module():
    program = bilevel()
    x = torch.ones(2, 2)
    assert torch.equal(program["low"](x), program["low"].module(x))
    assert isinstance(program["low"], Problem)


# -- run-time errors roll the step back --------------------------------------
def _state(program: Program):
    return params(program), [copy.deepcopy(q.optimizer.state_dict()) for q in program.problems]


@pytest.mark.parametrize("bad, message", [
    (lambda x: torch.tensor(float("nan"), requires_grad=True), r"the loss of 'low' \(.*:\d+\) is nan"),
    (lambda x: torch.ones(3, requires_grad=True), r"returned a tensor of shape \(3,\), not a scalar"),
    (lambda x: 1.5, r"returned float 1.5, not a tensor"),
    (lambda x: 1 / 0, r"raised ZeroDivisionError"),
])
def test_a_failing_step_leaves_parameters_and_optimizer_state_as_they_were(bad, message):
    armed = []

    def low_loss(x):
        return bad(x) if armed else (program["low"](x) - program["up"](x)).pow(2).mean()

    program = bilevel(low_loss=low_loss)
    program.run(iterations=2)
    armed.append(True)
    before = _state(program)
    with pytest.raises(ProblemError, match=message) as info:
        program.run(iterations=1)
    assert "Fix:" in str(info.value)
    after = _state(program)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    assert str(before[1]) == str(after[1])
    assert program.iteration == 2


def test_an_infinite_gradient_is_caught_before_the_update():
    def low_loss(x):
        w = program["low"].module.weight
        return torch.sqrt(w - w.detach()).sum()  # value 0, gradient 1/(2·0) = inf

    program = bilevel(low_loss=low_loss)
    before = params(program)
    with pytest.raises(ProblemError, match=r"gradient of 'low' .* has NaN or Inf entries in weight"):
        program.run(iterations=1)
    assert all(torch.equal(a, b) for a, b in zip(before, params(program)))


# -- the public API's types (every other mistake is in tests/test_catalogue.py) -----
def test_public_arguments_are_type_checked():
    m = nn.Linear(2, 1)
    with pytest.raises(UsageError, match=re.escape('problem(): argument "steps" (str) is not an instance of int')):
        problem(module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1), steps="3")
    with pytest.raises(UsageError, match="module"):
        problem(module="net", optimizer=torch.optim.SGD(m.parameters(), lr=0.1))
    with pytest.raises(UsageError, match="Program"):
        Program(["not a problem"])



def test_a_call_with_the_types_of_one_that_passed_is_not_checked_again(monkeypatch):
    import typeguard

    from mlodsl import _check

    checks = []

    def counting(fn):
        inner = typeguard.typechecked(fn)
        return lambda *a, **k: (checks.append(a[1:] + tuple(k.values())), inner(*a, **k))[1]

    monkeypatch.setattr(_check, "typechecked", counting)

    class Thing:
        @_check.public
        def go(self, n: int, *, scale: float | None = None, label: str = "") -> int:
            return n

    thing = Thing()
    assert [thing.go(3), thing.go(4), thing.go(5, scale=None)] == [3, 4, 5]
    assert len(checks) == 2  # go(int) once, go(int, scale=None) once
    for bad in (lambda: thing.go(1.5), lambda: thing.go("2"), lambda: thing.go(1, scale="big")):
        with pytest.raises(UsageError, match="Thing.go\\(\\): argument"):
            bad()
    thing.go(1, label="x")
    thing.go(1, label="y")
    assert len(checks) == 7  # a str may be a Literal's value: checked at every call


def test_run_checks_its_arguments_after_a_good_call():
    program = bilevel()
    program.run(iterations=1)
    program.run(iterations=1)
    with pytest.raises(UsageError, match="Program.run\\(\\): argument \"iterations\" \\(float\\)"):
        program.run(iterations=1.5)
    with pytest.raises(UsageError, match="log_every"):
        program.run(iterations=1, log_every="often")

@pytest.mark.parametrize("make, message", [
    (lambda: __import__("mlodsl.hypergrad", fromlist=["Neumann"]).Neumann(iterations=-1),
     r"Neumann\(iterations=-1\): iterations must be an int >= 0\. Fix:"),
    (lambda: __import__("mlodsl.hypergrad", fromlist=["Neumann"]).Neumann(alpha=0),
     r"Neumann\(alpha=0\): alpha must be None \(the learning rate\) or a number > 0"),
    (lambda: __import__("mlodsl.hypergrad", fromlist=["CG"]).CG(damping=-0.5), r"CG\(damping=-0.5\)"),
    (lambda: __import__("mlodsl.hypergrad", fromlist=["FiniteDifference"]).FiniteDifference(eps=0),
     r"eps must be a number > 0"),
])
def test_method_settings_are_checked_with_a_fix(make, message):
    with pytest.raises(UsageError, match=message):
        make()
