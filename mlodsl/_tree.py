"""Arithmetic on lists of tensors (one list = one vector over a problem's parameters)."""

from __future__ import annotations

import torch

Vec = list[torch.Tensor]


def dot(a: Vec, b: Vec) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))  # type: ignore[return-value]


def norm(a: Vec) -> torch.Tensor:
    return torch.sqrt(dot(a, a))


def add(a: Vec, b: Vec, alpha: float | torch.Tensor = 1.0) -> Vec:
    """a + alpha * b"""
    return [x + alpha * y for x, y in zip(a, b)]


def scale(a: Vec, alpha: float | torch.Tensor) -> Vec:
    return [alpha * x for x in a]


def zeros_like(a: Vec) -> Vec:
    return [torch.zeros_like(x) for x in a]


def fill_none(grads: tuple[torch.Tensor | None, ...], like: Vec) -> Vec:
    """autograd.grad(..., allow_unused=True) gives None for unused inputs: make them zeros."""
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, like)]


def split(flat: Vec, sizes: list[int]) -> list[Vec]:
    out, i = [], 0
    for n in sizes:
        out.append(flat[i:i + n])
        i += n
    return out
