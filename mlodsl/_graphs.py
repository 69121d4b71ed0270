"""Whole iterations in CUDA graphs: ``Program(..., device="cuda", compile=True)``.

Once the program is warm, each iteration of the schedule's period is captured
once in a CUDA graph (every kernel of its steps: losses, hypergradients,
finiteness checks and optimizer updates) and then replayed: one launch per
iteration, and no Python between the kernels. What a graph cannot hold stays
in Python around each replay: drawing the batches, copied into the graph's
static input tensors, and the runtime's counters, advanced by what the
captured iteration did. A graph reads and writes fixed memory, so everything
that carries from one step to the next lives in tensors updated in place
(parameters, optimizer state, the deferred finiteness verdicts).

How an iteration position of the period gets its graph:

1. its first visit after one whole period has run eagerly (so that optimizer
   state exists and ``torch.compile`` has compiled) runs it eagerly under a
   probe (:class:`_Probe`) that looks for what a replay could not reproduce: a
   value read on the host (``.item()``), random numbers drawn in an
   evaluation whose generator mlodsl forks (a lower loss evaluated by a
   hypergradient: a graph cannot rewind the generator), or a CPU tensor changed
   in place in a program on the GPU. If it finds one, graphs are off for the
   program, with a warning that says what and where;
2. the iteration is captured again from the batches it drew (their copies are
   the graph's inputs), and everything the capture changed is put back. A
   period of n iterations is n graphs, captured in order and sharing one
   memory pool, each starting from the Python state the previous one leaves
   (so it reads the tensors that one writes): replayed in order, they are the
   whole period, and a run can still stop, log or validate between iterations;
3. its first replay is checked: run eagerly from the same state on the same
   batches; if the two differ, graphs are off, with a warning, and the program
   goes on eagerly from the eager result.

An iteration whose batches do not match the captured shapes (the last, smaller
batch of a pass) runs eagerly, and so does the rest of its period. A change of
an optimizer's settings (a learning rate set by hand between runs) drops the
graphs; they are captured again. What graphs require is checked when the
program is built (:func:`unsupported`): no scheduler or hook (Python between
steps), no fp16 loss scaling (it reads the overflow on the host), no
``roll_back`` (it reloads optimizer state), torch's SGD, Adam or AdamW (Adam's
``capturable`` update is switched on), one process, ``checks="log"`` (each
step's verdict would be a host sync).

:class:`Emulated` gives the same semantics without a GPU: capture records each
ATen operation with the tensors it read and wrote, and a replay runs them again
on those same tensors, so a value that should have been an input but was baked
into the graph shows up as a wrong result, as it would on the device. The tests
use it; the CUDA backend is :class:`CudaGraphs`. The emulator binds tensors, not
addresses: a parameter given new memory under the same tensor (``.data = ...``,
``module.to(...)``) is followed by a replay there but not by a CUDA graph, which
is why the memory of θ is part of what drops the graphs (:func:`_settings`).
"""

from __future__ import annotations

import os
import sysconfig
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only

from compiler import errors
from mlodsl import _bindings
from mlodsl._guard import _short, _window_lengths
from mlodsl._runtime import _as_is

if TYPE_CHECKING:
    from mlodsl._runtime import Runtime
    from mlodsl._state import ProblemState

_GRAPHABLE_OPTIMIZERS = ("SGD", "Adam", "AdamW")
_CAPTURABLE = ("Adam", "AdamW")


