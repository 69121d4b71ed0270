"""Hypergradient methods (DESIGN §3): how gradients pass through a lower problem's solution.

``Neumann(iterations=K, alpha=None)``, ``CG(iterations=K, damping=0.0)``,
``FiniteDifference(eps=0.01)`` (the default), ``Unrolled()`` and ``FirstOrder()``;
also by name: ``"neumann"``, ``"cg"``, ``"fd"``/``"darts"``, ``"itd"``, ``"first_order"``.
"""

from mlodsl._hypergrad import CG, FiniteDifference, FirstOrder, HypergradMethod, Implicit, Neumann, Unrolled

__all__ = ["CG", "FiniteDifference", "FirstOrder", "HypergradMethod", "Implicit", "Neumann", "Unrolled"]
