"""mlodsl: multilevel optimization as a few decorated loss functions.

    @problem(module=..., optimizer=..., data=..., upper=[...], hypergrad=..., steps=...)
    def loss(batch): ...

    program = Program([...])   # infers the graph, checks it, emits the plan
    program.run(iterations=N)

See DESIGN.md for the contract.
"""

from compiler.errors import CompileError, MlodslError, ProblemError, UsageError
from mlodsl import hypergrad
from mlodsl._problem import Problem, problem
from mlodsl._program import Program

__all__ = ["CompileError", "MlodslError", "Problem", "ProblemError", "Program", "UsageError",
           "hypergrad", "problem"]
__version__ = "0.1.0"
