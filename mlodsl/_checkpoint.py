"""Checkpoints: the whole program's state, written atomically.

A checkpoint holds every module, optimizer and scheduler, the schedule's
counters, each problem's data position and ``Unrolled`` window, and the RNG
states, so that resuming gives exactly the parameters an uninterrupted run
gives. It is written to a temporary file in the same folder, flushed to disk,
then renamed over the target: a crash mid-write leaves the previous file.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from compiler import errors
from mlodsl import _distributed

if TYPE_CHECKING:
    from mlodsl._program import Program

FORMAT = "mlodsl-checkpoint/1"


class CheckpointError(errors.MlodslError):
    """A checkpoint that cannot be read or does not fit the program."""


BAD_CHECKPOINT = (
    "cannot load the checkpoint {path}: {why}.\n"
    "Rule: checkpoints are written atomically by Program.save, so a partial file is never at this "
    "name unless it was copied or edited.\n"
    "Fix: load the previous checkpoint, or the one named 'last.pt' in the run's checkpoint_dir."
)

MISMATCH = (
    "the checkpoint {path} is for problems {saved}, but this program has {mine}.\n"
    "Rule: a checkpoint loads into a program built from the same problems.\n"
    "Fix: build the same Program (same @problem names) before calling load()."
)


def state_dict(program: Program) -> dict[str, Any]:
    from mlodsl import _runtime

    problems = {p.name: {"module": p.module.state_dict(), "optimizer": _optimizer_state(program, p),
                         "scheduler": p.scheduler.state_dict() if p.scheduler is not None else None}
                for p in program.problems}
    sd = {"format": FORMAT, "problems": problems, "runtime": _runtime.state_dict(program._runtime),
          "rng": _rng_state()}
    if program._dist is not None:  # every rank's data position, batches and RNG (rank 0: a list)
        sd["ranks"] = program._dist.gather({"runtime": sd["runtime"], "rng": sd["rng"]})
    return sd


def _optimizer_state(program: Program, p: Any) -> dict[str, Any] | None:
    if program._dist is None:
        return p.optimizer.state_dict()
    return _distributed.optimizer_state(p.optimizer, program._dist.main)  # ZeRO: gathered on rank 0


def load_state_dict(program: Program, sd: dict[str, Any], path: str = "<state_dict>") -> None:
    from mlodsl import _runtime

    if not isinstance(sd, dict) or sd.get("format") != FORMAT:
        raise CheckpointError(BAD_CHECKPOINT.format(path=path, why="it is not an mlodsl checkpoint"))
    saved, mine = sorted(sd["problems"]), sorted(p.name for p in program.problems)
    if program._dist is not None:
        sd = program._dist.own(sd)
    if saved != mine:
        raise CheckpointError(MISMATCH.format(path=path, saved=saved, mine=mine))
    for p in program.problems:
        entry = sd["problems"][p.name]
        p.module.load_state_dict(entry["module"])
        _distributed.load_optimizer_state(p.optimizer, entry["optimizer"])
        if p.scheduler is not None and entry["scheduler"] is not None:
            p.scheduler.load_state_dict(entry["scheduler"])
    _runtime.load_state_dict(program._runtime, sd["runtime"])
    _set_rng_state(sd["rng"])
    if program._runtime.graphs is not None:  # the optimizers hold new tensors: capture again
        program._runtime.graphs.reset()


def save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(BAD_CHECKPOINT.format(path=path, why="there is no such file"))
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(BAD_CHECKPOINT.format(path=path, why=f"{type(e).__name__}: {e}")) from None


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np
        np.random.set_state(state["numpy"])
