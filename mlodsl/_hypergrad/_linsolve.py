"""Linear solvers for the implicit methods: p ≈ H⁻¹ v from Hessian-vector products only."""

from __future__ import annotations

from collections.abc import Callable

import torch


HVP = Callable[[torch.Tensor], torch.Tensor]


def neumann(hvp: HVP, v: torch.Tensor, iterations: int, alpha: float) -> tuple[torch.Tensor, dict]:
    """p = α Σ_{i=0..K} (I − αH)^i v, with K = ``iterations`` Hessian-vector products.

    Converges to H⁻¹ v when the spectrum of αH lies in (0, 2). ``v`` and p are flat vectors
    over θ_Q (one tensor: each operation below is one kernel).
    """
    term, acc = v, v
    for _ in range(iterations):
        term = term.sub(hvp(term), alpha=alpha)
        acc = acc + term
    # diagnostics as thunks: computed only when logged or checked, not every hypergradient
    return acc * alpha, {"neumann_last_term_norm": lambda: torch.linalg.vector_norm(term),
                         "neumann_growth": lambda: torch.linalg.vector_norm(term) / torch.linalg.vector_norm(v)}


def conjugate_gradient(hvp: HVP, v: torch.Tensor, iterations: int, damping: float) -> tuple[torch.Tensor, dict]:
    """p ≈ (H + damping·I)⁻¹ v from ``iterations`` CG steps started at p = 0 (flat vectors).

    Always takes ``iterations`` Hessian-vector products (no data-dependent
    branch, so no host sync); once the residual is exactly zero the remaining
    steps change nothing.
    """
    x = torch.zeros_like(v)
    r = d = v
    rs = torch.dot(r, r)
    tiny = torch.finfo(rs.dtype).tiny
    curvatures = []  # dᵀ(H+λI)d of each direction: a negative one means H is not positive definite
    for _ in range(iterations):
        hd = hvp(d)
        ad = hd.add(d, alpha=damping) if damping else hd
        dad = torch.dot(d, ad)
        curvatures.append(dad)
        # an exact solve leaves r = d = 0: 0 / (0 + tiny) is a zero step, with no host sync
        # (and + tiny changes no denominator that is not itself within rounding of zero)
        step = rs / (dad + tiny)
        x = x.addcmul(d, step)
        r = r.addcmul(ad, step, value=-1)
        rs_new = torch.dot(r, r)
        d = r.addcmul(d, rs_new / (rs + tiny))
        rs = rs_new
    return x, {"cg_residual_norm": lambda: rs.sqrt(), "cg_relative_residual": lambda: rs.sqrt() / torch.linalg.vector_norm(v),
               "cg_min_curvature": lambda: torch.stack(curvatures).min() if curvatures else rs * 0 + 1}
