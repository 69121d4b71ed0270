"""Every method against closed forms in float64: trilevel chains and four-problem diamonds."""

from __future__ import annotations

import pytest
import torch

from mlodsl.hypergrad import CG, FiniteDifference, FirstOrder, Neumann, Unrolled
from tests.quadratic import DT, build, chain, converge, diamond, expected_gradient, neumann_S

SHAPES = {"chain": chain, "diamond": diamond}
LOWER = {"chain": ["low", "mid"], "diamond": ["bottom", "left", "right"]}


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-6) -> None:
    err = float((got - want).norm() / want.norm())
    assert err < rtol, f"relative error {err:.3g}\n got {got}\nwant {want}"


def gradient(quad, name: str = "top") -> torch.Tensor:
    (g,) = quad.program.gradient(name)
    return g


@pytest.mark.parametrize("shape", SHAPES)
def test_cg_matches_exact_implicit_hypergradient_at_the_optimum(shape):
    quad = build(SHAPES[shape](CG(iterations=8)), seed=1)
    quad.program.run(iterations=3)
    converge(quad, LOWER[shape])
    exact = {n: torch.linalg.inv(quad.A[n]) for n in quad.specs}
    assert_close(gradient(quad), expected_gradient(quad, "top", exact))


@pytest.mark.parametrize("shape", SHAPES)
def test_cg_is_not_fooled_by_an_unconverged_path(shape):
    """The exact answer differs from a first-order one: the test can fail."""
    quad = build(SHAPES[shape](CG(iterations=8)), seed=2)
    converge(quad, LOWER[shape])
    zero = {n: torch.zeros_like(quad.A[n]) for n in quad.specs}
    direct = expected_gradient(quad, "top", zero)
    assert float((gradient(quad) - direct).norm() / direct.norm()) > 1e-2


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("K", [0, 1, 5])
def test_neumann_matches_its_series(shape, K):
    quad = build(SHAPES[shape](Neumann(iterations=K), lr=0.1), seed=3)
    quad.program.run(iterations=2)
    S = {n: neumann_S(quad.A[n], 0.1, K) for n in quad.specs}
    assert_close(gradient(quad), expected_gradient(quad, "top", S))


def test_neumann_alpha_overrides_the_learning_rate():
    quad = build(chain(Neumann(iterations=4, alpha=0.2), lr=0.05), seed=4)
    S = {n: neumann_S(quad.A[n], 0.2, 4) for n in quad.specs}
    assert_close(gradient(quad), expected_gradient(quad, "top", S))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eps", [0.01, 1.0])
def test_finite_difference_matches_darts(shape, eps):
    """On a quadratic the central difference is exact: ∂θ*/∂x ≈ −α B, i.e. S = α I."""
    quad = build(SHAPES[shape](FiniteDifference(eps=eps), lr=0.07), seed=5)
    quad.program.run(iterations=2)
    S = {n: 0.07 * torch.eye(quad.specs[n].n, dtype=DT) for n in quad.specs}
    assert_close(gradient(quad), expected_gradient(quad, "top", S))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("steps", [1, 3])
def test_unrolled_sgd_matches_reverse_mode_through_its_steps(shape, steps):
    """T plain SGD steps: ∂θ_T/∂x = −lr Σ_{k<T} (I − lr A)^k B."""
    quad = build(SHAPES[shape](Unrolled(), lr=0.1, steps=steps), seed=6)
    period = len(quad.program.plan.schedule.prologue) + len(quad.program.plan.schedule.period)
    quad.program.run(iterations=2 * period)
    S = {n: neumann_S(quad.A[n], 0.1, steps - 1) for n in quad.specs}
    assert_close(gradient(quad), expected_gradient(quad, "top", S))


@pytest.mark.parametrize("shape", SHAPES)
def test_first_order_gives_the_direct_gradient_only(shape):
    quad = build(SHAPES[shape](FirstOrder()), seed=7)
    quad.program.run(iterations=2)
    zero = {n: torch.zeros_like(quad.A[n]) for n in quad.specs}
    assert_close(gradient(quad), expected_gradient(quad, "top", zero), rtol=1e-12)
    assert not quad.program.plan.hypergrad("top").visits


def test_methods_mix_across_levels():
    """CG on the lowest problem, Neumann in the middle: each level uses its own S."""
    specs = chain("cg")
    specs[1].method = Neumann(iterations=2)
    specs[2].method = CG(iterations=5)
    quad = build(specs, seed=8)
    converge(quad, ["low"])
    S = {"low": torch.linalg.inv(quad.A["low"]), "mid": neumann_S(quad.A["mid"], 0.05, 2),
         "top": torch.linalg.inv(quad.A["top"])}
    assert_close(gradient(quad), expected_gradient(quad, "top", S))


def test_a_middle_problem_gets_its_own_hypergradient():
    """In the diamond, left reads θ*_bottom and bottom reads only θ_top: left's gradient is direct."""
    quad = build(diamond(CG(iterations=8)), seed=9)
    zero = {n: torch.zeros_like(quad.A[n]) for n in quad.specs}
    (g,) = quad.program.gradient("left")
    assert_close(g, expected_gradient(quad, "left", zero), rtol=1e-12)
