"""Methods on a non-quadratic bilevel program, against dense linear algebra (float64).

Lower: a tiny tanh network fitted to data whose targets are shifted by the
upper parameters; upper: a validation loss of the network. With the full
Hessian H and mixed matrix from torch.func, each method's formula is a few
lines of dense algebra.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from mlodsl import Program, ProblemError, UsageError, problem
from mlodsl.hypergrad import CG, FiniteDifference, Neumann
from tests.quadratic import DT

G = torch.Generator().manual_seed(0)
X = torch.randn(16, 3, generator=G, dtype=DT)
Y = torch.randn(16, generator=G, dtype=DT)
XV = torch.randn(8, 3, generator=G, dtype=DT)
YV = torch.randn(8, generator=G, dtype=DT)
LR = 0.05


def make(method):
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    shift = nn.Linear(3, 1).to(DT)

    @problem(module=shift, optimizer=torch.optim.SGD(shift.parameters(), lr=0.1))
    def outer():
        return ((learner(XV).squeeze(1) - YV) ** 2).mean()

    @problem(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=LR), upper=[outer], hypergrad=method)
    def learner():
        target = Y + torch.tanh(outer(X).squeeze(1))
        reg = 1e-2 * sum((p ** 2).sum() for p in learner.module.parameters())
        return ((learner(X).squeeze(1) - target) ** 2).mean() + reg

    program = Program([outer, learner])
    return program, net, shift


def flat(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def unflat(module, vec):
    out, i = {}, 0
    for n, p in module.named_parameters():
        out[n] = vec[i:i + p.numel()].view_as(p)
        i += p.numel()
    return out


def dense_parts(net, shift):
    def inner(theta, phi):
        target = Y + torch.tanh(functional_call(shift, unflat(shift, phi), (X,)).squeeze(1))
        pred = functional_call(net, unflat(net, theta), (X,)).squeeze(1)
        return ((pred - target) ** 2).mean() + 1e-2 * (theta ** 2).sum()

    def val(theta):
        return ((functional_call(net, unflat(net, theta), (XV,)).squeeze(1) - YV) ** 2).mean()

    theta, phi = flat(net), flat(shift)
    H = hessian(inner, argnums=0)(theta, phi)
    mixed = jacrev(jacrev(inner, argnums=0), argnums=1)(theta, phi)  # ∂²C/∂θ∂φ, shape (θ, φ)
    v = jacrev(val)(theta)
    return H, mixed, v


def got(program) -> torch.Tensor:
    return torch.cat([g.flatten() for g in program.gradient("outer", batch=None)])


def test_cg_equals_the_dense_implicit_hypergradient():
    program, net, shift = make(CG(iterations=40))
    program.run(iterations=30)
    H, mixed, v = dense_parts(net, shift)
    exact = -mixed.T @ torch.linalg.solve(H, v)
    assert torch.allclose(got(program), exact, rtol=1e-6, atol=1e-9)


def test_neumann_equals_its_dense_series():
    program, net, shift = make(Neumann(iterations=6))
    program.run(iterations=5)
    H, mixed, v = dense_parts(net, shift)
    term, acc = v, v.clone()
    for _ in range(6):
        term = term - LR * H @ term
        acc = acc + term
    assert torch.allclose(got(program), -mixed.T @ (LR * acc), rtol=1e-6, atol=1e-10)


def test_finite_difference_tends_to_neumann_with_no_terms():
    """−α(∂²C/∂x∂θ) v is the ε → 0 limit of the central difference; the error is O(ε²)."""
    program, net, shift = make(FiniteDifference(eps=1e-4))
    program.run(iterations=5)
    H, mixed, v = dense_parts(net, shift)
    limit = -LR * mixed.T @ v
    err_small = float((got(program) - limit).norm() / limit.norm())
    program["learner"].hypergrad = FiniteDifference(eps=1e-1)
    err_large = float((got(program) - limit).norm() / limit.norm())
    assert err_small < 1e-6 and err_large > 10 * err_small


def test_finite_differences_put_the_lower_parameters_back_exactly():
    """FD moves θ to θ ± εv in place for its two evaluations; afterwards θ is bitwise what it was,
    also when the loss raises in the middle of an evaluation."""
    program, net, _ = make(FiniteDifference())
    program.run(iterations=3, progress=False)
    before = [p.detach().clone() for p in net.parameters()]
    g = program.gradient("outer")
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert all(torch.isfinite(t).all() for t in g) and any(t.abs().sum() > 0 for t in g)

    calls = {"n": 0}
    forward = net.forward

    def failing(x):  # the lower loss raises during FD's first evaluation at θ + εv
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return forward(x)

    net.forward = failing
    try:
        with pytest.raises(ProblemError, match="boom"):
            program.gradient("outer")
        assert calls["n"] == 2
    finally:
        net.forward = forward
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def make_detached(method):
    """A lower loss that weights its residuals by a function of their detached size (as MWN does)."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    weigher = nn.Linear(1, 1).to(DT)

    @problem(module=weigher, optimizer=torch.optim.SGD(weigher.parameters(), lr=0.1))
    def outer():
        return ((learner(XV).squeeze(1) - YV) ** 2).mean()

    @problem(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=LR), upper=[outer], hypergrad=method)
    def learner():
        residual = (learner(X).squeeze(1) - Y) ** 2
        w = torch.sigmoid(outer(residual.detach()[:, None]).squeeze(1))
        return (w * residual).mean()

    return Program([outer, learner])


def test_fd_holding_detached_values_matches_the_autograd_formula():
    """FD and Neumann(iterations=0) compute the same −α (∂²C/∂x∂θ) v; with a .detach() in the loss
    plain FD also differentiates the detached path, hold_detached=True does not."""
    def gradient(method):
        program = make_detached(method)
        program.run(iterations=2, progress=False)
        return torch.cat([g.flatten() for g in program.gradient("outer")])

    exact = gradient(Neumann(iterations=0))
    held = gradient(FiniteDifference(eps=1e-4, hold_detached=True))
    auto = gradient(FiniteDifference(eps=1e-4))  # the default, hold_detached="auto", holds them here
    plain = gradient(FiniteDifference(eps=1e-4, hold_detached=False))
    assert torch.allclose(held, exact, rtol=1e-6, atol=1e-9), (held, exact)
    assert torch.equal(auto, held)
    assert (plain - exact).norm() > 1e-3 * exact.norm()  # the path through the detached input


def test_fd_holding_detached_values_costs_one_more_evaluation():
    program = make_detached(FiniteDifference(hold_detached=True))
    program.run(iterations=3, progress=False)
    assert program.stats["held_eval"] == 3 and program.stats["grad_eval"] == 6


def test_fd_by_default_probes_once_and_holds_only_what_is_detached():
    """hold_detached="auto": a loss that detaches nothing is evaluated once more at its first
    hypergradient only; a loss that detaches is held at every hypergradient."""
    plain, _, _ = make(FiniteDifference())
    plain.run(iterations=4, progress=False)
    assert plain.stats["held_eval"] == 1 and plain.stats["grad_eval"] == 8
    detaching = make_detached(FiniteDifference())
    detaching.run(iterations=4, progress=False)
    assert detaching.stats["held_eval"] == 4 and detaching.stats["grad_eval"] == 8


def test_fd_hold_detached_rejects_other_values():
    with pytest.raises(UsageError, match=r"hold_detached='yes'.*\"auto\", True or False"):
        FiniteDifference(hold_detached="yes")
