"""Collect: from decorated problems to the compiler's torch-free :class:`ProblemSpec` s.

Reference inference reads each loss function's bytecode (DESIGN §2): the
global names it loads, its closure cells, the nested functions and lambdas it
defines, and the module-level helper functions of the same module that it
calls; every name that resolves to a :class:`Problem` is a reference. Nothing
is run and no data is touched. Torch-side checks live here too, since the
compiler must not import torch: the optimizer owns exactly the module's
trainable parameters and steps without a closure, no parameter is trained by
two problems, the scheduler drives the problem's own optimizer, the loss takes
a batch exactly when there is data, and the hypergradient method supports the
optimizer.
"""

from __future__ import annotations

import builtins
import dis
import inspect
import types
from collections.abc import Callable, Iterator, Sequence

import torch

from compiler import errors
from compiler.ir import ProblemSpec, Reference, SourceLoc
from mlodsl._hypergrad import Unrolled
from mlodsl._hypergrad import _unroll
from mlodsl._problem import Problem

_GLOBAL_OPS = {"LOAD_GLOBAL", "LOAD_NAME"}
_CELL_OPS = {"LOAD_DEREF", "LOAD_CLOSURE", "LOAD_CLASSDEREF", "LOAD_FROM_DICT_OR_DEREF"}


def collect(problems: Sequence[Problem]) -> tuple[list[ProblemSpec], dict[str, tuple[str, ...]]]:
    """Specs for the compiler, and for each problem the names its loss may call (itself included)."""
    check_distinct(problems)
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


def check_distinct(problems: Sequence[Problem]) -> None:
    """Each problem is passed once, and no trainable parameter belongs to two problems."""
    owner: dict[int, tuple[Problem, str]] = {}
    for i, p in enumerate(problems):
        if any(q is p for q in problems[:i]):
            raise errors.CompileError(errors.SAME_PROBLEM_TWICE.format(name=p.name, loc=p.loc))
        shared = [owner[id(t)] for _, t in p.named_params if id(t) in owner]
        if shared:
            first, param = shared[0]
            raise errors.CompileError(errors.SHARED_PARAMETER.format(
                name=first.name, loc=first.loc, other=p.name, other_loc=p.loc, param=param,
                count=len(shared)))
        owner.update({id(t): (p, n) for n, t in p.named_params})


def check_module(p: Problem) -> None:
    """The module has θ, the optimizer owns exactly θ, and the rest of the problem fits it."""
    check_optimizer(p)
    check_scheduler(p)
    check_signature(p)
    if isinstance(p.hypergrad, Unrolled) and not _unroll.supports(p.optimizer):
        raise errors.CompileError(errors.UNROLL_UNSUPPORTED.format(
            name=p.name, loc=p.loc, opt=type(p.optimizer).__name__))


def check_optimizer(p: Problem) -> None:
    params = p.params
    if not params:
        raise errors.CompileError(errors.NO_PARAMETERS.format(name=p.name, loc=p.loc))
    owned = {id(t) for t in params}
    in_opt = [t for g in p.optimizer.param_groups for t in g["params"]]
    foreign = [t for t in in_opt if id(t) not in owned and t.requires_grad]
    if foreign:
        raise errors.CompileError(errors.OPTIMIZER_FOREIGN_PARAMS.format(
            name=p.name, loc=p.loc, count=len(foreign), module=type(p.module).__name__,
            opt=type(p.optimizer).__name__))
    opt_ids = {id(t) for t in in_opt}
    missing = [n for n, t in p.named_params if id(t) not in opt_ids]
    if missing:
        raise errors.CompileError(errors.OPTIMIZER_MISSES_PARAMS.format(
            name=p.name, loc=p.loc, count=len(missing), example=missing[0]))
    if not _accepts(type(p.optimizer).step, 1):  # the class's step(self, ...): schedulers wrap the bound one
        raise errors.CompileError(errors.OPTIMIZER_NEEDS_CLOSURE.format(
            name=p.name, loc=p.loc, opt=type(p.optimizer).__name__))


def check_scheduler(p: Problem) -> None:
    s = p.scheduler
    if s is None:
        return
    fmt = dict(name=p.name, loc=p.loc, scheduler=type(s).__name__, opt=type(p.optimizer).__name__)
    opt = getattr(s, "optimizer", None)
    if isinstance(opt, torch.optim.Optimizer) and opt is not p.optimizer:
        raise errors.CompileError(errors.SCHEDULER_FOREIGN_OPTIMIZER.format(**fmt))
    step = getattr(s, "step", None)
    if not callable(step) or not _accepts(step, 0):
        signature = f"step{_signature(step)}" if callable(step) else "it has no step() method"
        raise errors.CompileError(errors.SCHEDULER_NEEDS_ARGUMENT.format(signature=signature, **fmt))


def check_signature(p: Problem) -> None:
    """The loss takes one argument (the batch) when the problem has data, none when it has not."""
    n = 0 if p.data is None else 1
    if _accepts(p.fn, n):
        return
    if n == 0:
        takes, data = "takes an argument", "data=None gives it none"
        fix = f"pass data=... to @problem on {p.name!r}, or remove the argument of the loss."
    else:
        takes, data = "takes no argument", f"data= gives it a batch ({type(p.data).__name__})"
        fix = f"add a parameter for the batch, `def {p.name}(batch): ...`, or pass data=None."
    raise errors.CompileError(errors.LOSS_SIGNATURE.format(
        name=p.name, loc=p.loc, takes=takes, data=data, fix=fix))


def _accepts(fn: Callable, n: int) -> bool:
    """Whether ``fn`` can be called with ``n`` positional arguments (True when unknowable)."""
    try:
        inspect.signature(fn).bind(*range(n))
    except TypeError:
        return False
    except ValueError:  # no signature (a builtin): trust it
        return True
    return True


def _signature(fn: Callable) -> str:
    try:
        return str(inspect.signature(fn))
    except (TypeError, ValueError):
        return "(...)"


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
