"""Reference inference from the losses' code: globals, closures, nested helpers, lambdas, uses=."""

from __future__ import annotations

import torch
from torch import nn

from compiler import EdgeKind
from mlodsl import Program, problem


def tiny(n: int = 2) -> tuple[nn.Module, torch.optim.Optimizer]:
    m = nn.Linear(n, 1)
    return m, torch.optim.SGD(m.parameters(), lr=0.1)


def edges(program: Program) -> set[tuple[str, str, str]]:
    return {(e.src, e.dst, "u2l" if e.kind is EdgeKind.U2L else "l2u") for e in program.graph.edges}


# -- module-level problems: references through globals and a helper ----------
m_hyper, o_hyper = tiny()
m_model, o_model = tiny()


def features(x):
    """A module-level helper that calls a problem: followed by inference."""
    return model(x)


@problem(module=m_hyper, optimizer=o_hyper, data=[torch.ones(3, 2)])
def hyper(x):
    return features(x).pow(2).mean()


@problem(module=m_model, optimizer=o_model, data=[torch.ones(3, 2)], upper=[hyper])
def model(x):
    return (model(x) - hyper(x)).pow(2).mean()


def test_globals_and_module_level_helpers():
    assert edges(Program([hyper, model])) == {("model", "hyper", "l2u"), ("hyper", "model", "u2l")}


def test_upper_given_by_name_and_in_any_order():
    m1, o1 = tiny()
    m2, o2 = tiny()

    @problem(module=m1, optimizer=o1, data=None, upper=["outer"])
    def inner():
        return (inner(torch.ones(1, 2)) * outer(torch.ones(1, 2))).sum()

    @problem(module=m2, optimizer=o2, data=None)
    def outer():
        return inner(torch.ones(1, 2)).pow(2).sum()

    program = Program([inner, outer])
    assert edges(program) == {("outer", "inner", "u2l"), ("inner", "outer", "l2u")}
    assert program.graph.node("outer").level == 2


def test_closures_nested_functions_and_lambdas():
    m1, o1 = tiny()
    m2, o2 = tiny()
    x = torch.ones(4, 2)

    @problem(module=m1, optimizer=o1, data=None)
    def meta():
        def inner_helper():
            return learner(x)             # closure cell, read inside a nested function
        return inner_helper().pow(2).mean()

    learner = problem(module=m2, optimizer=o2, data=None, upper=[meta], name="learner")(
        lambda: (learner(x) * (lambda: meta(x))()).mean())  # a lambda inside a lambda
    program = Program([meta, learner])
    assert edges(program) == {("learner", "meta", "l2u"), ("meta", "learner", "u2l")}
    program.run(iterations=2)
    assert program.stats["steps/meta"] == 2


def test_uses_declares_references_the_code_does_not_show():
    m1, o1 = tiny()
    m2, o2 = tiny()
    table = {}

    @problem(module=m1, optimizer=o1, data=None, uses=["low"])
    def high():
        return table["low"](torch.ones(1, 2)).sum() ** 2

    @problem(module=m2, optimizer=o2, data=None, upper=[high])
    def low():
        return low(torch.ones(1, 2)).pow(2).sum()

    table["low"] = low
    program = Program([high, low])
    assert edges(program) == {("low", "high", "l2u")}
    assert program.graph.node("high").spec.references[0].declared


def test_attribute_access_with_a_problem_name_is_not_a_reference():
    m1, o1 = tiny()

    class Box:
        hyper = 3.0

    @problem(module=m1, optimizer=o1, data=None)
    def alone():
        return alone(torch.ones(1, 2)).sum() * Box.hyper  # Box.hyper is an attribute, not the problem

    assert edges(Program([alone])) == set()
