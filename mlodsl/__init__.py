"""mlodsl: multilevel optimization as a few decorated loss functions.

    @problem(module=..., optimizer=..., data=..., upper=[...], hypergrad=..., steps=...)
    def loss(batch): ...

    program = Program([...])   # infers the graph, checks it, emits the plan
    program.run(iterations=N)

See DESIGN.md for the contract.
"""

from compiler.errors import CompileError, MlodslError, MlodslWarning, ProblemError, UsageError
from mlodsl import hypergrad, loggers
from mlodsl._checkpoint import CheckpointError
from mlodsl._loop import EarlyStopping, History
from mlodsl._problem import Problem, problem
from mlodsl._program import Program
from mlodsl._solvers import SolverWarning

__all__ = ["CheckpointError", "CompileError", "EarlyStopping", "History", "MlodslError", "MlodslWarning",
           "Problem", "ProblemError", "Program", "SolverWarning", "UsageError", "hypergrad", "loggers",
           "problem"]
__version__ = "0.1.0"
