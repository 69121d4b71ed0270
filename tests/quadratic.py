"""Quadratic multilevel programs in float64 and their hypergradients in closed form.

Problem q has θ_q ∈ R^n and loss
    C_q(θ, x) = ½ θᵀA_qθ + θᵀ(Σ_j B_qj x_j + c_q) + Σ_j ½ x_jᵀ D_qj x_j
over the problems j it reads (its uppers' θ_j, its lowers' θ*_j). Then
∂θ*_q/∂x_j = −A_q⁻¹ B_qj exactly, and each method replaces A_q⁻¹ by a matrix
S_q (Neumann: α Σ_{i≤K} (I − αA)^i; FD: α I; SGD unrolled over T steps:
lr Σ_{k<T} (I − lr A)^k; first order: 0). The expected gradient is the sum
over the paper's paths, computed here by forward Jacobians, independently of
mlodsl's adjoint code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from mlodsl import Program, problem

DT = torch.float64


class Vec(nn.Module):
    """θ as a module: calling it returns the parameter vector."""

    def __init__(self, n: int, gen: torch.Generator) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.randn(n, generator=gen, dtype=DT))

    def forward(self) -> torch.Tensor:
        return self.theta


@dataclass
class Q:
    name: str
    n: int
    reads: list[str]
    upper: list[str] = field(default_factory=list)
    method: object = "cg"
    steps: int = 1
    lr: float = 0.05


@dataclass
class Quadratic:
    specs: dict[str, Q]
    A: dict[str, torch.Tensor]
    B: dict[tuple[str, str], torch.Tensor]
    D: dict[tuple[str, str], torch.Tensor]
    c: dict[str, torch.Tensor]
    problems: dict = field(default_factory=dict)
    program: Program | None = None

    def theta(self, name: str) -> torch.Tensor:
        return self.problems[name].module.theta.detach().clone()

    def above(self, name: str) -> set[str]:
        out, stack = set(), list(self.specs[name].upper)
        while stack:
            u = stack.pop()
            if u not in out:
                out.add(u)
                stack.extend(self.specs[u].upper)
        return out


def spd(n: int, gen: torch.Generator, lo: float = 1.0, hi: float = 3.0) -> torch.Tensor:
    """A symmetric matrix with eigenvalues in [lo, hi] (so lr·A is a contraction for lr < 2/hi)."""
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    eig = lo + (hi - lo) * torch.rand(n, generator=gen, dtype=DT)
    return q @ torch.diag(eig) @ q.T


def build(specs: list[Q], seed: int = 0) -> Quadratic:
    gen = torch.Generator().manual_seed(seed)
    by = {s.name: s for s in specs}
    A = {s.name: spd(s.n, gen) for s in specs}
    c = {s.name: torch.randn(s.n, generator=gen, dtype=DT) for s in specs}
    B = {(s.name, j): 0.5 * torch.randn(s.n, by[j].n, generator=gen, dtype=DT) for s in specs for j in s.reads}
    D = {(s.name, j): 0.5 * spd(by[j].n, gen, 0.1, 1.0) for s in specs for j in s.reads}
    quad = Quadratic(by, A, B, D, c)
    for s in specs:
        module = Vec(s.n, gen)
        opt = torch.optim.SGD(module.parameters(), lr=s.lr)
        quad.problems[s.name] = problem(module=module, optimizer=opt, data=None, upper=s.upper,
                                        uses=s.reads, hypergrad=s.method, steps=s.steps,
                                        name=s.name)(_loss(quad, s))
    quad.program = Program([quad.problems[s.name] for s in specs])
    return quad


def _loss(quad: Quadratic, s: Q):
    def loss() -> torch.Tensor:
        theta = quad.problems[s.name]()
        total = 0.5 * theta @ quad.A[s.name] @ theta + theta @ quad.c[s.name]
        for j in s.reads:
            x = quad.problems[j]()
            total = total + theta @ (quad.B[s.name, j] @ x) + 0.5 * x @ quad.D[s.name, j] @ x
        return total
    return loss


def converge(quad: Quadratic, names: list[str]) -> None:
    """Set the named problems (lowest first) to their exact optimum given everything else."""
    for name in names:
        s = quad.specs[name]
        rhs = quad.c[name] + sum(quad.B[name, j] @ quad.theta(j) for j in s.reads)
        with torch.no_grad():
            quad.problems[name].module.theta.copy_(-torch.linalg.solve(quad.A[name], rhs))


def expected_gradient(quad: Quadratic, top: str, S: dict[str, torch.Tensor]) -> torch.Tensor:
    """dC_top/dθ_top with ∂θ*_q/∂x_j = −S_q B_qj, summed over paths (u2l out of top, then l2u)."""
    below = [n for n in quad.specs if top in quad.above(n)]
    n_top = quad.specs[top].n
    J: dict[str, torch.Tensor] = {}
    for q in sorted(below, key=lambda n: len(_below_of(quad, n))):
        total = torch.zeros(quad.specs[q].n, n_top, dtype=DT)
        for j in quad.specs[q].reads:
            dx = torch.eye(n_top, dtype=DT) if j == top else J.get(j) if j in below and q in quad.above(j) else None
            if dx is not None:
                total = total - S[q] @ quad.B[q, j] @ dx
        J[q] = total
    s = quad.specs[top]
    theta = quad.theta(top)
    grad = quad.A[top] @ theta + quad.c[top] + sum(quad.B[top, j] @ quad.theta(j) for j in s.reads)
    for m in s.reads:
        if m in below:
            seed = quad.B[top, m].T @ theta + quad.D[top, m] @ quad.theta(m)
            grad = grad + J[m].T @ seed
    return grad


def _below_of(quad: Quadratic, name: str) -> list[str]:
    return [n for n in quad.specs if name in quad.above(n)]


def neumann_S(A: torch.Tensor, alpha: float, K: int) -> torch.Tensor:
    n = A.shape[0]
    M = torch.eye(n, dtype=DT) - alpha * A
    term, acc = torch.eye(n, dtype=DT), torch.eye(n, dtype=DT)
    for _ in range(K):
        term = M @ term
        acc = acc + term
    return alpha * acc


def chain(method: object, **kw) -> list[Q]:
    """The paper's trilevel program: low (pretrain) is constrained by top (reweight), mid
    (finetune) reads θ*_low, top reads θ*_mid."""
    return [Q("top", 3, reads=["mid"], method=method, **kw),
            Q("mid", 4, reads=["low"], upper=["top"], method=method, **kw),
            Q("low", 5, reads=["top"], upper=["mid"], method=method, **kw)]


def diamond(method: object, **kw) -> list[Q]:
    """Four problems, two paths top → bottom → {left, right} → top (plus direct u2l edges)."""
    return [Q("top", 3, reads=["left", "right"], method=method, **kw),
            Q("left", 4, reads=["bottom", "top"], upper=["top"], method=method, **kw),
            Q("right", 2, reads=["bottom"], upper=["top"], method=method, **kw),
            Q("bottom", 5, reads=["top"], upper=["left", "right"], method=method, **kw)]
