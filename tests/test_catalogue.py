"""The catalogue of user mistakes: each a tiny program, the error it gets and its message.

One table, :data:`CATALOGUE`. Every case makes one mistake through the public
API (a decorator, ``Program(...)`` or ``program.run(...)``) and expects

- the error class (or warning class) and nothing else: never a bare torch or
  Python exception;
- a message built from its text constant in ``compiler/errors.py`` (matched
  field by field), that names the user's function with ``file:line`` of this
  file and says the fix (``Fix:``);
- the case's own regex, which pins the details (names, values, the fix).

The last tests check that every text constant has a case here and count them.
"""

from __future__ import annotations

import re
import string
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch
from torch import nn

from compiler import errors
from mlodsl import CompileError, MlodslWarning, ProblemError, Program, problem
from mlodsl.hypergrad import FiniteDifference, Unrolled

HERE = r"\S*test_catalogue\.py:\d+"
X = torch.ones(4, 2)


class Case(NamedTuple):
    id: str
    build: Callable[[], Any]     # makes the mistake; returns a Program to run, or raises itself
    error: type                  # an MlodslError or an MlodslWarning subclass
    text: str                    # the constant in compiler/errors.py the message comes from
    pattern: str                 # the details, as a regex
    iterations: int = 3


def lin(n: int = 2, lr: float = 0.1) -> tuple[nn.Module, torch.optim.Optimizer]:
    m = nn.Linear(n, 1)
    return m, torch.optim.SGD(m.parameters(), lr=lr)


def bilevel(**low_kw: Any) -> Program:
    """A correct bilevel program; ``low_kw`` overrides the lower problem's @problem arguments."""
    (mu, ou), (ml, ol) = lin(), lin()

    @problem(module=mu, optimizer=ou)
    def up():
        return (low(X) - 1).pow(2).mean()

    kw = dict(module=ml, optimizer=ol, upper=[up], hypergrad="neumann")
    kw.update(low_kw)

    @problem(**kw)
    def low():
        return (low(X) - up(X)).pow(2).mean()

    return Program([up, low])


def single(loss: Callable[..., Any], data: Any = None, nan_policy: str = "raise", **kw: Any) -> Program:
    """One problem named ``p`` whose loss is ``loss(p, batch)``."""
    m, o = kw.pop("module_optimizer", None) or lin()

    @problem(module=m, optimizer=o, data=data, **kw)
    def p(*batch):
        return loss(p, *batch)

    return Program([p], nan_policy=nan_policy)


# -- compile time ----------------------------------------------------------------------
def upper_cycle():
    (m1, o1), (m2, o2) = lin(), lin()

    @problem(module=m1, optimizer=o1, upper=["b"])
    def a():
        return (a(X) * b(X)).sum()

    @problem(module=m2, optimizer=o2, upper=[a])
    def b():
        return (b(X) * a(X)).sum()

    return Program([a, b])


def self_upper():
    m, o = lin()

    @problem(module=m, optimizer=o, upper=["me"])
    def me():
        return me(X).sum()

    return Program([me])


def unknown_upper():
    (m1, o1), (m2, o2) = lin(), lin()

    @problem(module=m1, optimizer=o1)
    def classifier():
        return classifier(X).sum()

    @problem(module=m2, optimizer=o2, upper=["clasifier"])
    def weights():
        return weights(X).sum()

    return Program([classifier, weights])


def duplicate_upper():
    (m1, o1), (m2, o2) = lin(), lin()

    @problem(module=m1, optimizer=o1)
    def meta():
        return base(X).sum()

    @problem(module=m2, optimizer=o2, upper=[meta, "meta"])
    def base():
        return (base(X) * meta(X)).sum()

    return Program([meta, base])


def unrelated_reference():
    (m1, o1), (m2, o2) = lin(), lin()

    @problem(module=m1, optimizer=o1)
    def teacher():
        return teacher(X).pow(2).sum()

    @problem(module=m2, optimizer=o2)
    def student():
        return (student(X) - teacher(X)).pow(2).sum()

    return Program([teacher, student])


