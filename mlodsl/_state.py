"""What the runtime keeps per problem between steps, and how it is saved and restored."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch

from mlodsl import _tree as T
from mlodsl._data import Batches
from mlodsl._hypergrad import _unroll
from mlodsl._problem import Problem


@attrs.define
class Window:
    """The updates ``Unrolled`` replays: a snapshot of θ and optimizer state, then one entry per
    update: the batches it averaged over and each parameter's optimizer settings."""

    theta: list[torch.Tensor]
    states: list[dict]
    steps: list[tuple[list[Any], list[dict]]] = attrs.field(factory=list)


@attrs.define
class Snapshot:
    """Parameters, buffers and optimizer state of a problem, for ``roll_back=True``."""

    params: list[torch.Tensor]
    buffers: list[torch.Tensor]
    optimizer: dict

    @classmethod
    def take(cls, p: Problem) -> Snapshot:
        return cls(params=[t.detach().clone() for t in p.params],
                   buffers=[b.detach().clone() for b in p.module.buffers()],
                   optimizer=copy.deepcopy(p.optimizer.state_dict()))

    def restore(self, p: Problem) -> None:
        with torch.no_grad():
            for t, saved in zip(p.params, self.params):
                t.copy_(saved)
            for b, saved in zip(p.module.buffers(), self.buffers):
                b.copy_(saved)
        p.optimizer.load_state_dict(self.optimizer)


class ProblemState:
    """Batches, counters, latest metrics, the ``Unrolled`` window and the ``roll_back`` snapshot."""

    def __init__(self, problem: Problem, reach: Sequence[Problem], records_unroll: bool) -> None:
        self.problem = problem
        self.reach = tuple(reach)
        # the buffers of every module the loss may call, listed once (a step restores them on failure)
        self.reach_buffers = [b for q in self.reach for b in q.module.buffers()]
        self.batches = Batches(problem.name, problem.loc, problem.data)
        self.last_batch: Any = None
        self.has_batch = False
        self.count = 0
        self.last_loss: torch.Tensor | None = None
        self._grad_norm: torch.Tensor | None = None
        self._last_grads: list[torch.Tensor] | None = None  # the last step's gradient, until its norm is read
        self.records_unroll = records_unroll
        self.window: Window | None = None     # the last complete round (+ the round in progress)
        self.pending: Window | None = None
        self.round_start: Snapshot | None = None
        self.detaches: bool | None = None  # whether the loss calls .detach() (probed by FiniteDifference)
        self.steps_key = f"steps/{problem.name}"          # the runtime's counters, keyed once
        self.calls_key = f"method_calls/{problem.name}"

    def current_batch(self) -> Any:
        """The batch of Q's last step (what methods evaluate C_Q on); drawn once if Q never stepped."""
        if not self.has_batch:
            self.last_batch, self.has_batch = self.batches.next(), True
        return self.last_batch

    @property
    def grad_norm(self) -> torch.Tensor | None:
        """The norm of the gradient the last step applied, computed when first read (so the hot
        loop computes no norm nobody reads). The gradient is held until then, as ``.grad`` is
        in a plain PyTorch loop, and let go when the next step begins."""
        if self._grad_norm is None and self._last_grads is not None:
            self._grad_norm, self._last_grads = T.norm(self._last_grads), None
        return self._grad_norm

    @grad_norm.setter
    def grad_norm(self, value: torch.Tensor | None) -> None:
        self._grad_norm, self._last_grads = value, None

    def keep_gradient(self, grads: list[torch.Tensor] | None) -> None:
        self._grad_norm, self._last_grads = None, grads

    def begin_round(self) -> None:
        p = self.problem
        if self.records_unroll:
            self.pending = Window(theta=[t.detach().clone() for t in p.params],
                                  states=_unroll.snapshot_state(p.optimizer, p.params))
        if p.options.roll_back:
            self.round_start = Snapshot.take(p)

    def record_update(self, batches: list[Any]) -> None:
        if self.records_unroll and self.pending is not None:
            entry = (batches, _unroll.hyperparams(self.problem.optimizer, self.problem.params))
            self.pending.steps.append(entry)
            if self.window is not None and self.window is not self.pending:
                self.window.steps.append(entry)

    def end_round(self) -> None:
        if self.records_unroll and self.pending is not None:
            self.window, self.pending = self.pending, None

    def roll_back(self) -> None:
        """Restore the problem to where its last round began (after an upper problem stepped)."""
        if self.round_start is not None:
            self.round_start.restore(self.problem)

    # -- checkpoints -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches.state_dict(), "last_batch": self.last_batch,
                "has_batch": self.has_batch, "count": self.count, "last_loss": self.last_loss,
                "grad_norm": self.grad_norm, "window": self.window, "pending": self.pending,
                "round_start": self.round_start}

    def to_device(self, move: Callable[[Any], Any]) -> None:
        """Move what a checkpoint restored on the CPU (batches, windows, snapshots) with ``move``."""
        self.last_batch = move(self.last_batch)
        for w in (self.window, self.pending):
            if w is not None:
                w.theta, w.states = move(w.theta), move(w.states)
                w.steps = [(move(b), hp) for b, hp in w.steps]
        if self.round_start is not None:
            rs = self.round_start
            rs.params, rs.buffers = move(rs.params), move(rs.buffers)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.batches.load_state_dict(sd["batches"])
        for key in ("last_batch", "has_batch", "count", "last_loss", "grad_norm", "window", "pending",
                    "round_start"):
            setattr(self, key, sd[key])
