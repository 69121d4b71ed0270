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
    """Each parameter's group settings (lr may change between steps: a scheduler), copied once
    per group: the parameters of a group share one copy, which nothing changes."""
    by_id: dict[int, dict] = {}
    for group in optimizer.param_groups:
        settings = {k: v for k, v in group.items() if k != "params"}
        for p in group["params"]:
            by_id[id(p)] = settings
    return [by_id[id(p)] for p in params]


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


def update_all(kind: type, thetas: list[torch.Tensor], grads: list[torch.Tensor], states: list[State],
               hps: list[dict]) -> tuple[list[torch.Tensor], list[State]]:
    """:func:`update` for every parameter: SGD whose parameters share one setting (one param
    group) is done with ``torch._foreach_*`` kernels (differentiable, the same arithmetic as
    :func:`_sgd` element by element); anything else parameter by parameter."""
    if all(h == hps[0] for h in hps[1:]):
        if kind is torch.optim.SGD:
            bufs = [st.get("momentum_buffer") for st in states]
            if all(b is None for b in bufs) or all(b is not None for b in bufs):
                return _sgd_all(thetas, grads, states, bufs, hps[0])
        elif not hps[0].get("amsgrad") and (_on_device(states) or len({float(st.get("step", 0.0)) for st in states}) == 1):
            return _adam_all(thetas, grads, states, hps[0])
    updated = [update(kind, p, g, s, hp) for p, g, s, hp in zip(thetas, grads, states, hps)]
    return [u[0] for u in updated], [u[1] for u in updated]


def _sgd_all(ps: list[torch.Tensor], gs: list[torch.Tensor], sts: list[State], bufs: list, hp: dict
             ) -> tuple[list[torch.Tensor], list[State]]:
    d = list(torch._foreach_neg(gs)) if hp.get("maximize") else list(gs)
    if hp["weight_decay"]:
        d = list(torch._foreach_add(d, torch._foreach_mul(ps, hp["weight_decay"])))
    momentum = hp["momentum"]
    if momentum:
        if bufs[0] is None:
            new = d
        else:
            new = list(torch._foreach_add(torch._foreach_mul(bufs, momentum),
                                          torch._foreach_mul(d, 1 - hp["dampening"])))
        sts = [{**st, "momentum_buffer": b} for st, b in zip(sts, new)]
        d = list(torch._foreach_add(d, torch._foreach_mul(new, momentum))) if hp["nesterov"] else new
    return list(torch._foreach_sub(ps, torch._foreach_mul(d, hp["lr"]))), sts


def _adam_all(ps: list[torch.Tensor], gs: list[torch.Tensor], sts: list[State], hp: dict
              ) -> tuple[list[torch.Tensor], list[State]]:
    """:func:`_adam` for parameters sharing one setting and one step count, op for op."""
    beta1, beta2 = hp["betas"]
    lr, wd = hp["lr"], hp["weight_decay"]
    g = list(torch._foreach_neg(gs)) if hp.get("maximize") else list(gs)
    if wd:
        if hp.get("decoupled_weight_decay", False):
            ps = list(torch._foreach_mul(ps, 1 - lr * wd))
        else:
            g = list(torch._foreach_add(g, torch._foreach_mul(ps, wd)))
    m0 = [st.get("exp_avg", torch.zeros_like(p)) for st, p in zip(sts, ps)]
    v0 = [st.get("exp_avg_sq", torch.zeros_like(p)) for st, p in zip(sts, ps)]
    m = torch._foreach_add(m0, torch._foreach_mul(torch._foreach_sub(g, m0), 1 - beta1))
    v = torch._foreach_add(torch._foreach_mul(v0, beta2), torch._foreach_mul(torch._foreach_mul(g, 1 - beta2), g))
    root = [_safe_sqrt(x) for x in v]
    if _on_device(sts):
        return _adam_all_device_steps(ps, sts, m, v, root, hp)
    step = float(sts[0].get("step", 0.0)) + 1.0
    new = [{**st, "step": step, "exp_avg": a, "exp_avg_sq": b} for st, a, b in zip(sts, m, v)]
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    denom = torch._foreach_add(torch._foreach_div(root, bc2 ** 0.5), hp["eps"])
    return list(torch._foreach_sub(ps, torch._foreach_div(torch._foreach_mul(m, lr / bc1), denom))), new


def _on_device(sts: list[State]) -> bool:
    """Whether the step counts are tensors on an accelerator (Adam's ``capturable`` or ``fused``
    state): reading them would be a host sync, and a CUDA graph would keep the value it read."""
    step = sts[0].get("step") if sts else None
    return isinstance(step, torch.Tensor) and step.device.type != "cpu"


def _adam_all_device_steps(ps: list[torch.Tensor], sts: list[State], m: Any, v: Any, root: list[torch.Tensor],
                           hp: dict) -> tuple[list[torch.Tensor], list[State]]:
    """The bias corrections from each parameter's step count as a tensor (what torch's
    ``capturable`` Adam does), so that nothing is read on the host. The runtime steps every
    parameter of a problem together, so the counts agree; each is used for its own parameter."""
    beta1, beta2 = hp["betas"]
    steps = torch._foreach_add([st["step"] for st in sts], 1.0)
    bc1 = torch._foreach_add(torch._foreach_neg(torch._foreach_pow(beta1, steps)), 1.0)  # 1 − β₁ᵗ
    bc2 = torch._foreach_add(torch._foreach_neg(torch._foreach_pow(beta2, steps)), 1.0)
    denom = torch._foreach_add(torch._foreach_div(root, torch._foreach_sqrt(bc2)), hp["eps"])
    rate = torch._foreach_div(torch._foreach_mul(m, hp["lr"]), bc1)
    new = [{**st, "step": t, "exp_avg": a, "exp_avg_sq": b} for st, t, a, b in zip(sts, steps, m, v)]
    return list(torch._foreach_sub(ps, torch._foreach_div(rate, denom))), new


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