def unknown_reference():
    (m1, o1), (m2, o2) = lin(), lin()

    @problem(module=m1, optimizer=o1)
    def forgotten():
        return forgotten(X).sum()

    @problem(module=m2, optimizer=o2)
    def main():
        return (main(X) * forgotten(X)).sum()

    return Program([main])


def duplicate_name():
    (m1, o1), (m2, o2) = lin(), lin()
    first = problem(module=m1, optimizer=o1, name="model")(lambda: first(X).sum())
    second = problem(module=m2, optimizer=o2, name="model")(lambda: second(X).sum())
    return Program([first, second])


def same_problem_twice():
    m, o = lin()

    @problem(module=m, optimizer=o)
    def twice():
        return twice(X).sum()

    return Program([twice, twice])


def zero_steps():
    return bilevel(steps=0)


def schedule_too_long():
    (m1, o1), (m2, o2), (m3, o3) = lin(), lin(), lin()

    @problem(module=m1, optimizer=o1)
    def top():
        return mid(X).sum()

    @problem(module=m2, optimizer=o2, upper=[top], steps=400)
    def mid():
        return (mid(X) * bottom(X) * top(X)).sum()

    @problem(module=m3, optimizer=o3, upper=[mid], steps=400)
    def bottom():
        return (bottom(X) * mid(X)).sum()

    return Program([top, mid, bottom])


def unknown_method():
    return bilevel(hypergrad="nueman")


def optimizer_foreign_params():
    m, other = nn.Linear(2, 1), nn.Linear(2, 1)
    return single(lambda p: p(X).sum(), module_optimizer=(m, torch.optim.SGD(other.parameters(), lr=0.1)))


def optimizer_misses_params():
    m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    return single(lambda p: p(X).sum(), module_optimizer=(m, torch.optim.SGD(m[0].parameters(), lr=0.1)))


def optimizer_needs_closure():
    m = nn.Linear(2, 1)
    return single(lambda p: p(X).sum(), module_optimizer=(m, torch.optim.LBFGS(m.parameters())))


def no_parameters():
    m = nn.Linear(2, 1).requires_grad_(False)
    return single(lambda p: p(X).sum(), module_optimizer=(m, torch.optim.SGD(m.parameters(), lr=0.1)))


def unroll_unsupported():
    m = nn.Linear(2, 1)
    return bilevel(module=m, optimizer=torch.optim.RMSprop(m.parameters()), hypergrad=Unrolled())


def shared_parameter():
    m = nn.Linear(2, 1)

    @problem(module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1))
    def outer():
        return inner(X).sum()

    @problem(module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1), upper=[outer])
    def inner():
        return (inner(X) * outer(X)).sum()

    return Program([outer, inner])


def scheduler_foreign_optimizer():
    m, o = lin()
    other = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)
    return single(lambda p: p(X).sum(), module_optimizer=(m, o),
                  scheduler=torch.optim.lr_scheduler.StepLR(other, step_size=10))


def scheduler_needs_argument():
    m, o = lin()
    return single(lambda p: p(X).sum(), module_optimizer=(m, o),
                  scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau(o))


def loss_takes_a_batch_without_data():
    m, o = lin()

    @problem(module=m, optimizer=o)
    def wants_batch(batch):
        return wants_batch(batch).sum()

    return Program([wants_batch])


def loss_takes_no_batch_with_data():
    m, o = lin()

    @problem(module=m, optimizer=o, data=[X])
    def no_batch():
        return no_batch(X).sum()

    return Program([no_batch])


def bad_option():
    return bilevel(grad_accumulation=0)


