"""What every benchmark program shares: data, the runner interface, and the counting instrument.

Each program module (``bench/programs/*.py``) builds the same multilevel
program three ways — ``mlodsl`` (the public API), ``hand`` (a hand-written
PyTorch loop of exactly mlodsl's algorithm) and ``betty`` (Betty 0.2.1's
ImplicitProblem/Engine) — on the same data, sizes, seeds and dtype. A built
program is a :class:`Runner`: ``run(n)`` performs ``n`` outer iterations
(one outer iteration = one step of the uppermost problem, with the lower
steps it waits for), ``modules`` maps each problem's name to its module.

Counting (:func:`counting`) is the same instrument on every side:

- **forward**: calls of the problems' modules (a forward hook on each of
  them, so a loss that calls two modules counts two);
- **backward** and **hvp**: reverse sweeps of the autograd engine
  (``torch.autograd.grad`` and ``backward`` both end in
  ``torch.autograd._engine_run_backward``, which is wrapped). A sweep counts as
  *hvp* when its outputs reach, through the autograd graph, a tensor returned
  by an earlier ``create_graph=True`` sweep: Hessian-vector products, the
  mixed products ∂²C/∂x∂θ·p, and reverse passes through unrolled updates.
  Every other sweep counts as *backward*.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Mapping
from functools import lru_cache
from typing import Protocol

import torch
from torch import nn

SIDES = ("hand", "mlodsl", "betty")
METHODS = ("fd", "neumann", "cg", "itd")
NEUMANN_ITERATIONS = 3
CG_ITERATIONS = 5
FD_EPS = 0.01


class Runner(Protocol):
    modules: Mapping[str, nn.Module]

    def run(self, n: int) -> None:
        """``n`` outer iterations."""


class NotExpressible(Exception):
    """The side cannot express this method on this program (reported as n/a, with the reason)."""


# -- data ----------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 bundled 8×8 digits: images (N, 64) in [0, 1] float32, labels int64."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)


def split(seed: int, sizes: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Disjoint random subsets of the digits with the given sizes (the last may be -1: the rest)."""
    x, y = digits()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    out, start = [], 0
    for n in sizes:
        idx = perm[start:] if n == -1 else perm[start:start + n]
        out.append((x[idx], y[idx]))
        start += len(idx)
    return out


class Batches:
    """Mini-batches of ``(x, y)``, reshuffled each pass with its own generator (no DataLoader:
    its per-sample collation would dominate these small programs and is the same on every side).

    Iterating gives one pass; every side cycles it the way it cycles any iterable.
    """

    def __init__(self, data: tuple[torch.Tensor, torch.Tensor], batch_size: int, seed: int,
                 dtype: torch.dtype = torch.float32) -> None:
        self.x, self.y = data[0].to(dtype), data[1]
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm = torch.randperm(len(self.x), generator=self.generator)
        for i in range(0, len(perm) - self.batch_size + 1, self.batch_size):
            idx = perm[i:i + self.batch_size]
            yield self.x[idx], self.y[idx]

    def __len__(self) -> int:
        return len(self.x) // self.batch_size


class Cycle:
    """An endless ``next()`` over an iterable, restarting it when it runs out (the hand-written loops)."""

    def __init__(self, data: Batches) -> None:
        self.data = data
        self.it = iter(data)

    def next(self):
        try:
            return next(self.it)
        except StopIteration:
            self.it = iter(self.data)
            return next(self.it)


def seeded(seed: int) -> None:
    torch.manual_seed(seed)


# -- counting ------------------------------------------------------------------------------
def _reaches(roots: list, marked: set) -> bool:
    """Whether the autograd graph below ``roots`` contains a node in ``marked``."""
    seen, stack = set(), list(roots)
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        if node in marked:
            return True
        seen.add(node)
        stack.extend(n for n, _ in node.next_functions)
    return False


@contextlib.contextmanager
def counting(modules: Mapping[str, nn.Module]) -> Iterator[Counter]:
    """Count forward calls of ``modules``' modules and reverse sweeps (module docstring)."""
    counts: Counter = Counter({"forward": 0, "backward": 0, "hvp": 0})
    marked: set = set()
    real = torch.autograd._engine_run_backward

    def run_backward(outputs, grad_outputs, retain_graph, create_graph, inputs, *args, **kwargs):
        outs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
        roots = [o.grad_fn for o in outs if isinstance(o, torch.Tensor)]
        counts["hvp" if marked and _reaches(roots, marked) else "backward"] += 1
        result = real(outputs, grad_outputs, retain_graph, create_graph, inputs, *args, **kwargs)
        if create_graph and result is not None:
            marked.update(r.grad_fn for r in result if r is not None and r.grad_fn is not None)
        return result

    def on_forward(*_):
        counts["forward"] += 1

    handles = [m.register_forward_hook(on_forward) for m in modules.values()]
    torch.autograd._engine_run_backward = run_backward
    try:
        yield counts
    finally:
        torch.autograd._engine_run_backward = real
        for h in handles:
            h.remove()
