"""``Program(fuse_updates=True)``: torch's optimizers take their fused or foreach update.

Left at their defaults (``fused=None, foreach=None``), torch's optimizers run a Python loop over
the parameters on the CPU, a few kernels per tensor; their ``foreach`` implementation makes a
few calls over the whole list instead, and SGD, Adam and AdamW have a ``fused`` kernel (one
per tensor, on CPU and CUDA). An update is what a program runs most often, so for each
problem whose optimizer is one of torch's, whose param groups leave both settings at their
defaults, the program sets

- ``fused=True`` where the optimizer has not stepped yet (its state would be laid out for
  the loop), where torch has a fused kernel for the optimizer, the parameters' device
  and dtype (torch's own check), every parameter is contiguous and no module of the problem
  has sparse gradients. The runtime hands the optimizer contiguous gradients: torch 2.13's
  fused CPU kernels read a strided gradient as if it were contiguous (a transposed gradient
  gave a wrong update; ``tests/test_fuse.py`` shows it);
- else ``foreach=True``, where the optimizer has a foreach implementation.

The arithmetic is the same: the foreach update bit for bit, the fused one to rounding
(measured: 0 for Adam and AdamW, 3e-15 after 20 SGD steps in float64). An explicit
``fused=False`` or ``foreach=False`` is kept, and so is any optimizer not from ``torch.optim``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mlodsl._problem import Problem

FUSED = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def fuse_updates(problems: Iterable[Problem]) -> dict[str, str]:
    """Set each eligible optimizer's fused (or foreach) update; ``{problem: "fused" | "foreach"}``."""
    done = {}
    for p in problems:
        how = _fuse(p.optimizer, p.module)
        if how is not None:
            done[p.name] = how
    return done


def _fuse(opt: torch.optim.Optimizer, module: torch.nn.Module) -> str | None:
    groups = opt.param_groups
    if (type(opt).__module__.split(".")[:2] != ["torch", "optim"]
            or not all("foreach" in g and g["foreach"] is None and g.get("fused") is None for g in groups)
            or any(g.get("differentiable") or isinstance(g.get("lr"), torch.Tensor) for g in groups)):
        return None
    how = "fused" if type(opt) in FUSED and not opt.state and not _sparse(module) and all(
        _fusable(t) for g in groups for t in g["params"]) else "foreach"
    for g in groups:
        g[how] = True
    return how


def _fusable(t: torch.Tensor) -> bool:
    from torch.optim.optimizer import _device_dtype_check_for_fused

    try:
        _device_dtype_check_for_fused(t)
    except (RuntimeError, ValueError):
        return False
    return not t.is_sparse and t.is_contiguous()


def _sparse(module: torch.nn.Module) -> bool:
    """Whether a submodule makes sparse gradients (``nn.Embedding(sparse=True)``), which fused kernels refuse."""
    return any(getattr(m, "sparse", False) is True for m in module.modules())
