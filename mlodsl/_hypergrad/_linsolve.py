"""Linear solvers for the implicit methods: p ≈ H⁻¹ v from Hessian-vector products only."""

from __future__ import annotations

from collections.abc import Callable

import torch

from mlodsl import _tree as T

HVP = Callable[[T.Vec], T.Vec]


def neumann(hvp: HVP, v: T.Vec, iterations: int, alpha: float) -> tuple[T.Vec, dict]:
    """p = α Σ_{i=0..K} (I − αH)^i v, with K = ``iterations`` Hessian-vector products.

    Converges to H⁻¹ v when the spectrum of αH lies in (0, 2).
    """
    term, acc = v, list(v)
    for _ in range(iterations):
        term = T.add(term, hvp(term), -alpha)
        acc = T.add(acc, term)
    # diagnostics as thunks: computed only when logged or checked, not every hypergradient
    return T.scale(acc, alpha), {"neumann_last_term_norm": lambda: T.norm(term),
                                 "neumann_growth": lambda: T.norm(term) / T.norm(v)}


def conjugate_gradient(hvp: HVP, v: T.Vec, iterations: int, damping: float) -> tuple[T.Vec, dict]:
    """p ≈ (H + damping·I)⁻¹ v from ``iterations`` CG steps started at p = 0.

    Always takes ``iterations`` Hessian-vector products (no data-dependent
    branch, so no host sync); once the residual is exactly zero the remaining
    steps change nothing.

    The iterates are flat vectors over θ_Q, so each operation is one kernel whatever the
    number of parameter tensors (a dot product over a list is a kernel per tensor and a
    sum). The direction d is updated in place, so the views ``hvp`` is given are made once.
    """
    r = T.flatten(v)
    d = r.clone()
    d_views = T.unflatten(d, v)
    x = torch.zeros_like(r)
    rs = torch.dot(r, r)
    tiny = torch.finfo(rs.dtype).tiny
    curvatures = []  # dᵀ(H+λI)d of each direction: a negative one means H is not positive definite
    for _ in range(iterations):
        ad = T.flatten(hvp(d_views))
        if damping:
            ad = ad.add(d, alpha=damping)
        dad = torch.dot(d, ad)
        curvatures.append(dad)
        # an exact solve leaves r = d = 0: 0 / (0 + tiny) is a zero step, with no host sync
        # (and + tiny changes no denominator that is not itself within rounding of zero)
        step = rs / (dad + tiny)
        x = x.addcmul(d, step)
        r = r.addcmul(ad, step, value=-1)
        rs_new = torch.dot(r, r)
        d.mul_(rs_new / (rs + tiny)).add_(r)  # d = r + β d
        rs = rs_new
    return T.unflatten(x, v), {
        "cg_residual_norm": lambda: rs.sqrt(), "cg_relative_residual": lambda: rs.sqrt() / T.norm(v),
        "cg_min_curvature": lambda: torch.stack(curvatures).min() if curvatures else rs * 0 + 1}
