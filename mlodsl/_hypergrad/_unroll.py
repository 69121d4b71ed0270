"""Differentiable copies of torch's SGD and Adam/AdamW updates, for ``Unrolled``.

Each update is ``θ_{t+1}, s_{t+1} = update(θ_t, g_t, s_t, hp)`` written with
out-of-place ops, so that reverse mode can run through it. The formulas follow
``torch.optim`` exactly (same order of operations), so replaying recorded steps
from a snapshot reproduces the live parameters up to rounding.
"""

from __future__ import annotations

from typing import Any

import torch

SUPPORTED = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)

State = dict[str, Any]


def supports(optimizer: torch.optim.Optimizer) -> bool:
    return type(optimizer) in SUPPORTED


def hyperparams(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[dict]:
    """Each parameter's group settings (lr may change between steps: a scheduler)."""
    by_id: dict[int, dict] = {}
    for group in optimizer.param_groups:
        settings = {k: v for k, v in group.items() if k != "params"}
        for p in group["params"]:
            by_id[id(p)] = settings
    return [dict(by_id[id(p)]) for p in params]


def snapshot_state(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[State]:
    out = []
    for p in params:
        st = optimizer.state.get(p, {})
        out.append({k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in st.items()})
    return out


def update(kind: type, theta: torch.Tensor, grad: torch.Tensor, state: State, hp: dict
           ) -> tuple[torch.Tensor, State]:
    if kind is torch.optim.SGD:
        return _sgd(theta, grad, state, hp)
    return _adam(theta, grad, state, hp)


def _sgd(p: torch.Tensor, g: torch.Tensor, st: State, hp: dict) -> tuple[torch.Tensor, State]:
    d = -g if hp.get("maximize") else g
    if hp["weight_decay"]:
        d = d + hp["weight_decay"] * p
    momentum = hp["momentum"]
    if momentum:
        buf = st.get("momentum_buffer")
        buf = d if buf is None else momentum * buf + (1 - hp["dampening"]) * d
        st = {**st, "momentum_buffer": buf}
        d = d + momentum * buf if hp["nesterov"] else buf
    return p - hp["lr"] * d, st


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt whose gradient at 0 is 0 instead of inf (a zero second moment has no slope)."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


def _adam(p: torch.Tensor, g: torch.Tensor, st: State, hp: dict) -> tuple[torch.Tensor, State]:
    beta1, beta2 = hp["betas"]
    lr, wd = hp["lr"], hp["weight_decay"]
    g = -g if hp.get("maximize") else g
    step = float(st.get("step", 0.0)) + 1.0
    if wd:
        if hp.get("decoupled_weight_decay", False):
            p = p * (1 - lr * wd)
        else:
            g = g + wd * p
    m = st.get("exp_avg", torch.zeros_like(p))
    v = st.get("exp_avg_sq", torch.zeros_like(p))
    m = m + (g - m) * (1 - beta1)
    v = v * beta2 + (1 - beta2) * g * g
    new = {**st, "step": step, "exp_avg": m, "exp_avg_sq": v}  # a float: only the next replayed update reads it
    if hp.get("amsgrad"):
        v = torch.maximum(st.get("max_exp_avg_sq", torch.zeros_like(p)), v)
        new["max_exp_avg_sq"] = v
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    denom = _safe_sqrt(v) / (bc2 ** 0.5) + hp["eps"]
    return p - (lr / bc1) * m / denom, new
