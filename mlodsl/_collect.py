"""Collect: from decorated problems to the compiler's torch-free :class:`ProblemSpec` s.

Reference inference reads each loss function's bytecode (DESIGN §2): the
global names it loads, its closure cells, the nested functions and lambdas it
defines, and the module-level helper functions of the same module that it
calls; every name that resolves to a :class:`Problem` is a reference. Nothing
is run and no data is touched. Torch-side checks (the optimizer owns the
module's parameters, the hypergradient method supports the optimizer) live
here too, since the compiler must not import torch.
"""

from __future__ import annotations

import builtins
import dis
import types
from collections.abc import Iterator, Sequence

from compiler import errors
from compiler.ir import ProblemSpec, Reference, SourceLoc
from mlodsl._hypergrad import Unrolled
from mlodsl._hypergrad import _unroll
from mlodsl._problem import Problem

_GLOBAL_OPS = {"LOAD_GLOBAL", "LOAD_NAME"}
_CELL_OPS = {"LOAD_DEREF", "LOAD_CLOSURE", "LOAD_CLASSDEREF", "LOAD_FROM_DICT_OR_DEREF"}

OPTIMIZER_FOREIGN_PARAMS = (
    "the optimizer of {name!r} ({loc}) updates {count} tensor(s) that are not parameters of its "
    "module ({module}).\n"
    "Rule: a problem's optimizer is built on its own module's parameters, and only those.\n"
    "Fix: build it as `{opt}({name}_module.parameters(), ...)` on the module passed as module=."
)

OPTIMIZER_MISSES_PARAMS = (
    "the optimizer of {name!r} ({loc}) does not update {count} trainable parameter(s) of its "
    "module, e.g. {example!r}.\n"
    "Rule: every trainable parameter (requires_grad=True) of the module belongs to the optimizer.\n"
    "Fix: build the optimizer on module.parameters(), or freeze those parameters with "
    "requires_grad_(False)."
)

NO_PARAMETERS = (
    "the module of {name!r} ({loc}) has no trainable parameters.\n"
    "Rule: a problem optimizes θ, the trainable parameters of its module.\n"
    "Fix: pass the module that holds θ as module=, or unfreeze its parameters."
)

UNROLL_UNSUPPORTED = (
    "problem {name!r} ({loc}) uses hypergrad=Unrolled() with optimizer {opt}, which mlodsl "
    "cannot differentiate through.\n"
    "Rule: Unrolled() replays SGD, Adam or AdamW updates.\n"
    "Fix: use one of those optimizers, or another method such as Neumann() or CG()."
)



def collect(problems: Sequence[Problem]) -> tuple[list[ProblemSpec], dict[str, tuple[str, ...]]]:
    """Specs for the compiler, and for each problem the names its loss may call (itself included)."""
    specs = [spec_of(p) for p in problems]
    reach = {s.name: tuple(dict.fromkeys([s.name, *(r.target for r in s.references)])) for s in specs}
    return specs, reach


def spec_of(p: Problem) -> ProblemSpec:
    check_module(p)
    refs = tuple(r for r in references(p) if r.target != p.name)
    info = (("module", type(p.module).__name__),
            ("params", str(sum(t.numel() for t in p.params))),
            ("optimizer", f"{type(p.optimizer).__name__}(lr={p.lr:g})"))
    return ProblemSpec(name=p.name, loc=p.loc, upper=tuple(_name(u) for u in p.upper),
                       references=refs, steps=p.steps, method=p.hypergrad.name,
                       method_repr=repr(p.hypergrad), info=info)


def _name(ref: Problem | str) -> str:
    return ref if isinstance(ref, str) else ref.name


def check_module(p: Problem) -> None:
    params = p.params
    if not params:
        raise errors.CompileError(NO_PARAMETERS.format(name=p.name, loc=p.loc))
    owned = {id(t) for t in params}
    in_opt = [t for g in p.optimizer.param_groups for t in g["params"]]
    foreign = [t for t in in_opt if id(t) not in owned and t.requires_grad]
    if foreign:
        raise errors.CompileError(OPTIMIZER_FOREIGN_PARAMS.format(
            name=p.name, loc=p.loc, count=len(foreign), module=type(p.module).__name__,
            opt=type(p.optimizer).__name__))
    opt_ids = {id(t) for t in in_opt}
    missing = [n for n, t in p.named_params if id(t) not in opt_ids]
    if missing:
        raise errors.CompileError(OPTIMIZER_MISSES_PARAMS.format(
            name=p.name, loc=p.loc, count=len(missing), example=missing[0]))
    if isinstance(p.hypergrad, Unrolled) and not _unroll.supports(p.optimizer):
        raise errors.CompileError(UNROLL_UNSUPPORTED.format(
            name=p.name, loc=p.loc, opt=type(p.optimizer).__name__))


def references(p: Problem) -> list[Reference]:
    """Problems the loss of ``p`` reads: found in its code, then declared with ``uses=``."""
    found: dict[str, Reference] = {}
    for name, value, line in _loaded_values(p.fn, set()):
        if isinstance(value, Problem) and value.name not in found:
            found[value.name] = Reference(target=value.name, loc=SourceLoc(p.loc.file, line))
    for u in p.uses:
        n = _name(u)
        found.setdefault(n, Reference(target=n, loc=p.loc, declared=True))
    return list(found.values())


def _loaded_values(fn: types.FunctionType, seen: set[int]) -> Iterator[tuple[str, object, int]]:
    """(name, value, line) for every global or closure value the function's code loads."""
    if id(fn) in seen or not isinstance(fn, types.FunctionType):
        return
    seen.add(id(fn))
    cells = dict(zip(fn.__code__.co_freevars, fn.__closure__ or ()))
    for code in _code_objects(fn.__code__):
        line = code.co_firstlineno
        for ins in dis.get_instructions(code):
            line = _line(ins, line)
            value = _resolve(fn, ins, cells)
            if value is _MISSING:
                continue
            yield ins.argval, value, line
            if isinstance(value, types.FunctionType) and value.__module__ == fn.__module__:
                yield from _loaded_values(value, seen)  # a helper of the same module


_MISSING = object()


def _resolve(fn: types.FunctionType, ins: dis.Instruction, cells: dict) -> object:
    name = ins.argval
    if ins.opname in _GLOBAL_OPS and isinstance(name, str):
        if name in fn.__globals__:
            return fn.__globals__[name]
        return getattr(builtins, name, _MISSING)
    if ins.opname in _CELL_OPS and name in cells:
        try:
            return cells[name].cell_contents
        except ValueError:  # an empty cell: assigned later
            return _MISSING
    return _MISSING


def _line(ins: dis.Instruction, previous: int) -> int:
    pos = getattr(ins, "positions", None)
    if pos is not None and pos.lineno is not None:
        return pos.lineno
    return previous


def _code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)
