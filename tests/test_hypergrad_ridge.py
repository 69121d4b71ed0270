"""Ridge-regression bilevel with real DataLoader batches, against closed forms (float64).

Lower:  w*(λ) = argmin_w  ‖X w − y‖²/n + Σ_i exp(λ_i) w_i²
Upper:  min_λ  ‖X_v w*(λ) − y_v‖²/m
H = 2XᵀX/n + 2 diag(e^λ),  ∂²C/∂λ∂w = diag(2 e^λ ⊙ w),  v = 2X_vᵀ(X_v w − y_v)/m.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mlodsl import Program, problem
from mlodsl.hypergrad import CG, FiniteDifference, FirstOrder, Neumann, Unrolled
from tests.quadratic import DT

N, M, DIM = 40, 30, 5


class LogPenalty(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lam = nn.Parameter(torch.linspace(-1.0, 0.5, DIM, dtype=DT))

    def forward(self) -> torch.Tensor:
        return self.lam


def make(method, batch_size: int = N, steps: int = 1, lr: float = 0.05, optimizer=None, seed: int = 0,
         upper_lr: float = 0.01):
    gen = torch.Generator().manual_seed(seed)
    X, Xv = torch.randn(N, DIM, generator=gen, dtype=DT), torch.randn(M, DIM, generator=gen, dtype=DT)
    w_true = torch.randn(DIM, generator=gen, dtype=DT)
    y = X @ w_true + 0.3 * torch.randn(N, generator=gen, dtype=DT)
    yv = Xv @ w_true + 0.3 * torch.randn(M, generator=gen, dtype=DT)
    train = DataLoader(TensorDataset(X, y), batch_size=batch_size, shuffle=False)
    val = DataLoader(TensorDataset(Xv, yv), batch_size=M)
    lin = nn.Linear(DIM, 1, bias=False).to(DT)
    pen = LogPenalty()
    opt = (optimizer or (lambda ps: torch.optim.SGD(ps, lr=lr)))(lin.parameters())

    @problem(module=pen, optimizer=torch.optim.Adam(pen.parameters(), lr=upper_lr), data=val)
    def penalty(batch):
        x, t = batch
        return F.mse_loss(ridge(x).squeeze(1), t)

    @problem(module=lin, optimizer=opt, data=train, upper=[penalty], hypergrad=method, steps=steps)
    def ridge(batch):
        x, t = batch
        w = ridge.module.weight.squeeze(0)
        return F.mse_loss(ridge(x).squeeze(1), t) + (penalty().exp() * w * w).sum()

    program = Program([penalty, ridge])
    return program, dict(X=X, y=y, Xv=Xv, yv=yv, lin=lin, pen=pen, train=train)


def parts(d, X, y):
    lam = d["pen"].lam.detach()
    w = d["lin"].weight.detach().squeeze(0)
    H = 2 * X.T @ X / len(X) + 2 * torch.diag(lam.exp())
    v = 2 * d["Xv"].T @ (d["Xv"] @ w - d["yv"]) / M
    mixed = torch.diag(2 * lam.exp() * w)
    return lam, w, H, v, mixed


def upper_gradient(program, d) -> torch.Tensor:
    (g,) = program.gradient("penalty", batch=(d["Xv"], d["yv"]))
    return g


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_cg_matches_the_implicit_function_theorem_at_the_ridge_solution():
    program, d = make(CG(iterations=DIM))
    program.run(iterations=3)
    lam, _, _, _, _ = parts(d, d["X"], d["y"])
    w_star = torch.linalg.solve(d["X"].T @ d["X"] / N + torch.diag(lam.exp()), d["X"].T @ d["y"] / N)
    with torch.no_grad():
        d["lin"].weight.copy_(w_star[None])
    _, w, H, v, mixed = parts(d, d["X"], d["y"])
    exact = -mixed @ torch.linalg.solve(H, v)
    assert rel(upper_gradient(program, d), exact) < 1e-6
    # and the same quantity by finite differences of the validation loss through w*(λ)
    def val_loss(lam):
        ws = torch.linalg.solve(d["X"].T @ d["X"] / N + torch.diag(lam.exp()), d["X"].T @ d["y"] / N)
        return ((d["Xv"] @ ws - d["yv"]) ** 2).mean()
    fd = torch.autograd.functional.jacobian(val_loss, lam)
    assert rel(exact, fd) < 1e-10


@pytest.mark.parametrize("K", [1, 4])
def test_neumann_on_minibatches_matches_its_series_on_the_last_batch(K):
    program, d = make(Neumann(iterations=K), batch_size=10, lr=0.05)
    program.run(iterations=6)  # the lower's last batch is the 2nd of 4
    X, y = d["X"][10:20], d["y"][10:20]
    _, _, H, v, mixed = parts(d, X, y)
    term, acc = v, v.clone()
    for _ in range(K):
        term = term - 0.05 * H @ term
        acc = acc + term
    assert rel(upper_gradient(program, d), -mixed @ (0.05 * acc)) < 1e-6


def test_finite_difference_matches_darts_on_minibatches():
    program, d = make(FiniteDifference(eps=0.01), batch_size=10, lr=0.05)
    program.run(iterations=3)
    _, _, _, v, mixed = parts(d, d["X"][20:30], d["y"][20:30])
    assert rel(upper_gradient(program, d), -0.05 * mixed @ v) < 1e-6


def test_first_order_ignores_the_lower_problem():
    program, d = make(FirstOrder())
    with pytest.warns(UserWarning, match="only through lower problems whose hypergradient method is first_order"):
        program.run(iterations=2)
    assert float(upper_gradient(program, d).abs().max()) == 0.0  # λ enters the upper loss only via w*


@pytest.mark.parametrize("steps", [1, 4])
def test_unrolled_sgd_matches_forward_mode_through_the_recorded_steps(steps):
    program, d = make(Unrolled(), batch_size=10, steps=steps, lr=0.05, upper_lr=0.0)  # λ fixed
    starts = []
    program["ridge"].before_unroll(lambda m: starts.append(m.weight.detach().clone().squeeze(0)))
    program.run(iterations=2 * steps)
    lam = d["pen"].lam.detach()
    theta, J = starts[-1], torch.zeros(DIM, DIM, dtype=DT)
    for t in range(steps, 2 * steps):  # the batches of the last round
        X, y = d["X"][10 * (t % 4):10 * (t % 4 + 1)], d["y"][10 * (t % 4):10 * (t % 4 + 1)]
        H = 2 * X.T @ X / 10 + 2 * torch.diag(lam.exp())
        J = (torch.eye(DIM, dtype=DT) - 0.05 * H) @ J - 0.05 * torch.diag(2 * lam.exp() * theta)
        theta = theta - 0.05 * (H @ theta - 2 * X.T @ y / 10)
    assert float((theta - d["lin"].weight.detach().squeeze(0)).abs().max()) < 1e-12
    _, _, _, v, _ = parts(d, d["X"], d["y"])
    assert rel(upper_gradient(program, d), J.T @ v) < 1e-6


OPTIMIZERS = {
    "sgd-momentum-wd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01, dampening=0.1),
    "sgd-nesterov": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8, nesterov=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=0.01),
    "adam-amsgrad": lambda ps: torch.optim.Adam(ps, lr=0.05, amsgrad=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_unrolled_replay_reproduces_torch_optim_and_its_jacobian(name):
    """The differentiable replay lands on the live parameters torch.optim produced, and its
    vector-Jacobian product equals a Jacobian taken by autograd over the same replay."""
    program, d = make(Unrolled(), batch_size=10, steps=3, optimizer=OPTIMIZERS[name], upper_lr=0.0)
    program.run(iterations=6)
    g = upper_gradient(program, d)
    assert program.diagnostics["ridge/unroll_replay_error"] < 1e-12
    assert float(g.norm()) > 0
    # the same hypergradient by a central difference of the replayed endpoint in λ
    window = program._runtime.state["ridge"].window
    lam0 = d["pen"].lam.detach().clone()
    _, _, _, v, _ = parts(d, d["X"], d["y"])

    def endpoint(lam):
        with torch.no_grad():
            d["pen"].lam.copy_(lam)
        from mlodsl._lower import LowerView
        view = LowerView(program._runtime, program["ridge"], [program["penalty"]])
        theta = [t.clone() for t in window.theta]
        states = window.states
        from mlodsl._hypergrad import _unroll
        for batches, hps in window.steps:
            with torch.enable_grad():
                th = [t.detach().requires_grad_(True) for t in theta]
                loss = view.loss(live=False, theta=th, batch=batches[0])
                grads = torch.autograd.grad(loss, th)
            new = [_unroll.update(type(program["ridge"].optimizer), p, gr, s, hp)
                   for p, gr, s, hp in zip(th, grads, states, hps)]
            theta, states = [n[0].detach() for n in new], [n[1] for n in new]
        return theta[0].squeeze(0)

    h = 1e-6
    fd = torch.stack([(endpoint(lam0 + h * e) - endpoint(lam0 - h * e)) @ v / (2 * h)
                      for e in torch.eye(DIM, dtype=DT)])
    with torch.no_grad():
        d["pen"].lam.copy_(lam0)
    assert rel(g, fd) < 1e-5


@pytest.mark.parametrize("method, hvps, grad_evals", [
    (Neumann(iterations=3), 3, 0), (CG(iterations=3), 3, 0),
    (FiniteDifference(), 0, 2), (Unrolled(), 0, 0)])
def test_hessian_vector_products_per_hypergradient_are_the_minimum(method, hvps, grad_evals):
    program, d = make(method, batch_size=10)
    program.run(iterations=1)
    program.reset_stats()
    program.run(iterations=4)  # four upper steps
    s = program.stats
    assert s["steps/penalty"] == 4 and s["method_calls/ridge"] == 4
    assert s.get("hvp", 0) == 4 * hvps
    assert s.get("grad_eval", 0) == 4 * grad_evals
    implicit = hvps > 0
    assert s.get("grad_graph", 0) == (4 if implicit else 0)  # built once per hypergradient
    assert s.get("mixed_vjp", 0) == (4 if implicit else 0)


def test_lower_steps_build_no_graph_for_upper_parameters():
    seen = []
    program, d = make(Neumann(iterations=2), steps=5)
    inner = program["ridge"].fn

    def spy(batch):
        seen.append(program["penalty"]().requires_grad)
        return inner(batch)

    program["ridge"].fn = spy
    program.run(iterations=4)   # four lower steps, no upper step yet
    assert seen == [False] * 4
    program.run(iterations=1)   # fifth lower step, then the upper steps and differentiates
    assert seen[4] is False and any(seen[5:])