# -- backends ----------------------------------------------------------------------------
class CudaGraphs:
    """torch.cuda.CUDAGraph, with one memory pool shared by the graphs of a program (replayed
    in the order they were captured, as torch requires for sharing)."""

    name = "cuda"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool: Any = None

    def warm(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` eagerly on a side stream (what capture needs first: autograd and cuBLAS
        set up their state on the stream they run on)."""
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            fn()
        current.wait_stream(side)

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # "thread_local": a DataLoader's pin-memory thread may allocate page-locked memory while
        # this thread captures; that is not part of the graph and must not invalidate it
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            fn()
        return graph.replay


class HostSyncInCapture(RuntimeError):
    """What CUDA raises when a captured stream is synchronized; :class:`Emulated` raises it too."""


class Emulated:
    """A CUDA graph's semantics on any device (for tests): capture runs ``fn`` and records every
    ATen operation with its arguments and results; replay runs the operations again on the
    same tensors and writes each result into the tensor the capture produced."""

    name = "emulated"

    def warm(self, fn: Callable[[], None]) -> None:
        fn()

    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        recorder = _Recorder()
        with recorder:
            fn()
        ops = recorder.ops

        def replay() -> None:
            with torch.no_grad():
                for func, args, kwargs, out, layouts in ops:
                    result = func(*args, **kwargs)
                    for kept, layout, new in zip(tree_flatten(out)[0], layouts, tree_flatten(result)[0]):
                        if isinstance(kept, torch.Tensor) and not _same_memory(kept, new):
                            if _layout(kept) != layout:  # reshaped in place later on (squeeze_): as then
                                kept.as_strided_(*layout)
                            kept.copy_(new)
        return replay


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[Any, tuple, dict, Any]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func is torch.ops.aten._local_scalar_dense.default:
            raise HostSyncInCapture("a value was read on the host while the graph was captured")
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        layouts = [_layout(t) if isinstance(t, torch.Tensor) else None for t in tree_flatten(out)[0]]
        self.ops.append((func, args, kwargs, out, layouts))
        return out


def _layout(t: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """Size, strides and offset: an operation that reshapes a tensor in place (``squeeze_``)
    changes them after the operation that made it was recorded."""
    return tuple(t.shape), t.stride(), t.storage_offset()


def _same_memory(a: torch.Tensor, b: Any) -> bool:
    return (isinstance(b, torch.Tensor) and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and a.storage_offset() == b.storage_offset())


# -- what a graph cannot replay ----------------------------------------------------------------
class _Probe(TorchDispatchMode):
    """Watches one eager iteration for what a replay would get wrong (module docstring, 1.)."""

    def __init__(self, on_gpu: bool) -> None:
        super().__init__()
        self.on_gpu = on_gpu
        self.found: str | None = None
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if self.found is None and not self.paused:
            self.found = self._hazard(func, args, kwargs)
        return func(*args, **kwargs)

    def _hazard(self, func: Any, args: tuple, kwargs: dict) -> str | None:
        if func is torch.ops.aten._local_scalar_dense.default:
            return f"a value is read on the host (.item(), float(), bool() of a tensor) at {_user_line()}"
        seeded = torch.Tag.nondeterministic_seeded in func.tags
        if seeded and _forked():
            return (f"random numbers are drawn ({func}) at {_user_line()} in a loss evaluation that "
                    "mlodsl runs on a fork of the generator (a lower loss in a hypergradient), which a graph "
                    "cannot rewind")
        if self.on_gpu:
            tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
            on_cpu = bool(tensors) and all(t.device.type == "cpu" for t in tensors)
            if on_cpu and (seeded or _mutates(func)):
                return (f"a CPU tensor is {'drawn at random' if seeded else 'changed in place'} ({func}) "
                        f"at {_user_line()}: a CUDA graph holds only the GPU's work")
        return None


def _mutates(func: Any) -> bool:
    return any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)


def _forked() -> bool:
    """Whether the current evaluation runs on a fork of the generators (``mlodsl._bindings``)."""
    bindings = _bindings.current()
    return bindings is not None and bindings.owner is not _bindings._stepping.get()


_TORCH_OR_STDLIB = (os.path.dirname(torch.__file__) + os.sep, sysconfig.get_paths()["stdlib"] + os.sep)


def _user_line() -> str:
    """The innermost line outside torch: the user's, or mlodsl's own when it is the reader."""
    frames = [f for f in traceback.extract_stack()
              if not f.filename.startswith(_TORCH_OR_STDLIB) and f.filename != __file__]
    return f"{_short(frames[-1].filename)}:{frames[-1].lineno}" if frames else "?"


def unsupported(runtime: Runtime, compile_options: dict[str, Any]) -> str | None:
    """Why this program's iterations cannot be captured (fixed when it is built), or None."""
    if runtime.reduce is not _as_is:
        return "the program is distributed (its collectives run between the steps)"
    if runtime.scaler is not None:
        return "precision='fp16' scales the loss with an overflow check read on the host each step"
    if compile_options.get("mode") in ("reduce-overhead", "max-autotune"):
        return f"torch.compile's mode={compile_options['mode']!r} captures graphs of its own"
    for p in runtime.problems.values():
        if p.scheduler is not None:
            return f"{p.name!r} has a scheduler (it sets the learning rate each step; a graph holds it fixed)"
        if any(p.hooks.values()):
            return f"{p.name!r} has hooks (Python that runs between the steps)"
        if p.options.roll_back:
            return f"{p.name!r} has roll_back=True (it reloads the optimizer's state)"
        kind = type(p.optimizer)
        if not (kind.__module__.startswith("torch.optim") and kind.__name__ in _GRAPHABLE_OPTIMIZERS):
            return (f"the optimizer of {p.name!r} is {kind.__name__} (mlodsl captures the updates of "
                    f"torch's {', '.join(_GRAPHABLE_OPTIMIZERS)})")
    return None


CHECKS_STEP = "checks='step' reads each step's finiteness on the host (pass checks='log')"


def attach(runtime: Runtime, backend: Any, compile_options: dict[str, Any]) -> Graphs:
    """Give ``runtime`` its :class:`Graphs`, off with a warning when the program cannot have them."""
    why = unsupported(runtime, compile_options) or (CHECKS_STEP if runtime.checks != "log" else None)
    runtime.graphs = Graphs(runtime, backend, off=why)
    if why is not None:
        warnings.warn(errors.GRAPHS_OFF.format(why=why), errors.MlodslWarning, stacklevel=3)
    return runtime.graphs


# -- what one iteration changes outside its tensors ---------------------------------------------
class _PythonState:
    """The runtime's Python-side state: its counters and each problem's state (shallow: tensors
    by reference, ``Unrolled`` windows with their lists)."""

    def __init__(self, rt: Runtime) -> None:
        self.iteration, self.position = rt.iteration, rt.position
        self.stats = Counter(rt.stats)
        self.diagnostics = dict(rt.diagnostics)
        self.states = {name: vars(st).copy() for name, st in rt.state.items()}
        self.windows = [(w, list(w.steps)) for w, _ in _window_lengths(list(rt.state.values()))]

    def restore(self, rt: Runtime) -> None:
        rt.iteration, rt.position = self.iteration, self.position
        rt.stats.clear()
        rt.stats.update(self.stats)
        rt.diagnostics.clear()
        rt.diagnostics.update(self.diagnostics)
        for name, saved in self.states.items():
            vars(rt.state[name]).update(saved)
        for w, steps in self.windows:
            w.steps[:] = steps

    def advance(self, rt: Runtime, before: _PythonState) -> None:
        """Make ``rt`` as this state, with its counters advanced from where they are by what
        separates this state from ``before`` (what the captured iteration did)."""
        counts = {name: st.count for name, st in rt.state.items()}
        stats = Counter(rt.stats)
        stats.update(self.stats - before.stats)
        iteration = rt.iteration + self.iteration - before.iteration
        self.restore(rt)
        rt.iteration, rt.stats = iteration, stats
        for name, st in rt.state.items():
            st.count = counts[name] + self.states[name]["count"] - before.states[name]["count"]


class _TensorState:
    """Copies of every tensor a step changes in place: parameters, buffers, optimizer state;
    and the optimizers' settings. ``restore`` writes them back into the same tensors."""

    def __init__(self, rt: Runtime) -> None:
        self.pairs = [(t, t.detach().clone()) for t in _live_tensors(rt)]
        self.groups = [(g, {k: v for k, v in g.items() if k != "params"})
                       for p in rt.problems.values() for g in p.optimizer.param_groups]
        self.rng = torch.get_rng_state()  # a replay draws dropout masks as the steps would
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self) -> None:
        with torch.no_grad():
            for t, saved in self.pairs:
                t.copy_(saved)
        for group, saved in self.groups:
            group.update(saved)
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)

    def values(self) -> list[torch.Tensor]:
        """Copies of the tensors as they are now."""
        return [t.detach().clone() for t, _ in self.pairs]

    def differs(self, values: list[torch.Tensor], tol: float) -> str | None:
        """Where the tensors now differ from ``values`` by more than ``tol`` (relative)."""
        for (t, _), other in zip(self.pairs, values):
            scale = float(other.abs().max()) if other.numel() and other.is_floating_point() else 1.0
            diff = float((t.detach().double() - other.double()).abs().max()) if t.numel() else 0.0
            if not diff <= tol * max(scale, 1.0):
                return f"a tensor of shape {tuple(t.shape)} differs by {diff:.3g}"
        return None


def _live_tensors(rt: Runtime) -> list[torch.Tensor]:
    found: dict[int, torch.Tensor] = {}
    for p in rt.problems.values():
        for t in [*p.module.parameters(), *p.module.buffers()]:
            found.setdefault(id(t), t)
        for state in p.optimizer.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    found.setdefault(id(v), v)
    return list(found.values())


def _settings(rt: Runtime) -> tuple:
    """What a graph holds fixed besides its tensors' contents: each optimizer's settings
    (numbers baked in), which tensors are θ and their memory (``module.to(...)`` moves it),
    and which state the optimizer holds (``load_state_dict`` replaces the state and the
    groups, so their identities change)."""
    return tuple((id(p.params), tuple(t.data_ptr() for t in p.params), id(p.optimizer.state),
                  id(p.optimizer.param_groups),
                  tuple(tuple((k, v) for k, v in g.items() if k != "params" and not isinstance(v, torch.Tensor))
                        for g in p.optimizer.param_groups))
                 for p in rt.problems.values())


# -- the captured iterations ------------------------------------------------------------------
class _Slot:
    """One captured iteration: the static batches it reads (one per draw, in order), its replay,
    and the Python state before and after it."""

    def __init__(self, draws: list[tuple[ProblemState, Any]]) -> None:
        self.draws = [(st, tree_map_only(torch.Tensor, lambda t: t.detach().clone(), b)) for st, b in draws]
        self.leaves = [tree_flatten(static) for _, static in self.draws]  # (leaves, structure) of each
        self.replay: Callable[[], None] = lambda: None
        self.before: _PythonState | None = None
        self.after: _PythonState | None = None
        self.checked = False

    def fits(self, batches: list[Any]) -> bool:
        for (a, spec_a), batch in zip(self.leaves, batches):
            b, spec_b = tree_flatten(batch)
            if spec_a != spec_b:
                return False
            for x, y in zip(a, b):
                if isinstance(x, torch.Tensor):
                    if not (isinstance(y, torch.Tensor) and x.shape == y.shape and x.dtype == y.dtype
                            and x.device == y.device):
                        return False
                elif not (type(x) is type(y) and x == y):
                    return False
        return True

    def load(self, batches: list[Any]) -> None:
        with torch.no_grad():
            for (a, _), batch in zip(self.leaves, batches):
                for x, y in zip(a, tree_flatten(batch)[0]):
                    if isinstance(x, torch.Tensor):
                        x.copy_(y, non_blocking=True)


class Graphs:
    """Captures and replays the iterations of a runtime's period (module docstring)."""

    TOLERANCE = 1e-4  # relative: a replay against the eager iteration it replaces

    def __init__(self, runtime: Runtime, backend: Any, off: str | None = None) -> None:
        self.rt = runtime
        self.backend = backend
        self.off = off                 # why graphs are off (None: on)
        self.slots: dict[int, _Slot] = {}
        schedule = runtime.plan.schedule
        self.start, self.period = len(schedule.prologue), len(schedule.period)
        # one whole period eagerly first (optimizer state made, modules compiled), and past warm-ups
        self.warm = max([self.start + self.period, *(p.options.warmup for p in runtime.problems.values())])
        self.replays = 0
        self.captures = 0  # graphs captured so far (again after what drops them)
        self.eager_until: int | None = None  # the iteration where an eager stretch of a period ends
        self._fixed: tuple | None = None  # _settings when the graphs were captured
        if off is None and getattr(backend, "name", "") == "cuda":
            _make_capturable(runtime)

    def describe(self) -> dict[str, Any]:
        """What ``program.cuda_graphs`` shows: the iterations of the period captured, the
        replays whose results were kept (a first, checked replay gives way to the eager run),
        and why graphs are off (None while they are on)."""
        return {"backend": self.backend.name, "captured": sorted(self.slots), "captures": self.captures,
                "replays": self.replays, "off": self.off}

    def reset(self) -> None:
        """Drop the graphs (a checkpoint was loaded, settings changed): captured again later."""
        self.slots.clear()
        self.eager_until = None

    def run_iteration(self) -> bool:
        """Run the runtime's next iteration from a graph, capturing it first if need be; False
        when it must run eagerly (the runtime then runs it step by step)."""
        rt = self.rt
        if self.off is not None:
            return False
        start, n = self.start, self.period
        if rt.iteration < self.warm:
            return False
        if self.eager_until is not None:
            if rt.iteration < self.eager_until:
                return False
            self.eager_until = None
        settings = _settings(rt)
        if settings != self._fixed:
            self.reset()
            self._fixed = settings
        j = (rt.iteration - start) % n
        slot = self.slots.get(j)
        if slot is None:
            if any(k not in self.slots for k in range(j)):  # captured in period order, from its start
                self.eager_until = rt.iteration + n - j
                return False
            self._capture(j)
            return True
        return self._replay(slot, n - j)

    # -- replay ------------------------------------------------------------------------
    def _replay(self, slot: _Slot, left: int) -> bool:
        rt = self.rt
        marks = {id(st): (st, st.batches.mark()) for st, _ in slot.draws}
        batches = [rt.draw(st) for st, _ in slot.draws]
        if not slot.fits(batches):  # not the captured shapes: this period goes on eagerly
            for st, mark in marks.values():
                st.batches.rewind(mark)
            self.eager_until = rt.iteration + left
            return False
        if not slot.checked:
            return self._check(slot, batches, marks)
        for st, _ in marks.values():
            st.batches.commit()
        self._play(slot, batches)
        self.replays += 1
        return True

    def _play(self, slot: _Slot, batches: list[Any]) -> None:
        slot.load(batches)
        slot.replay()
        slot.after.advance(self.rt, slot.before)

    def _check(self, slot: _Slot, batches: list[Any], marks: dict) -> bool:
        """The first replay of a slot, against the eager iteration from the same state."""
        rt = self.rt
        state, python = _TensorState(rt), _PythonState(rt)
        self._play(slot, batches)
        replayed = state.values()
        state.restore()
        python.restore(rt)
        for st, mark in marks.values():
            st.batches.rewind(mark)
        rt.run_steps()
        slot.checked = True
        where = state.differs(replayed, self.TOLERANCE)
        if where is not None:
            self._turn_off(f"a replayed iteration did not match the eager one ({where})")
        return True

    # -- capture -----------------------------------------------------------------------
    def _capture(self, j: int) -> None:
        """Run iteration ``j`` of the period eagerly under the probe (the iteration itself: its
        results are kept), then capture it again from copies of the batches it drew."""
        rt = self.rt
        draws: list[tuple[ProblemState, Any]] = []
        probe = _Probe(on_gpu=self.backend.name == "cuda")

        def record(st: ProblemState) -> Any:
            probe.paused = True  # drawing data (a sampler's randperm) is not part of the graph
            try:
                batch = type(rt).draw(rt, st)
            finally:
                probe.paused = False
            draws.append((st, batch))
            return batch

        compiled = _uncompile(rt)
        rt.draw = record
        try:
            with probe:
                self.backend.warm(rt.run_steps)
        finally:
            del rt.draw
            _recompile(compiled)
        if probe.found is not None:
            self._turn_off(probe.found)
            return
        slot = _Slot(draws)
        state, now = _TensorState(rt), _PythonState(rt)

        def static_draws() -> Callable[[ProblemState], Any]:
            statics = iter(slot.draws)

            def static(st: ProblemState) -> Any:
                owner, batch = next(statics)
                if owner is not st:
                    raise RuntimeError("the steps drew batches in another order than when probed")
                return batch
            return static

        def again(run: Callable[[Callable[[], None]], Any], base: _PythonState) -> Any:
            """The iteration once more, from ``base`` at this iteration's place in the schedule,
            on the static batches (not stopped by Ctrl-C: it is not a step of the run); then
            everything as the probed iteration left it."""
            base.restore(rt)
            rt.iteration = now.iteration - 1
            stop, rt.stop_requested = rt.stop_requested, None
            rt.draw = static_draws()
            try:
                before = _PythonState(rt)
                return before, run(rt.run_steps), _PythonState(rt)
            finally:
                del rt.draw
                rt.stop_requested = stop
                state.restore()  # what a warm run or an emulated capture ran (a CUDA capture runs nothing)
                now.restore(rt)

        try:
            if compiled:  # the compiled kernels too run once on the capture's stream first
                again(self.backend.warm, now)
            # the capture starts from the Python state the previous graph leaves (its tensors
            # are the ones this graph must read)
            slot.before, slot.replay, slot.after = again(self.backend.capture,
                                                          self.slots[j - 1].after if j else now)
        except Exception as e:  # noqa: BLE001 - whatever fails, the program goes on without graphs
            self._turn_off(f"capture failed ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]})")
            return
        self.slots[j] = slot
        self.captures += 1

    def _turn_off(self, why: str) -> None:
        self.off = why
        self.slots.clear()
        warnings.warn(errors.GRAPHS_OFF.format(why=why), errors.MlodslWarning, stacklevel=5)


def _uncompile(rt: Runtime) -> list[tuple[torch.nn.Module, Any]]:
    """The probe watches eager code (compiled kernels do not show their operations)."""
    held = []
    for p in rt.problems.values():
        impl = getattr(p.module, "_compiled_call_impl", None)
        if impl is not None:
            held.append((p.module, impl))
            p.module._compiled_call_impl = None
    return held


def _recompile(held: list[tuple[torch.nn.Module, Any]]) -> None:
    for module, impl in held:
        module._compiled_call_impl = impl


def _make_capturable(rt: Runtime) -> None:
    """Adam and AdamW update from a step count on the device (``capturable=True``)."""
    for p in rt.problems.values():
        if type(p.optimizer).__name__ not in _CAPTURABLE:
            continue
        p.optimizer._warned_capturable_if_run_uncaptured = True  # eager iterations are expected too
        for group in p.optimizer.param_groups:
            group["capturable"] = True
            for t in group["params"]:
                step = p.optimizer.state.get(t, {}).get("step")
                if isinstance(step, torch.Tensor) and step.device != t.device:
                    p.optimizer.state[t]["step"] = step.to(t.device)


__all__ = ["CudaGraphs", "Emulated", "Graphs", "HostSyncInCapture", "attach", "unsupported"]
