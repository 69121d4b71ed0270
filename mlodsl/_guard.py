"""Transactions around a step: a failing step leaves everything as it was before it.

The runtime changes nothing of a problem's parameters or optimizer state until
the whole gradient is known to be finite; what a step may touch before that
point (buffers updated in the forward pass, e.g. BatchNorm running stats) is
restored here when the step fails.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mlodsl._runtime import ProblemState, Runtime


class Guard:
    def __init__(self, runtime: Runtime, nan_policy: str = "raise") -> None:
        self.runtime = runtime
        self.nan_policy = nan_policy  # "raise" | "skip" (skip: drop the step with a warning, count it)

    @contextmanager
    def transaction(self, st: ProblemState) -> Iterator[None]:
        """Run one step of ``st.problem``; on any exception restore its buffers and re-raise."""
        buffers = [(b, b.detach().clone()) for b in st.problem.module.buffers()]
        try:
            yield
        except BaseException:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            raise
