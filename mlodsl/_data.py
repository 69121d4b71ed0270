"""Batches of a problem: any iterable, cycled forever."""

from __future__ import annotations

from typing import Any

from compiler import errors


class Batches:
    """Cycles ``problem.data``; ``None`` data yields ``None`` (the loss takes no argument)."""

    def __init__(self, name: str, loc: object, data: Any) -> None:
        self.name, self.loc, self.data = name, loc, data
        self._it: Any = None
        self.epoch = 0
        self.position = 0  # batches drawn in the current pass

    def next(self) -> Any:
        if self.data is None:
            return None
        if self._it is None:
            self._it = iter(self.data)
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
        self._it = iter(self.data)
        if self._it is self.data:
            raise errors.ProblemError(errors.DATA_RAN_DRY.format(**fmt))
        self.epoch += 1
        self.position = 0
        try:
            return next(self._it)
        except StopIteration:
            raise errors.ProblemError(errors.DATA_EMPTY.format(**fmt)) from None