def no_dataflow():
    (m1, o1), (m2, o2) = lin(), lin()

    @problem(module=m1, optimizer=o1)
    def boss():
        return boss(X).pow(2).sum()

    @problem(module=m2, optimizer=o2, upper=[boss])
    def worker():
        return worker(X).pow(2).sum()

    return Program([boss, worker])


# -- run time --------------------------------------------------------------------------
def loss_not_tensor():
    return single(lambda p: p(X).sum().item())


def loss_not_scalar():
    return single(lambda p: p(X))


def loss_nan():
    return single(lambda p: p(X).sum() * float("nan"))


def loss_inf():
    return single(lambda p: p(X).sum() + float("inf"))


def gradient_not_finite():
    def loss(p):
        w = p.module.weight
        return torch.sqrt(w - w.detach()).sum() + p(X).sum()  # value finite, gradient 1/(2·0)
    return single(loss)


def loss_not_differentiable():
    def loss(p):
        with torch.no_grad():
            return p(X).pow(2).mean()
    return single(loss)


def loss_raises():
    def loss(p):
        scale = {"lr": 0.1}["learning_rate"]
        return p(X).sum() * scale
    return single(loss)


def batch_of_wrong_structure():
    def loss(p, batch):
        x, y = batch  # the data yields bare tensors, not (x, y) pairs
        return (p(x) - y).pow(2).mean()
    return single(loss, data=[torch.ones(4, 2)])


def batch_without_a_key():
    def loss(p, batch):
        return (p(batch["image"]) - batch["label"]).pow(2).mean()
    return single(loss, data=[{"x": torch.ones(4, 2), "label": torch.zeros(4, 1)}])


def data_empty():
    return single(lambda p, batch: p(batch).sum(), data=[])


def data_runs_dry():
    return single(lambda p, batch: p(batch).sum(), data=(X for _ in range(2)))


def escaped_reference():
    (m1, o1), (m2, o2) = lin(), lin()
    table = {}

    @problem(module=m1, optimizer=o1)
    def boss():
        return boss(X).pow(2).sum()

    @problem(module=m2, optimizer=o2, upper=[boss])
    def worker():
        return (worker(X) * table["boss"](X)).sum()  # through a dict: invisible to the compiler

    table["boss"] = boss
    return Program([boss, worker])


def modules_on_two_devices():
    m = nn.Linear(2, 1).to("meta")
    return bilevel(module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1))


def batch_on_another_device():
    return single(lambda p, batch: p(batch).sum(), data=[torch.ones(4, 2, device="meta")])


def hook_raises():
    program = bilevel()

    @program["low"].after_step
    def clamp(module):
        module.weight.clamp_(min=0.0, max="one")

    return program


def scheduler_raises():
    m, o = lin()
    return single(lambda p: p(X).pow(2).sum(), module_optimizer=(m, o),
                  scheduler=torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=2))


def detach_count_changes():
    (m1, o1), (m2, o2) = lin(), lin()
    calls = []

    @problem(module=m1, optimizer=o1)
    def up():
        return low(X).pow(2).sum()

    @problem(module=m2, optimizer=o2, upper=[up], hypergrad=FiniteDifference(hold_detached=True))
    def low():
        calls.append(1)
        out = low(X)
        scale = out.detach().mean() if len(calls) % 2 else 1.0   # a .detach() on every other call only
        return (out * up(X) * scale).pow(2).sum()

    return Program([up, low])


def zero_gradient():
    return bilevel(hypergrad="first_order")


def nan_skipped():
    return single(lambda p: p(X).sum() * float("nan"), nan_policy="skip")


