"""Building blocks of the hand-written loops: what a researcher writes once and reuses.

Plain ``torch.autograd.grad`` on lists of tensors, no framework. The formulas
are mlodsl's (DESIGN §3), written in the same order of operations so that the
equivalence test can compare parameters exactly in float64:

- Neumann: p = α Σ_{i=0..K} (I − αH)^i v, then −(∂²C/∂x∂θ) p;
- CG: p ≈ H⁻¹ v from K conjugate-gradient steps started at 0, then −(∂²C/∂x∂θ) p;
- finite differences: −α (∇_x C(θ+εv) − ∇_x C(θ−εv)) / 2ε with ε = eps/‖v‖
  (θ moved in place, as DARTS' code does);
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


def finite_difference(loss_at: Callable[[Vec | None], torch.Tensor], params: Vec, inputs: Vec, v: Vec,
                      lr: float, eps: float) -> Vec:
    """−α (∇_x C(θ+εv) − ∇_x C(θ−εv)) / 2ε,  ε = eps/‖v‖.

    As in DARTS' code, θ is moved in place and the loss evaluated with the live
    module (``loss_at(None)``), then θ is put back.
    """
    e = eps / torch.sqrt(dot(v, v))   # a tensor: no host sync
    saved = [p.detach().clone() for p in params]
    out = []
    for sign in (e, -e):
        with torch.no_grad():
            for p, s, t in zip(params, saved, v):
                p.copy_(s + sign * t)
        out.append(grads(loss_at(None), inputs))
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    coef = -lr / (2 * e)
    return [coef * (a + (-1.0) * b) for a, b in zip(*out)]


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


def update_for(optimizer: torch.optim.Optimizer) -> Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]:
    """The differentiable update of ``optimizer`` (one param group; SGD or Adam without weight decay)."""
    hp = optimizer.param_groups[0]
    if isinstance(optimizer, torch.optim.SGD):
        return lambda p, g, st: sgd_update(p, g, st, hp["lr"], hp["momentum"], hp["weight_decay"], hp["dampening"])
    assert type(optimizer) is torch.optim.Adam and not hp["weight_decay"], "the benchmarks use SGD and Adam"
    return lambda p, g, st: adam_update(p, g, st, hp["lr"], hp["betas"], hp["eps"])


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


class Bilevel:
    """The hand-written loop of a bilevel program: per outer iteration one lower step, then one
    upper step whose gradient is the direct one plus (∂θ*/∂φ)ᵀ v through the lower problem's
    last step (on its last batch) by ``method``. Subclasses give the two losses."""

    upper_reads_own = False   # whether the upper loss reads φ directly (a direct gradient)

    def __init__(self, method: str, theta: Vec, phi: Vec, opt: torch.optim.Optimizer,
                 meta_opt: torch.optim.Optimizer, train, meta, *, neumann_iterations: int,
                 cg_iterations: int, fd_eps: float) -> None:
        self.method, self.theta, self.phi, self.opt, self.meta_opt = method, theta, phi, opt, meta_opt
        self.train, self.meta = train, meta
        self.lr = opt.param_groups[0]["lr"]
        self.k_neumann, self.k_cg, self.fd_eps = neumann_iterations, cg_iterations, fd_eps
        self.last = self.snap = None

    def lower_loss(self, batch, theta: Vec | None = None, live_phi: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def upper_loss(self, batch) -> torch.Tensor:
        raise NotImplementedError

    def run(self, n: int) -> None:
        for _ in range(n):
            self.iteration()

    def iteration(self) -> None:
        batch = self.train.next()
        if self.method == "itd":
            self.snap = snapshot(self.opt, self.theta)
        apply(self.opt, self.theta, grads(self.lower_loss(batch), self.theta))
        self.last = batch
        loss = self.upper_loss(self.meta.next())
        if self.upper_reads_own:
            both = grads(loss, self.phi + self.theta)
            direct, v = both[:len(self.phi)], both[len(self.phi):]
            total = [d + h for d, h in zip(direct, self.hypergradient(v))]
        else:
            total = self.hypergradient(grads(loss, self.theta))
        apply(self.meta_opt, self.phi, total)

    def hypergradient(self, v: Vec) -> Vec:
        return through(self.method, lambda theta: self.lower_loss(self.last, theta, live_phi=True),
                       self.theta, self.phi, v, lr=self.lr, k_neumann=self.k_neumann, k_cg=self.k_cg,
                       fd_eps=self.fd_eps, snap=self.snap, update=update_for(self.opt))


def through(method: str, loss_at: Callable[[Vec | None], torch.Tensor], theta: Vec, inputs: Vec, v: Vec, *,
            lr: float, k_neumann: int, k_cg: int, fd_eps: float, snap=None, update=None) -> Vec:
    """(∂θ*/∂x)ᵀ v for a lower problem with loss ``loss_at(θ)`` (``None``: its live θ) by ``method``."""
    if method == "neumann":
        return implicit(loss_at(None), theta, inputs, v, lambda g, th, b: neumann(g, th, b, k_neumann, lr))
    if method == "cg":
        return implicit(loss_at(None), theta, inputs, v, lambda g, th, b: cg(g, th, b, k_cg))
    if method == "fd":
        return finite_difference(loss_at, theta, inputs, v, lr, fd_eps)
    theta0, states = snap
    return unrolled(loss_at, theta0, states, update, inputs, v)
