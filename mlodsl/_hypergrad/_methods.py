"""The five hypergradient methods of DESIGN §3.

For a lower problem Q with loss C_Q(θ_Q, x), Hessian H = ∂²C_Q/∂θ_Q², adjoint
v over θ_Q and inputs x of C_Q, each method returns (∂θ*_Q/∂x)ᵀ v.
Neumann and CG are one implicit method with two linear solvers; finite
differences, unrolling and first order are the others.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Protocol, runtime_checkable

import torch
from attrs import field, frozen

from compiler.errors import UsageError

from mlodsl import _tree as T
from mlodsl._hypergrad import _linsolve


class GradGraph(Protocol):
    """g = ∇_θ C_Q(θ, x), built once with ``create_graph=True`` and reused."""

    def hvp(self, v: T.Vec) -> T.Vec: ...              # H v
    def cross(self, p: T.Vec) -> list[T.Vec]: ...      # (∂²C_Q/∂x∂θ_Q) p, per input x


class Lower(Protocol):
    """What a method may ask of the lower problem Q (see ``mlodsl._lower``)."""

    name: str
    params: T.Vec
    lr: float

    def grad_graph(self) -> GradGraph: ...
    def input_grads(self, thetas: list[T.Vec], held: list[torch.Tensor] | None = None
                    ) -> list[list[T.Vec]]: ...  # ∇_x C_Q(θ', x) for each θ'; θ put back
    def detached_values(self, probe: bool = False) -> list[torch.Tensor] | None: ...  # what C_Q(θ, x) detaches
    def unrolled_vjp(self, v: T.Vec) -> list[T.Vec]: ...      # (∂θ_T/∂x)ᵀ v through the last updates
    def record(self, key: str, value: torch.Tensor | float) -> None: ...
    def zeros_for_inputs(self) -> list[T.Vec]: ...


@runtime_checkable
class HypergradMethod(Protocol):
    """One interface: ``method(lower, v) -> [(∂θ*_Q/∂x)ᵀ v for each input x]``."""

    name: ClassVar[str]

    def __call__(self, lower: Lower, v: T.Vec) -> list[T.Vec]: ...


def _check(expected: str, ok: Callable[[object], bool]) -> Callable:
    """An attrs validator that raises a UsageError naming the method, the field and the fix."""
    def validate(instance: object, attribute: object, value: object) -> None:
        if not ok(value):
            name = getattr(attribute, "name", "?")
            raise UsageError(f"{type(instance).__name__}({name}={value!r}): {name} must be {expected}. "
                             f"Fix: pass {name} as {expected}, or leave it out for the default.")
    return validate


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_positive_int = _check("an int >= 0", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0)


@frozen
class Implicit:
    """Implicit differentiation: −(∂²C_Q/∂x∂θ_Q) p with p = solve(H, v).

    The one primitive that ``Neumann`` and ``CG`` are derived from: they only
    choose the linear solver. The gradient graph of C_Q is built once and
    reused for every Hessian-vector product and the final mixed product.
    """

    solve: Callable[[Lower, _linsolve.HVP, T.Vec], tuple[T.Vec, dict]]
    name: ClassVar[str] = "implicit"

    def __call__(self, lower: Lower, v: T.Vec) -> list[T.Vec]:
        graph = lower.grad_graph()
        p, diagnostics = self.solve(lower, graph.hvp, v)
        for key, value in diagnostics.items():
            lower.record(key, value)
        return [T.scale(c, -1.0) for c in graph.cross(p)]


@frozen
class Neumann:
    """−(∂²C_Q/∂x∂θ_Q) p,  p = α Σ_{i=0..K} (I − αH)^i v  (K = ``iterations`` HVPs).

    ``alpha`` defaults to Q's learning rate. It approximates the implicit
    hypergradient when ‖I − αH‖ < 1.
    """

    iterations: int = field(default=3, validator=_positive_int)
    alpha: float | None = field(default=None, validator=_check(
        "None (the learning rate) or a number > 0", lambda v: v is None or (_is_number(v) and v > 0)))
    name: ClassVar[str] = "neumann"

    def __call__(self, lower: Lower, v: T.Vec) -> list[T.Vec]:
        alpha = lower.lr if self.alpha is None else self.alpha
        return Implicit(lambda _, hvp, b: _linsolve.neumann(hvp, b, self.iterations, alpha))(lower, v)


@frozen
class CG:
    """−(∂²C_Q/∂x∂θ_Q) p,  p ≈ (H + damping·I)⁻¹ v from K conjugate-gradient steps from 0.

    With K ≥ dim θ_Q and a converged Q this is the exact implicit hypergradient.
    """

    iterations: int = field(default=10, validator=_positive_int)
    damping: float = field(default=0.0, validator=_check("a number >= 0", lambda v: _is_number(v) and v >= 0))
    name: ClassVar[str] = "cg"

    def __call__(self, lower: Lower, v: T.Vec) -> list[T.Vec]:
        def solve(_: Lower, hvp: _linsolve.HVP, b: T.Vec) -> tuple[T.Vec, dict]:
            return _linsolve.conjugate_gradient(hvp, b, self.iterations, self.damping)

        return Implicit(solve)(lower, v)


@frozen(repr=False)
class FiniteDifference:
    """DARTS: −α (∇_x C_Q(θ + εv) − ∇_x C_Q(θ − εv)) / (2ε),  ε = eps/‖v‖,  α = Q's lr.

    Two gradient evaluations and no Hessian-vector product; the one-step
    unrolled approximation of the best-response Jacobian.

    A ``.detach()`` in C_Q means "a constant at θ" to autograd, so the mixed derivative
    this formula approximates holds detached values fixed. Evaluating the loss at θ ± εv
    would move them too (a weight net reading ``losses.detach()`` would be differentiated
    through its own input), so FD gives each ``.detach()`` of the two perturbed
    evaluations the value it has at θ, recorded by one more evaluation at θ without a
    graph. Then FD and ``Neumann(iterations=0)`` compute the same −α (∂²C_Q/∂x∂θ_Q) v.

    ``hold_detached``: ``"auto"`` (the default) probes Q's loss at its first hypergradient
    and holds only if the loss detaches something (a loss that detaches nothing costs that
    one probe, once); ``True`` always holds; ``False`` is the plain formula with every
    value re-evaluated at θ ± εv (what DARTS' and Betty's code compute).
    """

    eps: float = field(default=0.01, validator=_check("a number > 0", lambda v: _is_number(v) and v > 0))
    hold_detached: bool | str = field(default="auto", validator=_check(
        '"auto", True or False', lambda v: isinstance(v, bool) or v == "auto"))
    name: ClassVar[str] = "fd"

    def __repr__(self) -> str:
        hold = "" if self.hold_detached == "auto" else f", hold_detached={self.hold_detached!r}"
        return f"FiniteDifference(eps={self.eps!r}{hold})"

    def __call__(self, lower: Lower, v: T.Vec) -> list[T.Vec]:
        # ε as a tensor: no host sync. v = 0 gives θ ± 0 and a zero difference, so a zero result.
        eps = T.norm(v).clamp_min(torch.finfo(v[0].dtype).tiny).reciprocal().mul_(self.eps)
        lower.record("fd_epsilon", eps)
        with torch.no_grad():
            step = T.scale(v, eps)
            plus, minus = T.add(lower.params, step), T.add(lower.params, step, -1.0)
        held = lower.detached_values(probe=self.hold_detached == "auto") if self.hold_detached else None
        g_plus, g_minus = lower.input_grads([plus, minus], held)
        coef = eps.reciprocal().mul_(-0.5 * lower.lr)  # −α / 2ε
        return [T.scale(T.add(a, b, -1.0), coef) for a, b in zip(g_plus, g_minus)]


@frozen
class Unrolled:
    """Iterative differentiation: reverse mode through Q's last ``steps`` optimizer updates.

    The updates are replayed differentiably from a snapshot taken when they
    began (SGD with momentum, dampening, Nesterov and weight decay; Adam and
    AdamW), so lower steps themselves never build graphs for upper parameters.
    """

    name: ClassVar[str] = "itd"

    def __call__(self, lower: Lower, v: T.Vec) -> list[T.Vec]:
        return lower.unrolled_vjp(v)


@frozen
class FirstOrder:
    """Zero: only direct gradients reach the upper problem (paths through Q are cut)."""

    name: ClassVar[str] = "first_order"

    def __call__(self, lower: Lower, v: T.Vec) -> list[T.Vec]:
        return lower.zeros_for_inputs()


REGISTRY: dict[str, type] = {
    "neumann": Neumann, "cg": CG, "fd": FiniteDifference, "darts": FiniteDifference,
    "finite_difference": FiniteDifference, "itd": Unrolled, "unrolled": Unrolled,
    "first_order": FirstOrder,
}
