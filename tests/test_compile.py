"""compile=True: the same numbers through torch.compile'd modules, and a clean fallback."""

from __future__ import annotations

import pytest
import torch

from compiler.errors import MlodslWarning
from mlodsl.hypergrad import Neumann
from tests.test_training import flat, program_under_test


def test_compiled_modules_give_the_numbers_of_eager_ones():
    eager = program_under_test(method=Neumann(iterations=2))
    eager.run(iterations=4, progress=False)
    compiled = program_under_test(method=Neumann(iterations=2))
    from mlodsl import _compile
    _compile.apply(compiled.problems, {"backend": "aot_eager"})
    compiled._runtime.compiled = True
    compiled.run(iterations=4, progress=False)
    assert compiled._runtime.compiled  # no fallback was needed
    assert torch.allclose(flat(eager), flat(compiled), rtol=1e-10, atol=1e-12)


def test_a_compile_failure_falls_back_to_eager_with_a_warning():
    """A dynamo/backend error (raised here while the program is compiled, as a backend without a
    code generator would) rolls the step back, turns compilation off, and the step is retried."""
    from torch._dynamo.exc import TorchDynamoException

    eager = program_under_test()
    eager.run(iterations=3, progress=False)
    program = program_under_test()
    program._runtime.compiled = True
    inner = program["inner"].fn

    def sometimes_uncompilable(batch):
        if program._runtime.compiled:
            raise TorchDynamoException("no code generator here")
        return inner(batch)

    program["inner"].fn = sometimes_uncompilable
    with pytest.warns(MlodslWarning, match="torch.compile failed .* no code generator here"):
        program.run(iterations=3, progress=False)
    assert not program._runtime.compiled
    assert torch.equal(flat(eager), flat(program))  # the failed step was rolled back and retried


def test_program_accepts_compile_options():
    from tests.test_training import program_under_test as build
    program = build()
    from mlodsl import Program
    again = Program(list(program.problems), compile={"backend": "aot_eager"})
    assert again._runtime.compiled
