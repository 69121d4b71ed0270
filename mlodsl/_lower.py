"""The runtime's view of a lower problem Q, as hypergradient methods see it.

It evaluates C_Q on Q's last batch with the inputs x being differentiated
bound live and every other problem detached, builds ∇_θ C_Q once per
hypergradient (``grad_graph``) and reuses it for every Hessian-vector product,
and replays Q's last optimizer updates for ``Unrolled``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from torch.overrides import TorchFunctionMode

from compiler import errors
from mlodsl import _tree as T
from mlodsl._bindings import as_dict
from mlodsl._hypergrad import _unroll

if TYPE_CHECKING:
    from mlodsl._problem import Problem
    from mlodsl._runtime import Runtime


def vjp(outputs: T.Vec, inputs: T.Vec, cotangents: T.Vec, retain: bool) -> T.Vec:
    """Σ_i cotangent_iᵀ ∂output_i/∂inputs, skipping outputs that carry no graph."""
    pairs = [(o, c) for o, c in zip(outputs, cotangents) if o.requires_grad]
    if not pairs:
        return T.zeros_like(inputs)
    outs, cots = zip(*pairs)
    grads = torch.autograd.grad(outs, inputs, grad_outputs=cots, retain_graph=retain, allow_unused=True)
    return T.fill_none(grads, inputs)


class GradGraph:
    """g = ∇_θ C_Q(θ, x) with its graph, built once and reused by every product."""

    def __init__(self, lower: LowerView) -> None:
        self.lower = lower
        lower.runtime.count("grad_graph")
        params = lower.params
        loss = lower.loss(live=True)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        self.g = T.fill_none(grads, params)

    def hvp(self, v: T.Vec) -> T.Vec:
        self.lower.runtime.count("hvp")
        return self.lower.runtime.reduce(vjp(self.g, self.lower.params, v, retain=True), "product")

    def cross(self, p: T.Vec) -> list[T.Vec]:
        self.lower.runtime.count("mixed_vjp")
        flat = self.lower.flat_inputs
        return T.split(self.lower.runtime.reduce(vjp(self.g, flat, p, retain=False), "product"), self.lower.sizes)


class LowerView:
    """Q, its batch and the inputs x (problems) whose adjoints are wanted."""

    def __init__(self, runtime: Runtime, problem: Problem, inputs: list[Problem]) -> None:
        self.runtime = runtime
        self.problem = problem
        self.inputs = inputs
        self.name = problem.name
        self.params = problem.params
        self.lr = problem.lr
        self.flat_inputs = [t for q in inputs for t in q.params]
        self.sizes = [len(q.params) for q in inputs]

    def loss(self, live: bool, theta: T.Vec | None = None, batch: object = None) -> torch.Tensor:
        override = {self.problem: as_dict(self.problem, theta)} if theta is not None else {}
        live_set = set(self.inputs) | ({self.problem} if live and theta is None else set())
        if batch is None:
            batch = self.runtime.state[self.name].current_batch()
        return self.runtime.evaluate(self.problem, batch, live=live_set, override=override)

    def grad_graph(self) -> GradGraph:
        return GradGraph(self)

    def detached_values(self, probe: bool = False) -> list[torch.Tensor] | None:
        """What the loss of Q detaches when evaluated at θ, in call order (for ``FiniteDifference``
        holding them). With ``probe``, None once a first evaluation found that it detaches nothing
        (so such a loss is evaluated once more only at its first hypergradient)."""
        st = self.runtime.state[self.name]
        if probe and st.detaches is False:
            return None
        self.runtime.count("held_eval")
        mode = _HeldDetach(self.problem)
        with torch.no_grad(), mode:
            self.loss(live=False)
        if probe:
            st.detaches = bool(mode.values)
            return mode.values or None
        return mode.values

    def input_grads(self, thetas: list[T.Vec], held: list[torch.Tensor] | None = None) -> list[list[T.Vec]]:
        """∇_x C_Q(θ', x) for each θ' in ``thetas``. Each θ' is copied into Q's parameters for its
        evaluation and θ is put back exactly afterwards, once (as DARTS' code does): cheaper than
        re-parametrizing the module, and safe here, as no live graph holds θ_Q while a method
        runs. With ``held`` (:meth:`detached_values`), the loss's ``.detach()`` calls return those
        values."""
        params = self.params
        with torch.no_grad():
            saved = [t.detach().clone() for t in params]
        try:
            return [self._input_grads_here(theta, held) for theta in thetas]
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, saved)

    def _input_grads_here(self, theta: T.Vec, held: list[torch.Tensor] | None) -> list[T.Vec]:
        self.runtime.count("grad_eval")
        with torch.no_grad():
            torch._foreach_copy_(self.params, theta)
        if held is None:
            loss = self.loss(live=False)
        else:
            mode = _HeldDetach(self.problem, held)
            with mode:
                loss = self.loss(live=False)
            mode.check_all_used()
        if not loss.requires_grad:
            return self.zeros_for_inputs()
        grads = torch.autograd.grad(loss, self.flat_inputs, allow_unused=True)
        return T.split(self.runtime.reduce(T.fill_none(grads, self.flat_inputs), "product"), self.sizes)

    def zeros_for_inputs(self) -> list[T.Vec]:
        return [T.zeros_like(q.params) for q in self.inputs]

    def record(self, key: str, value: torch.Tensor | float) -> None:
        self.runtime.diagnostics[f"{self.name}/{key}"] = value

    def unrolled_vjp(self, v: T.Vec) -> list[T.Vec]:
        window = self.runtime.state[self.name].window
        if window is None or not window.steps:
            return self.zeros_for_inputs()
        kind = type(self.problem.optimizer)
        theta = [t.clone().requires_grad_(True) for t in window.theta]
        states = window.states
        for batches, hps in window.steps:
            self.runtime.count("unrolled_update")
            loss = self.loss(live=False, theta=theta, batch=batches[0])
            if len(batches) > 1:  # grad_accumulation: the mean over the step's batches
                loss = sum((self.loss(live=False, theta=theta, batch=b) for b in batches[1:]), loss) / len(batches)
            grads = T.fill_none(torch.autograd.grad(loss, theta, create_graph=True, allow_unused=True), theta)
            grads = self.runtime.reduce(grads, "replay")  # the combined batch's g_t, differentiably
            theta, states = _unroll.update_all(kind, theta, grads, states, hps)
        # how far the replay lands from Q's θ: a thunk, computed only when the diagnostic is read
        # (first step, log iterations: Q has not stepped since, as lowers step before their uppers)
        replayed, params = [t.detach() for t in theta], self.params
        self.record("unroll_replay_error", lambda: _max_gap(replayed, params))
        return T.split(self.runtime.reduce(vjp(theta, self.flat_inputs, v, retain=False), "product"), self.sizes)


def _max_gap(a: T.Vec, b: T.Vec) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([(x - y).abs().max() for x, y in zip(a, b)]).max()


class _HeldDetach(TorchFunctionMode):
    """Records what ``Tensor.detach`` returns during one evaluation, or (given ``held``) returns
    the recorded values again, call by call, so that a perturbed evaluation sees the detached
    values of the unperturbed one."""

    _DETACH = (torch.Tensor.detach, torch.detach)

    def __init__(self, problem: Problem, held: list[torch.Tensor] | None = None) -> None:
        super().__init__()
        self.problem = problem
        self.replay = held is not None
        self.values: list[torch.Tensor] = [] if held is None else held
        self.used = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func not in self._DETACH:
            return out
        if not self.replay:
            self.values.append(out)
            return out
        if self.used >= len(self.values) or self.values[self.used].shape != out.shape:
            self._mismatch(f"at least {_times(self.used + 1)}" if self.used >= len(self.values)
                           else f"on a tensor of shape {tuple(out.shape)} (call {self.used + 1})")
        held = self.values[self.used]
        self.used += 1
        return held

    def check_all_used(self) -> None:
        if self.used != len(self.values):
            self._mismatch(_times(self.used))

    def _mismatch(self, got: str) -> None:
        expected = _times(len(self.values))
        if got.startswith("on a tensor"):
            expected = f"on shape {tuple(self.values[self.used].shape)}"
        raise errors.ProblemError(errors.HELD_DETACH_MISMATCH.format(
            name=self.problem.name, loc=self.problem.loc, got=got, expected=expected))


def _times(n: int) -> str:
    return {0: "no times", 1: "once", 2: "twice"}.get(n, f"{n} times")
