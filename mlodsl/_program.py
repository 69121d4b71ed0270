"""``Program``: collect → compile → run."""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch

from compiler import Graph, Plan, compile_specs, errors
from mlodsl import _checkpoint, _compile, _distributed, _fuse, _graphs, _prefetch
from mlodsl._check import public
from mlodsl._collect import collect
from mlodsl._loop import EarlyStopping, History, Loop
from mlodsl._problem import Problem
from mlodsl._runtime import Runtime
from mlodsl.loggers import Logger

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Program:
    """A compiled multilevel program.

    ``Program(problems)`` infers the dataflow graph from the losses' code,
    checks it and emits the plan; a broken program raises :class:`CompileError`
    here, before any data is touched. ``program.graph`` is the graph,
    ``program.plan`` the plan (``print`` it), ``program.run(iterations=N)``
    executes N iterations (steps of the lowermost problems), continuing where
    the previous ``run`` stopped.

    ``device`` moves every module (and each batch, as it is drawn) to a device;
    on CUDA the next batch of each problem is drawn and copied on a side stream
    while the current step runs (``prefetch=False`` turns that off);
    ``precision`` ("fp32", "bf16", "fp16") evaluates losses under autocast;
    ``seed`` seeds torch, Python and NumPy (set it before building modules for
    full determinism); ``nan_policy`` says what a non-finite loss or gradient
    does ("raise", or "skip" the step with a warning); ``solvers`` says what
    unhealthy solver diagnostics do ("warn", "raise" or "off"); ``checks``
    says when finiteness is read: each step ("step": one host sync per step,
    and a failing step is rolled back) or only at log iterations and the end
    of ``run`` ("log": no host sync in the hot loop; a failure is reported
    late and not rolled back). ``compile=True`` (or a dict of ``torch.compile``
    options) compiles every module; if compilation fails the step is retried
    eagerly and the program goes on without it. On CUDA it also captures each
    iteration in a CUDA graph once the program is warm and replays it
    (``mlodsl._graphs``; ``cuda_graphs=False`` turns that off, and
    ``program.cuda_graphs`` says what was captured, or why not); ``checks``
    then defaults to "log", since a graph cannot read each step's verdict.
    ``fuse_updates`` (on by default) gives torch's optimizers, where their
    settings are left at the defaults, their fused or foreach update (the same
    arithmetic, fewer kernels: ``mlodsl._fuse``); ``program.fused`` lists what
    it set.

    Under ``torchrun`` (or an initialized process group; ``distributed=True``
    requires one, ``False`` ignores it) the program is data parallel: each
    problem's data is sharded across ranks and every gradient, Hessian-vector
    product and hypergradient is the combined batch's (``mlodsl._distributed``);
    ``distributed_hypergrad="local"`` averages per-rank hypergradients instead
    (cheaper, an approximation); ``shard_optimizer`` shards optimizer state
    with ``ZeroRedundancyOptimizer``. Only rank 0 logs and writes checkpoints.
    """

    @public
    def __init__(self, problems: Sequence[Problem], *, device: str | torch.device | None = None,
                 precision: Literal["fp32", "bf16", "fp16"] = "fp32", seed: int | None = None,
                 nan_policy: Literal["raise", "skip"] = "raise",
                 solvers: Literal["warn", "raise", "off"] = "warn",
                 checks: Literal["step", "log"] | None = None, distributed: bool | None = None,
                 distributed_hypergrad: Literal["exact", "local"] = "exact",
                 shard_optimizer: bool = False, compile: bool | dict[str, Any] = False,
                 prefetch: bool = True, fuse_updates: bool = True, cuda_graphs: bool | None = None) -> None:
        self.problems = tuple(problems)
        for p in self.problems:
            p.refresh_params()
        specs, reach = collect(self.problems)
        self.plan: Plan = compile_specs(specs)
        self.graph: Graph = self.plan.graph
        if seed is not None:
            _seed_everything(seed)
        dev = torch.device(device) if device is not None else None
        self._dist, dev = _distributed.setup(distributed, dev, distributed_hypergrad, seed)
        if dev is not None:
            for p in self.problems:
                p.module.to(dev)
        self.fused: dict[str, str] = _fuse.fuse_updates(self.problems) if fuse_updates else {}
        self._runtime = Runtime(self.plan, {p.name: p for p in self.problems}, reach,
                                device=dev, autocast=PRECISIONS[precision])
        self._runtime.guard.nan_policy = nan_policy
        self._runtime.solver_policy = solvers
        on_cuda = dev is not None and dev.type == "cuda"
        if cuda_graphs and not on_cuda:
            raise errors.UsageError("Program(): cuda_graphs=True needs device='cuda' (a CUDA graph holds GPU "
                                    "work). Fix: pass device='cuda', or leave cuda_graphs out.")
        graphs = bool(compile) and on_cuda if cuda_graphs is None else cuda_graphs
        if checks is None:
            checks = "log" if graphs and nan_policy == "raise" else "step"
        if checks == "log" and nan_policy == "skip":
            raise errors.UsageError("Program(): nan_policy='skip' needs checks='step' (a step can only be "
                                    "skipped when its verdict is read before the update).")
        self._runtime.checks = checks
        stage = _prefetch.stage_for(dev, prefetch)
        for st in self._runtime.state.values():
            st.batches.stage = stage
        compile_options = compile if isinstance(compile, dict) else {}
        if compile:
            _compile.apply(self.problems, compile_options)
            self._runtime.compiled = True
        if self._dist is not None:
            self._dist.attach(self._runtime, shard_optimizer)
        if graphs:
            _graphs.attach(self._runtime, _graphs.CudaGraphs(dev), compile_options)
        self._ranks_checked = self._dist is None  # parameters identical on every rank (at the first run)

    @public
    def run(self, iterations: int, *, progress: bool | None = None, log_every: int | None = None,
            loggers: Sequence[Logger] | None = None,
            validate: Callable[[Program], Mapping[str, float]] | None = None,
            validate_every: int | None = None, early_stopping: EarlyStopping | None = None,
            checkpoint_every: int | None = None, checkpoint_dir: str | os.PathLike | None = None) -> History:
        """Run ``iterations`` more iterations of the schedule.

        ``progress`` shows a tqdm bar with each problem's latest loss (default:
        when stderr is a terminal). Every ``log_every`` iterations, metrics go to
        ``loggers`` (default: the console). Every ``validate_every`` iterations
        ``validate(program)`` returns a dict of metrics; ``early_stopping``
        stops on one of them and keeps ``best.pt``. Every ``checkpoint_every``
        iterations ``checkpoint_dir/last.pt`` is written atomically. Ctrl-C
        finishes the current step, writes ``last.pt`` and raises KeyboardInterrupt.
        """
        if iterations < 0:
            raise errors.UsageError(f"Program.run(): iterations={iterations} must be >= 0.")
        if not self._ranks_checked:
            self._dist.check_parameters(self.problems)
            self._ranks_checked = True
        if _plain(progress, log_every, validate, early_stopping, checkpoint_every, checkpoint_dir):
            done = self._runtime.run_periods(iterations)  # the lowered plan, whole periods at a time
            self._runtime.run(iterations - done)
            self._runtime.finish_run()
            return History(iterations=iterations)
        return Loop(self, iterations, progress=progress, log_every=log_every, loggers=loggers,
                    validate=validate, validate_every=validate_every, early_stopping=early_stopping,
                    checkpoint_every=checkpoint_every, checkpoint_dir=checkpoint_dir).run()

    def __getitem__(self, name: str) -> Problem:
        for p in self.problems:
            if p.name == name:
                return p
        raise KeyError(f"no problem named {name!r}; the problems are {[p.name for p in self.problems]}")

    @property
    def rank(self) -> int:
        """This process's rank (0 in one process)."""
        return self._dist.rank if self._dist is not None else 0

    @property
    def world_size(self) -> int:
        """The number of ranks (1 in one process)."""
        return self._dist.world if self._dist is not None else 1

    def broadcast_parameters(self) -> None:
        """Copy rank 0's parameters and buffers to every rank (call it on every rank)."""
        if self._dist is not None:
            self._dist.broadcast_parameters(self.problems)
            self._ranks_checked = True

    @property
    def cuda_graphs(self) -> dict[str, Any] | None:
        """The captured iterations (positions in the period), replays so far, and why graphs are
        off (None while they are on); None when the program does not use graphs."""
        graphs = self._runtime.graphs
        return graphs.describe() if graphs is not None else None

    @property
    def iteration(self) -> int:
        """Iterations completed so far (steps of the lowermost problems)."""
        return self._runtime.iteration

    @property
    def stats(self) -> dict[str, int]:
        """Counters: steps per problem, method calls per lower problem, Hessian-vector products."""
        return dict(self._runtime.stats)

    def reset_stats(self) -> None:
        self._runtime.stats.clear()

    @property
    def diagnostics(self) -> dict[str, Any]:
        """The latest solver diagnostics (CG residual, Neumann term norm, FD epsilon) per problem."""
        return self._runtime.read_diagnostics()

    def losses(self) -> dict[str, float]:
        """The loss of each problem at its latest step (a device sync)."""
        return {n: float(s.last_loss) for n, s in self._runtime.state.items() if s.last_loss is not None}

    def metrics(self) -> dict[str, float]:
        """Loss, gradient norm and learning rate per problem, and solver diagnostics (a device sync)."""
        out: dict[str, float] = {}
        for name, st in self._runtime.state.items():
            if st.last_loss is not None:
                out[f"{name}/loss"] = float(st.last_loss)
                out[f"{name}/grad_norm"] = float(st.grad_norm) if st.grad_norm is not None else float("nan")
            out[f"{name}/lr"] = st.problem.lr
        out.update({k: float(v) for k, v in sorted(self._runtime.read_diagnostics().items())})
        return out

    def gradient(self, problem: Problem | str, batch: Any = None) -> list[torch.Tensor]:
        """The total gradient dC_P/dθ_P that P's next step would apply, without stepping.

        ``batch`` defaults to the next batch of P's data. Lower problems use the
        batch of their latest step.
        """
        p = problem if isinstance(problem, Problem) else self[problem]
        st = self._runtime.state[p.name]
        batch = self._runtime.to_device(st.batches.next() if batch is None else batch)
        grads, _ = self._runtime.total_gradient(p, batch)
        return [g.detach() for g in grads]

    # -- checkpoints -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Modules, optimizers, schedulers, schedule counters, data positions and RNG states."""
        return _checkpoint.state_dict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _checkpoint.load_state_dict(self, state)

    def save(self, path: str | os.PathLike) -> None:
        """Write a checkpoint atomically (a crash mid-write leaves the previous file).

        Distributed: call it on every rank; rank 0 writes every rank's state."""
        sd = self.state_dict()
        if self._dist is None:
            _checkpoint.save(sd, path)
        else:
            self._dist.on_main(lambda: _checkpoint.save(sd, path))

    def load(self, path: str | os.PathLike) -> None:
        """Restore a checkpoint written by :meth:`save`; the next ``run`` continues exactly.

        Distributed: call it on every rank; rank 0 reads the file and broadcasts it."""
        read = lambda: _checkpoint.load(path)  # noqa: E731
        sd = read() if self._dist is None else self._dist.on_main(read, share=True)
        _checkpoint.load_state_dict(self, sd, path=str(path))
        self._ranks_checked = True

    def __repr__(self) -> str:
        return f"Program({[p.name for p in self.problems]})"


def _plain(progress: bool | None, *options: object) -> bool:
    """A run with nothing to do between iterations (no progress bar, logging, validation, checkpoints)."""
    shown = sys.stderr.isatty() if progress is None else progress
    return not shown and all(o is None for o in options)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np
        np.random.seed(seed)
    except ImportError:
        pass