CATALOGUE_COMPILE = [
    Case("upper cycle", upper_cycle, CompileError, errors.UPPER_CYCLE,
         rf"cycle: a -> upper b -> upper a.*problem 'a' at {HERE}"),
    Case("upper is itself", self_upper, CompileError, errors.SELF_UPPER,
         rf"problem 'me' \({HERE}\) lists itself in upper="),
    Case("unknown upper, with a did-you-mean", unknown_upper, CompileError, errors.UNKNOWN_UPPER,
         rf"'weights' \({HERE}\) lists upper='clasifier'.*did you mean 'classifier'\?"),
    Case("the same upper twice", duplicate_upper, CompileError, errors.DUPLICATE_UPPER,
         rf"problem 'base' \({HERE}\) lists 'meta' in upper= 2 times"),
    Case("reference to an unrelated problem", unrelated_reference, CompileError, errors.UNRELATED_REFERENCE,
         rf"loss of 'student' \({HERE}\) calls problem 'teacher' \(defined at {HERE}\).*upper=\['teacher'\]"),
    Case("reference to a problem not in the Program", unknown_reference, CompileError,
         errors.UNKNOWN_REFERENCE, rf"loss of 'main' \({HERE}\) uses problem 'forgotten'"),
    Case("two problems with one name", duplicate_name, CompileError, errors.DUPLICATE_NAME,
         rf"two problems are named 'model': {HERE} and {HERE}"),
    Case("a problem passed twice", same_problem_twice, CompileError, errors.SAME_PROBLEM_TWICE,
         rf"problem 'twice' \({HERE}\) is passed to Program\(\[...\]\) twice"),
    Case("steps < 1", zero_steps, CompileError, errors.BAD_STEPS,
         rf"problem 'low' \({HERE}\) has steps=0"),
    Case("a schedule too long to compile", schedule_too_long, CompileError, errors.SCHEDULE_TOO_LONG,
         rf"lower steps= on 'mid' \({HERE}, steps=400\), 'bottom' \({HERE}, steps=400\)"),
    Case("unknown hypergradient name, with a did-you-mean", unknown_method, CompileError,
         errors.UNKNOWN_METHOD, rf"'low' \({HERE}\) asks for hypergrad='nueman'.*did you mean 'neumann'\?"),
    Case("optimizer built on another module", optimizer_foreign_params, CompileError,
         errors.OPTIMIZER_FOREIGN_PARAMS, rf"optimizer of 'p' \({HERE}\) updates 2 tensor"),
    Case("optimizer missing some parameters", optimizer_misses_params, CompileError,
         errors.OPTIMIZER_MISSES_PARAMS, rf"optimizer of 'p' \({HERE}\) does not update 2 .*'1.weight'"),
    Case("optimizer that needs a closure", optimizer_needs_closure, CompileError,
         errors.OPTIMIZER_NEEDS_CLOSURE, rf"optimizer of 'p' \({HERE}\) is LBFGS"),
    Case("module without trainable parameters", no_parameters, CompileError, errors.NO_PARAMETERS,
         rf"module of 'p' \({HERE}\) has no trainable parameters"),
    Case("Unrolled() on an optimizer it cannot replay", unroll_unsupported, CompileError,
         errors.UNROLL_UNSUPPORTED, rf"'low' \({HERE}\) uses hypergrad=Unrolled\(\) with optimizer RMSprop"),
    Case("a parameter trained by two problems", shared_parameter, CompileError, errors.SHARED_PARAMETER,
         rf"problems 'outer' \({HERE}\) and 'inner' \({HERE}\) both train the parameter 'weight'"),
    Case("scheduler built on another optimizer", scheduler_foreign_optimizer, CompileError,
         errors.SCHEDULER_FOREIGN_OPTIMIZER, rf"scheduler of 'p' \({HERE}\), a StepLR, is built on another"),
    Case("scheduler that needs a metric", scheduler_needs_argument, CompileError,
         errors.SCHEDULER_NEEDS_ARGUMENT, rf"scheduler of 'p' \({HERE}\), a ReduceLROnPlateau, needs an"),
    Case("loss takes a batch but there is no data", loss_takes_a_batch_without_data, CompileError,
         errors.LOSS_SIGNATURE, rf"loss of 'wants_batch' \({HERE}\) takes an argument, but data=None"),
    Case("loss takes no batch but there is data", loss_takes_no_batch_with_data, CompileError,
         errors.LOSS_SIGNATURE, rf"loss of 'no_batch' \({HERE}\) takes no argument, but data= gives"),
    Case("an option out of range", bad_option, CompileError, errors.BAD_OPTION,
         rf"problem 'low' \({HERE}\) has grad_accumulation=0"),
    Case("a level no data flows through (warning)", no_dataflow, MlodslWarning, errors.NO_DATAFLOW,
         rf"'worker' \({HERE}\) lists 'boss' \({HERE}\) in upper=, but no data flows"),
]

