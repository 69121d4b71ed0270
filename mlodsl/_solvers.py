"""Solver diagnostics that act: a diverging Neumann series or a CG that did not reduce its
residual is reported (a warning naming the problem and the fix, or an error when strict).

The methods record their diagnostics as tensors (no device sync); they are read here
only on a problem's first hypergradient and on log iterations.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from compiler import errors

if TYPE_CHECKING:
    from mlodsl._runtime import Runtime

CG_TOLERANCE = 0.5  # relative residual above which CG "has not reduced its residual"


class SolverWarning(errors.MlodslWarning):
    """A hypergradient solver is unhealthy (diverging series, unconverged CG)."""


def check_solvers(runtime: Runtime, upper: str) -> None:
    """Check the diagnostics of every lower problem that ``upper``'s hypergradient visited."""
    if runtime.solver_policy == "off":
        return
    for visit in runtime.plan.hypergrad(upper).visits:
        q = runtime.problems[visit.problem]
        for message in _problems(runtime, visit.problem, q):
            if runtime.solver_policy == "raise":
                raise errors.ProblemError(message)
            if (visit.problem, message[:40]) not in runtime.warned_solvers:
                runtime.warned_solvers.add((visit.problem, message[:40]))
                warnings.warn(message, SolverWarning, stacklevel=2)


def _problems(runtime: Runtime, name: str, q) -> list[str]:
    diag = runtime.read_diagnostics(f"{name}/")
    found = []
    growth = diag.get(f"{name}/neumann_growth")
    if growth is not None and float(growth) > 1.0:
        found.append(errors.NEUMANN_DIVERGES.format(
            name=name, loc=q.loc, growth=float(growth), alpha=_alpha(q), half=_alpha(q) / 2))
    curvature = diag.get(f"{name}/cg_min_curvature")
    indefinite = curvature is not None and float(curvature) <= 0.0
    if indefinite:
        found.append(errors.CG_INDEFINITE.format(name=name, loc=q.loc, curvature=float(curvature)))
    residual = diag.get(f"{name}/cg_relative_residual")
    if residual is not None and not indefinite and not float(residual) <= CG_TOLERANCE:  # one cause, one warning
        found.append(errors.CG_UNCONVERGED.format(
            name=name, loc=q.loc, residual=float(residual), iterations=getattr(q.hypergrad, "iterations", "?")))
    return found


def _alpha(q) -> float:
    alpha = getattr(q.hypergrad, "alpha", None)
    return q.lr if alpha is None else alpha
