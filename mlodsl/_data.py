"""Batches of a problem: any iterable, cycled forever, and where it stands (for checkpoints).

A DataLoader draws its shuffling seed from torch's global generator when an
iterator is created, so the position is saved as (generator state at that
moment, batches drawn since); restoring re-creates the same iterator and
fast-forwards, which gives exactly the batches an uninterrupted run sees.

A step that fails gives its batches back (``mark`` / ``rewind``): they are
drawn again, in order, before anything new, so a rolled-back step loses no data
and a retry sees the same batches. A draw that started a new pass also used
torch's generator (the loader's seeds); the step's rollback restores the
generator, so giving such a batch back also replays that use, and the retry
draws the same dropout masks as an uninterrupted run.

With a ``stage`` (:mod:`mlodsl._prefetch`: on CUDA, a copy to the device on a
side stream), each draw also draws the next batch of the same pass and starts
moving it, so the copy overlaps the step. The batch drawn ahead is not yet
consumed: the position, the marks and checkpoints count it only once it is
taken, a rewind leaves it to come after the batches given back, and nothing is
drawn ahead across the end of a pass (a new pass draws the loader's seeds from
torch's generator, which must happen when the batch is taken). So the batches,
their order and a checkpoint's position are the same with or without it.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch
from torch.utils._pytree import tree_flatten

from compiler import errors
from mlodsl._distributed import set_epoch


class Mark(NamedTuple):
    """Where the data stood: ``(epoch, position, rng, started)``."""

    epoch: int
    position: int
    rng: torch.Tensor | None
    started: bool


class _Draw(NamedTuple):
    batch: Any
    after: Mark  # where the data stood once the batch was drawn
    rng_after: torch.Tensor | None = None  # torch's generator after the draw, when the draw used it




class Batches:
    """Cycles ``problem.data``; ``None`` data yields ``None`` (the loss takes no argument)."""

    def __init__(self, name: str, loc: object, data: Any) -> None:
        self.name, self.loc, self.data = name, loc, data
        self._it: Any = None
        self.epoch = 0
        self.position = 0  # batches drawn in the current pass
        self._rng: torch.Tensor | None = None  # torch's generator state when the pass began
        self._started = False
        self._journal: list[_Draw] | None = None  # draws since mark()
        self._given_back: list[_Draw] = []       # batches of a rolled-back step, drawn first
        self.stage: Any = None                   # a _prefetch stage: draw the next batch ahead
        self._ahead: _Draw | None = None         # drawn ahead and being moved; not yet taken

    def next(self) -> Any:
        if self.data is None:
            return None
        if self._given_back:
            draw = self._given_back.pop(0)
            self._set(draw.after)
            if draw.rng_after is not None:  # the original draw started a pass: replay its use of the RNG
                torch.set_rng_state(draw.rng_after)
        elif self._ahead is not None:
            draw, self._ahead = self._ahead, None
            draw = draw._replace(batch=self.stage.finish(draw.batch))
            self._set(draw.after)
        else:
            pass_before = self._rng
            batch = self._draw()
            used_rng = self._rng is not pass_before  # a new iterator drew its seeds from torch's RNG
            draw = _Draw(batch, self._mark(), torch.get_rng_state() if used_rng else None)
        if self._journal is not None:
            self._journal.append(draw)
        if self.stage is not None and not self._given_back and self._ahead is None:
            self._draw_ahead()
        return draw.batch

    def _draw_ahead(self) -> None:
        """Draw the next batch of this pass and start moving it (not across a pass's end)."""
        try:
            left = len(self.data) - self.position
        except TypeError:  # no length: where the pass ends is unknown
            return
        if left <= 0 or self._it is None:
            return
        taken = self._mark()
        batch = self._draw()
        self._ahead = _Draw(self.stage.start(batch), self._mark())
        self._set(taken)

    def _draw(self) -> Any:
        if self._it is None:
            self._it = self._new_iterator()
        self._started = True
        try:
            batch = next(self._it)
        except StopIteration:
            batch = self._restart()
        self.position += 1
        return batch

    # -- transactions --------------------------------------------------------------
    def mark(self) -> Mark:
        """Start recording draws; :meth:`rewind` gives them back, :meth:`commit` keeps them."""
        self._journal = []
        return self._mark()

    def rewind(self, mark: Mark) -> None:
        """Give back every batch drawn since ``mark``: the next draws return them again."""
        self._given_back = (self._journal or []) + self._given_back
        self._journal = None
        self._set(mark)

    def commit(self) -> None:
        self._journal = None

    def _mark(self) -> Mark:
        return Mark(self.epoch, self.position, self._rng, self._started)

    def _set(self, mark: Mark) -> None:
        self.epoch, self.position, self._rng, self._started = mark

    def _restart(self) -> Any:
        fmt = dict(name=self.name, loc=self.loc)
        if self.position == 0:
            raise errors.ProblemError(errors.DATA_EMPTY.format(**fmt))
        self.epoch += 1  # before the new iterator: a DistributedSampler shuffles by epoch
        self._it = self._new_iterator()
        if self._it is self.data:
            raise errors.ProblemError(errors.DATA_RAN_DRY.format(**fmt))
        self.position = 0
        try:
            return next(self._it)
        except StopIteration:
            raise errors.ProblemError(errors.DATA_EMPTY.format(**fmt)) from None

    def _new_iterator(self) -> Any:
        self._rng = torch.get_rng_state()
        set_epoch(self.data, self.epoch)
        return iter(self.data)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "rng": self._rng,
                "started": self._started}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.epoch, self.position = sd["epoch"], 0
        self._it = None
        self._given_back, self._journal, self._ahead = [], None, None
        self._started = sd["started"]
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


def describe(batch: Any, limit: int = 6) -> str:
    """A batch's structure in a line: ``tuple(Tensor[4, 2] float32 cpu, Tensor[4] int64 cpu)``."""
    if isinstance(batch, torch.Tensor):
        return f"Tensor{list(batch.shape)} {str(batch.dtype).removeprefix('torch.')} {batch.device}"
    if isinstance(batch, (tuple, list)):
        items = [describe(b, limit) for b in batch[:limit]] + (["..."] if len(batch) > limit else [])
        return f"{type(batch).__name__}({', '.join(items)})"
    if isinstance(batch, dict):
        items = [f"{k!r}: {describe(v, limit)}" for k, v in list(batch.items())[:limit]]
        return "{" + ", ".join(items) + (", ..." if len(batch) > limit else "") + "}"
    if batch is None:
        return "None"
    return f"{type(batch).__name__} {batch!r}"[:60]


def devices(batch: Any) -> list[str]:
    """The devices of the tensors in a batch (nested tuples, lists and dicts), in order."""
    leaves, _ = tree_flatten(batch)
    return list(dict.fromkeys(str(t.device) for t in leaves if isinstance(t, torch.Tensor)))
