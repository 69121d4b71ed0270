"""The training loop around the runtime: progress, logging, validation, early stopping,
checkpoints and Ctrl-C.

``Program.run`` builds a :class:`Loop` and runs it. The runtime executes
iterations; between iterations the loop reads metrics (the only device syncs:
on log iterations, and for the progress bar at most twice a second), validates,
keeps the best checkpoint and the last one, and stops early or on Ctrl-C with a
consistent program (the current step finishes; a second Ctrl-C interrupts it,
and the step's transaction rolls it back).
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import attrs
from tqdm.auto import tqdm

from compiler.errors import UsageError
from mlodsl._solvers import check_solvers
from mlodsl.loggers import Console, Logger

if TYPE_CHECKING:
    from mlodsl._program import Program


@attrs.define
class EarlyStopping:
    """Stop when ``metric`` (a key of the validation dict) has not improved for ``patience``
    validations; ``patience=None`` only tracks the best (for ``best.pt``)."""

    metric: str
    patience: int | None = 5
    mode: Literal["min", "max"] = "min"
    min_delta: float = 0.0

    def improved(self, value: float, best: float | None) -> bool:
        if best is None:
            return not math.isnan(value)
        return value < best - self.min_delta if self.mode == "min" else value > best + self.min_delta


@attrs.define
class History:
    """What a ``run`` did: logged metrics, validations, the best one, and how it ended."""

    logs: list[dict[str, float]] = attrs.field(factory=list)
    validations: list[dict[str, float]] = attrs.field(factory=list)
    best: dict[str, float] | None = None
    stopped_early: bool = False
    iterations: int = 0


class _Interrupt:
    """First Ctrl-C: finish the current step, then stop. Second: interrupt at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _Interrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("mlodsl: stopping after the current step (Ctrl-C again to interrupt it)")


class Loop:
    def __init__(self, program: Program, iterations: int, *, progress: bool | None, log_every: int | None,
                 loggers: Sequence[Logger] | None, validate: Callable[[Program], Mapping[str, float]] | None,
                 validate_every: int | None, early_stopping: EarlyStopping | None,
                 checkpoint_every: int | None, checkpoint_dir: str | os.PathLike | None) -> None:
        for name, value in (("log_every", log_every), ("validate_every", validate_every),
                            ("checkpoint_every", checkpoint_every)):
            if value is not None and value < 1:
                raise UsageError(f"Program.run(): {name}={value} must be >= 1.")
        if early_stopping is not None and validate is None:
            raise UsageError("Program.run(): early_stopping needs validate=fn (a function of the program "
                             "returning a dict of metrics).")
        self.program, self.runtime, self.iterations = program, program._runtime, iterations
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.dist = program._dist  # distributed: only rank 0 shows progress and logs
        self.log_every = log_every
        self.loggers = list(loggers) if loggers is not None else ([Console()] if log_every else [])
        if self.dist is not None and not self.dist.main:
            self.progress, self.loggers = False, []
        self.validate, self.validate_every = validate, validate_every or (log_every or 1)
        self.early_stopping = early_stopping
        self.checkpoint_every = checkpoint_every
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.history = History()
        self._bad_validations = 0
        self._last_postfix = 0.0

    def run(self) -> History:
        bar = tqdm(total=self.iterations, disable=not self.progress, dynamic_ncols=True, unit="it")
        try:
            with _Interrupt() as interrupt:
                requested = lambda: interrupt.requested  # noqa: E731
                if self.dist is not None:  # every rank stops after the same iteration
                    requested = lambda: self.dist.any(interrupt.requested)  # noqa: E731
                else:
                    self.runtime.stop_requested = requested
                for _ in range(self.iterations):
                    self.runtime.run_iteration()
                    self.history.iterations += 1
                    bar.update(1)
                    if self._after_iteration(bar) or requested():
                        break
                if requested():
                    self._checkpoint("last.pt")
                    raise KeyboardInterrupt
                self.runtime.finish_run()
        except _Stopped:
            self._checkpoint("last.pt")
            raise KeyboardInterrupt from None
        finally:
            self.runtime.stop_requested = None
            if self.progress:
                bar.set_postfix(self.program.losses(), refresh=True)
            bar.close()
            for logger in self.loggers:
                logger.close()
        return self.history

    def _after_iteration(self, bar: tqdm) -> bool:
        """Log, validate, checkpoint; True to stop early."""
        it = self.runtime.iteration
        if self.log_every and it % self.log_every == 0:
            self._log(it)
        if self.progress and time.monotonic() - self._last_postfix > 0.5:
            self._last_postfix = time.monotonic()
            bar.set_postfix(self.program.losses(), refresh=False)
        stop = False
        if self.validate is not None and it % self.validate_every == 0:
            stop = self._validate(it)
        if self.checkpoint_every and it % self.checkpoint_every == 0:
            self._checkpoint("last.pt")
        if stop:
            self.history.stopped_early = True
            self._checkpoint("last.pt")
        return stop

    def _log(self, it: int) -> None:
        self.runtime.finish_run()
        for name in self.runtime.problems:
            check_solvers(self.runtime, name)
        metrics = self.program.metrics()
        self.history.logs.append({"iteration": it, **metrics})
        for logger in self.loggers:
            logger.log(it, metrics)

    def _validate(self, it: int) -> bool:
        metrics = {k: float(v) for k, v in self.validate(self.program).items()}
        if self.dist is not None:  # rank 0's metrics decide, so that every rank stops together
            metrics = self.dist.broadcast_object(metrics)
        self.history.validations.append({"iteration": it, **metrics})
        for logger in self.loggers:
            logger.log(it, {f"validation/{k}": v for k, v in metrics.items()})
        es = self.early_stopping
        if es is None:
            return False
        if es.metric not in metrics:
            raise UsageError(f"early_stopping metric {es.metric!r} is not among the validation metrics "
                             f"{sorted(metrics)}. Fix: return it from validate=, or name another one.")
        best = self.history.best[es.metric] if self.history.best else None
        if es.improved(metrics[es.metric], best):
            self.history.best = {"iteration": it, **metrics}
            self._bad_validations = 0
            self._checkpoint("best.pt")
            return False
        self._bad_validations += 1
        return es.patience is not None and self._bad_validations >= es.patience

    def _checkpoint(self, name: str) -> None:
        if self.checkpoint_dir is not None:
            self.program.save(self.checkpoint_dir / name)


class _Stopped(Exception):
    """Raised by the runtime between steps when Ctrl-C asked to stop."""
