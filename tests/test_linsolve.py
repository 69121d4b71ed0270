"""The linear solvers on their own: CG solves (H + λI) p = v for a vector split over tensors.

CG runs on one flat vector with its direction updated in place; these tests check it against a
dense solve in float64 where the vector is several tensors of different shapes, so a wrong
layout (a view in the wrong place, a stale direction) shows up as a wrong answer.
"""

from __future__ import annotations

import pytest
import torch

from mlodsl._hypergrad._linsolve import conjugate_gradient

SHAPES = [(3, 2), (4,), (1,), (2, 1, 2)]


def spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    return a @ a.T / n + torch.eye(n, dtype=torch.float64)  # well conditioned: n CG steps solve it to rounding


def split(flat: torch.Tensor, like: list[tuple[int, ...]], dtypes: list[torch.dtype]) -> list[torch.Tensor]:
    out, i = [], 0
    for shape, dtype in zip(like, dtypes):
        n = torch.Size(shape).numel()
        out.append(flat[i:i + n].reshape(shape).to(dtype))
        i += n
    return out


def hvp_of(h: torch.Tensor, dtypes: list[torch.dtype]):
    calls = []

    def hvp(d: list[torch.Tensor]) -> list[torch.Tensor]:
        assert [tuple(t.shape) for t in d] == SHAPES  # given in the parameters' layout
        calls.append([t.clone() for t in d])
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in d])
        return split(h @ flat, SHAPES, dtypes)

    return hvp, calls


@pytest.mark.parametrize("damping", [0.0, 0.7])
def test_cg_solves_a_system_split_over_tensors(damping):
    n = sum(torch.Size(s).numel() for s in SHAPES)
    h = spd(n, seed=1)
    b = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    dtypes = [torch.float64] * len(SHAPES)
    hvp, calls = hvp_of(h, dtypes)
    p, diagnostics = conjugate_gradient(hvp, split(b, SHAPES, dtypes), iterations=n, damping=damping)
    expected = torch.linalg.solve(h + damping * torch.eye(n, dtype=torch.float64), b)
    assert [tuple(t.shape) for t in p] == SHAPES
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in p]), expected, rtol=1e-9, atol=1e-10)
    assert float(diagnostics["cg_relative_residual"]()) < 1e-8
    assert len(calls) == n
    # the first direction is v itself, the second is not (it was updated in place between calls)
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in calls[0]]), b)
    assert not torch.equal(torch.cat([t.reshape(-1) for t in calls[1]]), b)


def test_cg_leaves_its_right_hand_side_alone():
    n = sum(torch.Size(s).numel() for s in SHAPES)
    dtypes = [torch.float64] * len(SHAPES)
    v = split(torch.ones(n, dtype=torch.float64), SHAPES, dtypes)
    before = [t.clone() for t in v]
    hvp, _ = hvp_of(spd(n, seed=3), dtypes)
    conjugate_gradient(hvp, v, iterations=4, damping=0.0)
    for a, b in zip(v, before):
        assert torch.equal(a, b)


def test_cg_with_parameters_of_two_dtypes():
    n = sum(torch.Size(s).numel() for s in SHAPES)
    h = spd(n, seed=4)
    b = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    dtypes = [torch.float32, torch.float64, torch.float32, torch.float64]
    v = split(b, SHAPES, dtypes)
    hvp, _ = hvp_of(h, dtypes)
    p, _ = conjugate_gradient(hvp, v, iterations=n, damping=0.0)
    expected = torch.linalg.solve(h, torch.cat([t.reshape(-1).to(torch.float64) for t in v]))
    assert [tuple(t.shape) for t in p] == SHAPES
    got = torch.cat([t.reshape(-1).to(torch.float64) for t in p])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
