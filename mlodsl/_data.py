"""Batches of a problem: any iterable, cycled forever, and where it stands (for checkpoints).

A DataLoader draws its shuffling seed from torch's global generator when an
iterator is created, so the position is saved as (generator state at that
moment, batches drawn since); restoring re-creates the same iterator and
fast-forwards, which gives exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from compiler import errors


class Batches:
    """Cycles ``problem.data``; ``None`` data yields ``None`` (the loss takes no argument)."""

    def __init__(self, name: str, loc: object, data: Any) -> None:
        self.name, self.loc, self.data = name, loc, data
        self._it: Any = None
        self.epoch = 0
        self.position = 0  # batches drawn in the current pass
        self._rng: torch.Tensor | None = None  # torch's generator state when the pass began

    def next(self) -> Any:
        if self.data is None:
            return None
        if self._it is None:
            self._it = self._new_iterator()
        try:
            batch = next(self._it)
        except StopIteration:
            batch = self._restart()
        self.position += 1
        return batch

    def _restart(self) -> Any:
        fmt = dict(name=self.name, loc=self.loc)
        if self.position == 0:
            raise errors.ProblemError(errors.DATA_EMPTY.format(**fmt))
        self._it = self._new_iterator()
        if self._it is self.data:
            raise errors.ProblemError(errors.DATA_RAN_DRY.format(**fmt))
        self.epoch += 1
        self.position = 0
        try:
            return next(self._it)
        except StopIteration:
            raise errors.ProblemError(errors.DATA_EMPTY.format(**fmt)) from None

    def _new_iterator(self) -> Any:
        self._rng = torch.get_rng_state()
        return iter(self.data)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "rng": self._rng,
                "started": self._it is not None}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.epoch, self.position = sd["epoch"], 0
        self._it = None
        if self.data is None or not sd["started"]:
            return
        if iter(self.data) is self.data:
            warnings.warn(f"the data of {self.name!r} ({self.loc}) is an iterator: its position cannot "
                          "be restored from a checkpoint; it continues from where it is now.", stacklevel=3)
            self._it, self.position = self.data, sd["position"]
            return
        outer = torch.get_rng_state()
        torch.set_rng_state(sd["rng"])
        self._it = self._new_iterator()
        if sd["position"]:
            next(self._it)  # a sampler draws its seed at the first batch, right after iter()
        torch.set_rng_state(outer)
        for _ in range(sd["position"] - 1):
            next(self._it)
        self.position = sd["position"]
