"""Arithmetic on lists of tensors (one list = one vector over a problem's parameters).

Each operation is one ``torch._foreach_*`` call over the whole list (a single
dispatch, fused kernels on GPU) rather than a Python loop of per-tensor ops.
"""

from __future__ import annotations

import torch

Vec = list[torch.Tensor]


def norm(a: Vec) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(a)))


def fusable(a: Vec, device: torch.device) -> bool:
    """Whether :func:`any_nonfinite` can check ``a`` with the fused kernel (floating point, on ``device``)."""
    return all(x.is_floating_point() and x.device == device for x in a)


def any_nonfinite(a: Vec, flag: torch.Tensor, fused: bool) -> bool:
    """Whether some entry of ``a`` is NaN or Inf, read once. ``flag`` (one element, zero, on the
    device of ``a``) is set when one is: with ``fused`` (:func:`fusable`, decided once per
    problem), one kernel (torch's AMP check, unscaling by exactly 1) rather than a norm or a
    check per tensor. Reset ``flag`` after a True."""
    if fused:
        torch._amp_foreach_non_finite_check_and_unscale_(a, flag, _one(flag.device))
    else:
        flag.add_(~torch.stack([torch.isfinite(x).all() for x in a]).all())
    return bool(flag.item())


def nonfinite_flag(a: Vec) -> torch.Tensor:
    """A one-element tensor, nonzero iff some entry of ``a`` is NaN or Inf (no read)."""
    flag = torch.zeros(1, dtype=torch.float32, device=a[0].device)
    if all(x.is_floating_point() and x.device == flag.device for x in a):
        torch._amp_foreach_non_finite_check_and_unscale_(a, flag, _one(flag.device))
        return flag
    return (~torch.stack([torch.isfinite(x).all() for x in a]).all()).to(flag.dtype).reshape(1)


_ONES: dict[torch.device, torch.Tensor] = {}


def _one(device: torch.device) -> torch.Tensor:
    """A 1 on ``device``, made once (the AMP check only reads it)."""
    one = _ONES.get(device)
    if one is None:
        one = _ONES[device] = torch.ones(1, dtype=torch.float32, device=device)  # float32 whatever the default dtype: the AMP kernel needs it
    return one


def add(a: Vec, b: Vec, alpha: float | torch.Tensor = 1.0) -> Vec:
    """a + alpha * b"""
    if isinstance(alpha, torch.Tensor):
        return list(torch._foreach_add(a, torch._foreach_mul(b, alpha)))
    return list(torch._foreach_add(a, b, alpha=alpha))


def scale(a: Vec, alpha: float | torch.Tensor) -> Vec:
    return list(torch._foreach_mul(a, alpha))


def zeros_like(a: Vec) -> Vec:
    return [torch.zeros_like(x) for x in a]


def fill_none(grads: tuple[torch.Tensor | None, ...], like: Vec) -> Vec:
    """autograd.grad(..., allow_unused=True) gives None for unused inputs: make them zeros."""
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, like)]


def flatten(a: Vec) -> torch.Tensor:
    """The entries of ``a`` as one 1-D tensor, in order (the common dtype when they differ)."""
    if len(a) == 1:
        return a[0].reshape(-1)
    return torch.cat([x.reshape(-1) for x in a])


def unflatten(flat: torch.Tensor, like: Vec) -> Vec:
    """Views of the 1-D ``flat`` shaped as the tensors of ``like`` (the inverse of :func:`flatten`)."""
    if len(like) == 1:
        return [flat.view(like[0].shape)]
    return [part.view(x.shape) for part, x in zip(flat.split([x.numel() for x in like]), like)]


def split(flat: Vec, sizes: list[int]) -> list[Vec]:
    out, i = [], 0
    for n in sizes:
        out.append(flat[i:i + n])
        i += n
    return out