CATALOGUE_RUN = [
    Case("loss is not a tensor", loss_not_tensor, ProblemError, errors.LOSS_NOT_TENSOR,
         rf"loss of 'p' \({HERE}\) returned float"),
    Case("loss is not a scalar", loss_not_scalar, ProblemError, errors.LOSS_NOT_SCALAR,
         rf"loss of 'p' \({HERE}\) returned a tensor of shape \(4, 1\)"),
    Case("loss is NaN", loss_nan, errors.NonFiniteError, errors.LOSS_NOT_FINITE,
         rf"loss of 'p' \({HERE}\) is nan at its step 0"),
    Case("loss is Inf", loss_inf, errors.NonFiniteError, errors.LOSS_NOT_FINITE,
         rf"loss of 'p' \({HERE}\) is inf at its step 0"),
    Case("gradient has NaN or Inf", gradient_not_finite, errors.NonFiniteError, errors.GRAD_NOT_FINITE,
         rf"gradient of 'p' \({HERE}\) has NaN or Inf entries in weight at its step 0"),
    Case("loss does not depend on the parameters", loss_not_differentiable, ProblemError,
         errors.LOSS_NOT_DIFFERENTIABLE, rf"loss of 'p' \({HERE}\) does not depend differentiably"),
    Case("loss raises", loss_raises, ProblemError, errors.LOSS_RAISED,
         rf"loss of 'p' \({HERE}\) raised KeyError: 'learning_rate' at {HERE}, on a batch None"),
    Case("data yields the wrong structure", batch_of_wrong_structure, ProblemError, errors.BATCH_STRUCTURE,
         rf"loss of 'p' \({HERE}\) could not take its batch apart: ValueError: too many values to "
         rf"unpack \(expected 2\) at {HERE}.*yields Tensor\[4, 2\] float32 cpu"),
    Case("a batch dict without the key the loss reads", batch_without_a_key, ProblemError,
         errors.BATCH_STRUCTURE, rf"loss of 'p' \({HERE}\) could not take its batch apart: KeyError: 'image' "
         rf"at {HERE}.*yields \{{'x': Tensor\[4, 2\] float32 cpu, 'label': Tensor\[4, 1\] float32 cpu\}}"),
    Case("data is empty", data_empty, ProblemError, errors.DATA_EMPTY,
         rf"data of 'p' \({HERE}\) yielded no batch"),
    Case("data is an iterator that runs dry", data_runs_dry, ProblemError, errors.DATA_RAN_DRY,
         rf"data of 'p' \({HERE}\) ran dry"),
    Case("loss calls a problem the compiler did not see", escaped_reference, ProblemError,
         errors.ESCAPED_REFERENCE, rf"loss of 'worker' \({HERE}\) called problem 'boss'.*uses=\['boss'\]"),
    Case("modules on two devices", modules_on_two_devices, ProblemError, errors.DEVICE_MISMATCH_MODULES,
         rf"loss of 'low' \({HERE}\) calls are on different devices: 'low' on meta, 'up' on cpu"),
    Case("batch on another device than the module", batch_on_another_device, ProblemError,
         errors.DEVICE_MISMATCH_BATCH,
         rf"loss of 'p' \({HERE}\) raised RuntimeError: .* at {HERE}: its batch is on meta, but the "
         rf"module of 'p' is on cpu.*x.to\('cpu'\)"),
    Case("FD holding detached values, but the loss detaches differently each time", detach_count_changes,
         ProblemError, errors.HELD_DETACH_MISMATCH,
         rf"loss of 'low' \({HERE}\) called .detach\(\) at least once at θ ± εv but no times at θ.*FiniteDifference\(hold_detached=False\)"),
    Case("a hook raises", hook_raises, ProblemError, errors.STEP_FAILED,
         rf"step of 'low' \({HERE}\) failed: TypeError: .* at {HERE}"),
    Case("the scheduler raises", scheduler_raises, ProblemError, errors.STEP_FAILED,
         rf"step of 'p' \({HERE}\) failed: ValueError: Tried to step 3 times"),
    Case("hypergradient always zero (warning)", zero_gradient, MlodslWarning, errors.ZERO_GRADIENT,
         rf"gradient of 'up' \({HERE}\) is zero: .*first_order"),
    Case("a NaN step skipped under nan_policy='skip' (warning)", nan_skipped, MlodslWarning,
         errors.STEP_SKIPPED, rf"a step of 'p' \({HERE}\) in iteration 0 was skipped \(nan_policy='skip'; "
         rf"1 so far\): the loss of 'p' .* is nan"),
]

