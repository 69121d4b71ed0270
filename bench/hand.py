"""Building blocks of the hand-written loops: what a researcher writes once and reuses.

Plain ``torch.autograd.grad`` on lists of tensors, no framework. The formulas
are mlodsl's (DESIGN §3), written in the same order of operations so that the
equivalence test can compare parameters exactly in float64:

- Neumann: p = α Σ_{i=0..K} (I − αH)^i v, then −(∂²C/∂x∂θ) p;
- CG: p ≈ H⁻¹ v from K conjugate-gradient steps started at 0, then −(∂²C/∂x∂θ) p;
- finite differences: −α (∇_x C(θ+εv) − ∇_x C(θ−εv)) / 2ε with ε = eps/‖v‖;
- unrolled: replay the lower problem's last update from a snapshot (θ and the
  optimizer state taken before it) with the upper parameters live, then
  reverse mode from the replayed θ.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Vec = list[torch.Tensor]


def dot(a: Vec, b: Vec) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def grads(loss: torch.Tensor, wrt: Sequence[torch.Tensor], **kw) -> Vec:
    """∂loss/∂wrt, zeros where ``loss`` does not depend on a tensor."""
    out = torch.autograd.grad(loss, wrt, allow_unused=True, **kw)
    return [torch.zeros_like(w) if g is None else g for g, w in zip(out, wrt)]


def neumann(g: Vec, params: Vec, v: Vec, iterations: int, alpha: float) -> Vec:
    """α Σ_{i=0..K} (I − αH)^i v, with H v = ∂(gᵀv)/∂θ from the gradient graph ``g``."""
    term, acc = v, list(v)
    for _ in range(iterations):
        hv = torch.autograd.grad(g, params, grad_outputs=term, retain_graph=True)
        term = [t + (-alpha) * h for t, h in zip(term, hv)]
        acc = [a + t for a, t in zip(acc, term)]
    return [alpha * a for a in acc]


def cg(g: Vec, params: Vec, v: Vec, iterations: int) -> Vec:
    """K conjugate-gradient steps for H p = v from p = 0."""
    x = [torch.zeros_like(t) for t in v]
    r, d = list(v), list(v)
    rs = dot(r, r)
    for _ in range(iterations):
        hd = list(torch.autograd.grad(g, params, grad_outputs=d, retain_graph=True))
        step = rs / dot(d, hd)
        x = [a + step * b for a, b in zip(x, d)]
        r = [a + (-step) * b for a, b in zip(r, hd)]
        rs_new = dot(r, r)
        d = [a + (rs_new / rs) * b for a, b in zip(r, d)]
        rs = rs_new
    return x


def implicit(loss: torch.Tensor, params: Vec, inputs: Vec, v: Vec, solve: Callable[[Vec, Vec, Vec], Vec]) -> Vec:
    """−(∂²C/∂x∂θ) p with p = solve(g, θ, v); the gradient graph g is built once."""
    g = grads(loss, params, create_graph=True)
    p = solve(g, params, v)
    pairs = [(a, b) for a, b in zip(g, p) if a.requires_grad]
    cross = torch.autograd.grad([a for a, _ in pairs], inputs, grad_outputs=[b for _, b in pairs],
                                allow_unused=True)
    return [torch.zeros_like(x) if c is None else -1.0 * c for c, x in zip(cross, inputs)]


def finite_difference(loss_at: Callable[[Vec], torch.Tensor], params: Vec, inputs: Vec, v: Vec,
                      lr: float, eps: float) -> Vec:
    """−α (∇_x C(θ+εv) − ∇_x C(θ−εv)) / 2ε,  ε = eps/‖v‖."""
    e = eps / torch.sqrt(dot(v, v))   # a tensor: no host sync
    with torch.no_grad():
        plus = [p + e * t for p, t in zip(params, v)]
        minus = [p + (-e) * t for p, t in zip(params, v)]
    g_plus, g_minus = grads(loss_at(plus), inputs), grads(loss_at(minus), inputs)
    coef = -lr / (2 * e)
    return [coef * (a + (-1.0) * b) for a, b in zip(g_plus, g_minus)]


# -- differentiable optimizer updates (torch.optim's formulas, out of place) -------------------
def snapshot(optimizer: torch.optim.Optimizer, params: Vec) -> tuple[Vec, list[dict]]:
    """θ and the optimizer state before an update, for replaying it."""
    theta = [p.detach().clone() for p in params]
    states = [{k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in optimizer.state.get(p, {}).items()}
              for p in params]
    return theta, states


def sgd_update(p: torch.Tensor, g: torch.Tensor, st: dict, lr: float, momentum: float,
               weight_decay: float = 0.0, dampening: float = 0.0) -> torch.Tensor:
    d = g
    if weight_decay:
        d = d + weight_decay * p
    if momentum:
        buf = st.get("momentum_buffer")
        d = d if buf is None else momentum * buf + (1 - dampening) * d
    return p - lr * d


def adam_update(p: torch.Tensor, g: torch.Tensor, st: dict, lr: float, betas: tuple[float, float],
                eps: float) -> torch.Tensor:
    beta1, beta2 = betas
    step = float(st.get("step", 0.0)) + 1.0
    m = st.get("exp_avg", torch.zeros_like(p))
    v = st.get("exp_avg_sq", torch.zeros_like(p))
    m = m + (g - m) * (1 - beta1)
    v = v * beta2 + (1 - beta2) * g * g
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    positive = v > 0   # sqrt with a zero (not inf) slope at 0
    root = torch.where(positive, torch.where(positive, v, torch.ones_like(v)).sqrt(), torch.zeros_like(v))
    return p - (lr / bc1) * m / (root / (bc2 ** 0.5) + eps)


def unrolled(loss_at: Callable[[Vec], torch.Tensor], theta0: Vec, states: list[dict],
             update: Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor], inputs: Vec, v: Vec) -> Vec:
    """(∂θ_1/∂x)ᵀ v for the update θ_1 = update(θ_0, ∇C(θ_0, x)), replayed from the snapshot."""
    theta = [t.clone().requires_grad_(True) for t in theta0]
    g = grads(loss_at(theta), theta, create_graph=True)
    theta1 = [update(p, gi, st) for p, gi, st in zip(theta, g, states)]
    pairs = [(a, b) for a, b in zip(theta1, v) if a.requires_grad]
    out = torch.autograd.grad([a for a, _ in pairs], inputs, grad_outputs=[b for _, b in pairs], allow_unused=True)
    return [torch.zeros_like(x) if o is None else o for o, x in zip(out, inputs)]


def apply(optimizer: torch.optim.Optimizer, params: Vec, gradient: Vec) -> None:
    """Set ``.grad`` and take the optimizer step."""
    for p, g in zip(params, gradient):
        p.grad = g
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
