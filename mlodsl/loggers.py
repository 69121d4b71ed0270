"""Where ``program.run(log_every=K, loggers=[...])`` sends its metrics.

Every K iterations the runtime collects, for each problem, its latest loss,
gradient norm and learning rate, and the hypergradient diagnostics of its
lower problems (CG residual, Neumann last-term norm and growth, finite-
difference epsilon), and hands them to each logger as ``{"name/metric": value}``.
A logger is anything with ``log(iteration, metrics)`` and ``close()``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from tqdm.auto import tqdm

from compiler.errors import UsageError


@runtime_checkable
class Logger(Protocol):
    def log(self, iteration: int, metrics: Mapping[str, float]) -> None: ...
    def close(self) -> None: ...


class Console:
    """One line per log iteration, grouped by problem (written above the progress bar)."""

    def __init__(self, digits: int = 4) -> None:
        self.digits = digits

    def log(self, iteration: int, metrics: Mapping[str, float]) -> None:
        groups: dict[str, list[str]] = {}
        for key, value in metrics.items():
            name, _, metric = key.rpartition("/")
            groups.setdefault(name or "-", []).append(f"{metric}={value:.{self.digits}g}")
        body = " | ".join(f"{name}: {' '.join(items)}" for name, items in groups.items())
        tqdm.write(f"iter {iteration}: {body}")

    def close(self) -> None:
        pass


class CSV:
    """Long-format CSV (``iteration,metric,value``): new metrics may appear at any time."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        self._file = open(self.path, "a", newline="")
        self._writer = csv.writer(self._file)
        if new:
            self._writer.writerow(["iteration", "metric", "value"])

    def log(self, iteration: int, metrics: Mapping[str, float]) -> None:
        self._writer.writerows([iteration, k, repr(float(v))] for k, v in metrics.items())
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoard:
    """``torch.utils.tensorboard.SummaryWriter`` scalars (needs ``pip install tensorboard``)."""

    def __init__(self, log_dir: str | os.PathLike) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise UsageError(f"TensorBoard logging needs the tensorboard package ({e}). "
                             "Fix: pip install tensorboard") from None
        self._writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, iteration: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, iteration)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandB:
    """Weights & Biases (needs ``pip install wandb``); ``wandb.init(**init)`` on first use."""

    def __init__(self, **init: Any) -> None:
        try:
            import wandb
        except ImportError:
            raise UsageError("W&B logging needs the wandb package. Fix: pip install wandb") from None
        self._wandb = wandb
        self._init = init
        self._run: Any = None

    def log(self, iteration: int, metrics: Mapping[str, float]) -> None:
        if self._run is None:
            self._run = self._wandb.init(**self._init)
        self._run.log(dict(metrics), step=iteration)

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()


__all__ = ["CSV", "Console", "Logger", "TensorBoard", "WandB"]