CATALOGUE = CATALOGUE_COMPILE + CATALOGUE_RUN

# Texts that are not user mistakes of this catalogue, and where they are tested instead.
NOT_IN_CATALOGUE = {
    "NEUMANN_DIVERGES": "solver health, not a malformed program (mlodsl._solvers)",
    "CG_UNCONVERGED": "solver health, not a malformed program (mlodsl._solvers)",
    "CG_INDEFINITE": "solver health, not a malformed program (mlodsl._solvers)",
    "DEFERRED_NOT_FINITE": "the NaN case under checks='log'; its message test is in tests/test_host_syncs.py",
    "GRAPHS_OFF": "not a mistake: a program runs without CUDA graphs, and says why (tests/test_graphs.py)",
}


def template_regex(text: str) -> str:
    """The constant's literal parts, with any value in each field."""
    parts = []
    for literal, field, _, _ in string.Formatter().parse(text):
        parts.append(re.escape(literal))
        if field is not None:
            parts.append(".*?")
    return "".join(parts)


def trigger(case: Case) -> None:
    out = case.build()
    if isinstance(out, Program):
        out.run(iterations=case.iterations)


def message_of(case: Case) -> str:
    if issubclass(case.error, Warning):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            trigger(case)
        found = [str(w.message) for w in record if issubclass(w.category, case.error)]
        assert found, f"no {case.error.__name__} was warned"
        return "\n".join(found)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MlodslWarning)
        with pytest.raises(case.error) as info:
            trigger(case)
    return str(info.value)


@pytest.mark.parametrize("case", CATALOGUE, ids=[c.id for c in CATALOGUE])
def test_each_mistake_gets_its_error_and_a_message_that_teaches(case):
    message = message_of(case)
    assert re.search(template_regex(case.text), message, re.S), f"not built from its text:\n{message}"
    assert re.search(case.pattern, message, re.S), message
    assert re.search(HERE, message), f"no file:line of the user's code:\n{message}"
    assert "Fix:" in message


def test_every_message_text_has_a_case_or_a_reason():
    texts = {name for name, value in vars(errors).items() if name.isupper() and isinstance(value, str)}
    covered = {name for name, value in vars(errors).items() if any(value is c.text for c in CATALOGUE)}
    assert texts - covered - set(NOT_IN_CATALOGUE) == set()
    assert len(CATALOGUE_COMPILE) >= 20 and len(CATALOGUE_RUN) >= 15


def test_failures_are_errors_of_mlodsl_and_warnings_are_mlodsl_warnings():
    for case in CATALOGUE:
        assert issubclass(case.error, (errors.MlodslError, MlodslWarning)), case.id
