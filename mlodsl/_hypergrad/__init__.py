"""Hypergradient methods: small values with one interface, registered by name.

A method is called as ``method(lower, v)`` where ``lower`` is the runtime's
view of a lower problem Q (its parameters θ_Q, loss C_Q on its last batch, and
the inputs x of C_Q being differentiated) and ``v`` the adjoint over θ_Q. It
returns ``(∂θ*_Q/∂x)ᵀ v`` for each input x, as a list of tensor lists.
"""

from __future__ import annotations

import difflib

from mlodsl._hypergrad._methods import (CG, REGISTRY, FiniteDifference, FirstOrder, HypergradMethod,
                                        Implicit, Neumann, Unrolled)


class UnknownMethod(ValueError):
    def __init__(self, name: str) -> None:
        close = difflib.get_close_matches(name, sorted(REGISTRY), n=1, cutoff=0.5)
        self.name = name
        self.suggestion = close[0] if close else None
        super().__init__(name)


def resolve_method(spec: HypergradMethod | str | None) -> HypergradMethod:
    """``None`` → the default ``FiniteDifference()``; a name → its registered method."""
    if spec is None:
        return FiniteDifference()
    if isinstance(spec, str):
        key = spec.strip().lower().replace("-", "_")
        if key not in REGISTRY:
            raise UnknownMethod(spec)
        return REGISTRY[key]()
    return spec


__all__ = ["CG", "FiniteDifference", "FirstOrder", "HypergradMethod", "Implicit", "Neumann",
           "REGISTRY", "Unrolled", "UnknownMethod", "resolve_method"]
