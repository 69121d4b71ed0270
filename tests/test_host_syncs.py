"""With checks="log" and logging off, mlodsl's hot loop reads nothing off the device."""

from __future__ import annotations

import os

import pytest
import torch

import mlodsl
from mlodsl import ProblemError
from mlodsl.hypergrad import CG, FiniteDifference, Neumann, Unrolled
from tests.quadratic import build, diamond

MLODSL_DIR = os.path.dirname(mlodsl.__file__)
SYNCS = ("item", "__bool__", "__float__", "__int__", "tolist", "__index__")


@pytest.fixture
def syncs(monkeypatch):
    """Count host reads (item, bool, float, int, tolist) made by mlodsl's own code."""
    import sys

    found: list[str] = []
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(MLODSL_DIR):
                found.append(f"{_name} at {os.path.basename(caller)}:{sys._getframe(1).f_lineno}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return found


@pytest.mark.parametrize("method", [Neumann(iterations=2), CG(iterations=3), FiniteDifference(), Unrolled()],
                         ids=["neumann", "cg", "fd", "itd"])
def test_the_hot_loop_makes_no_host_sync(syncs, method):
    quad = build(diamond(method, steps=2), seed=1)
    quad.program._runtime.checks = "log"
    quad.program._runtime.run(3)  # warm-up, interpreted
    syncs.clear()
    quad.program._runtime.run_periods(4 * len(quad.program.plan.schedule.period))  # lowered periods
    quad.program._runtime.run(3)
    assert syncs == []
    quad.program._runtime.finish_run()
    assert len(syncs) == 1  # the one read at the sync point


def test_the_default_checks_read_once_per_step(syncs):
    quad = build(diamond(Neumann(iterations=2)), seed=1)
    quad.program._runtime.run(2)
    syncs.clear()
    quad.program._runtime.run(2)
    steps = sum(len(quad.program.plan.schedule.iteration(i).steps) for i in range(2, 4))
    assert len(syncs) == steps


def test_a_deferred_failure_is_reported_at_the_sync_point():
    quad = build(diamond("fd"), seed=1)
    program = quad.program
    program._runtime.checks = "log"
    program.run(iterations=2, progress=False)
    with torch.no_grad():
        quad.problems["bottom"].module.theta.fill_(float("nan"))
    with pytest.raises(ProblemError, match=r"'bottom' .* was NaN or Inf at its step 2, found at iteration 4"):
        program.run(iterations=2, progress=False)
