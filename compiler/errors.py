"""Errors of mlodsl, and the texts that teach the fix.

Every user-facing error names the user's function with ``file:line``, the rule
that was broken, and the fix. The texts are constants here so that each has a
test that matches it (``tests/test_errors.py``). They live in the compiler
because the compiler raises most of them and must not import torch;
``mlodsl`` re-exports the classes.
"""

from __future__ import annotations


class MlodslError(Exception):
    """Base class of every error mlodsl raises on purpose."""


class CompileError(MlodslError):
    """A broken program, found by ``Program(...)`` before any data is touched."""


class ProblemError(MlodslError):
    """A problem failing at run time; the step it failed in was rolled back."""


class UsageError(MlodslError, TypeError):
    """A public function was called with an argument of the wrong type or value."""


class InternalError(MlodslError):
    """A compiler pass produced an invalid graph or plan: a bug in mlodsl, not in your code."""


# --- compile-time texts -----------------------------------------------------

DUPLICATE_NAME = (
    "two problems are named {name!r}: {first} and {second}.\n"
    "Rule: problem names are unique within a Program.\n"
    "Fix: rename one function, or pass name='...' to @problem."
)

UNKNOWN_UPPER = (
    "problem {name!r} ({loc}) lists upper={upper!r}, which is not a problem of this Program.\n"
    "Rule: every problem in upper= must be passed to Program([...]).\n"
    "Fix: {fix}"
)

SELF_UPPER = (
    "problem {name!r} ({loc}) lists itself in upper=.\n"
    "Rule: a problem cannot be one level above itself.\n"
    "Fix: remove {name!r} from its own upper= list."
)

UPPER_CYCLE = (
    "the levels given by upper= form a cycle: {cycle}.\n"
    "Rule: upper= must define a hierarchy (an upper of an upper is an upper, so no problem "
    "may end up above itself).\n"
    "Fix: remove one of these upper= entries; first one: problem {name!r} at {loc}."
)

UNRELATED_REFERENCE = (
    "the loss of {name!r} ({loc}) calls problem {other!r} (defined at {other_loc}), but neither "
    "is above the other.\n"
    "Rule: a loss may only read problems above it (their current parameters) or below it "
    "(their optimum).\n"
    "Fix: declare the level, e.g. @problem(..., upper=[{other!r}]) on {name!r} if {other!r} "
    "constrains it, or @problem(..., upper=[{name!r}]) on {other!r} if {name!r} reads its optimum."
)

UNKNOWN_REFERENCE = (
    "the loss of {name!r} ({loc}) uses problem {other!r}, which is not part of this Program.\n"
    "Rule: every problem a loss calls must be passed to Program([...]).\n"
    "Fix: add {other!r} to the list given to Program."
)

BAD_STEPS = (
    "problem {name!r} ({loc}) has steps={steps!r}.\n"
    "Rule: steps is the number of optimizer steps per step of its upper problems, an int >= 1.\n"
    "Fix: pass steps=1 or more."
)

SCHEDULE_TOO_LONG = (
    "the schedule of this program repeats only every {period} iterations or more "
    "(steps along a chain multiply).\n"
    "Rule: the static schedule of one period is at most {limit} iterations.\n"
    "Fix: lower steps= on {names}."
)

BAD_OPTION = (
    "problem {name!r} ({loc}) has {option}={value!r}.\n"
    "Rule: {option} must be {expected}.\n"
    "Fix: pass {option} as {expected}, or leave it out for the default."
)

# --- run-time texts ---------------------------------------------------------

LOSS_NOT_TENSOR = (
    "the loss of {name!r} ({loc}) returned {got}, not a tensor.\n"
    "Rule: a loss function returns a scalar torch.Tensor that depends on its module's parameters.\n"
    "Fix: return the loss tensor itself, e.g. `return F.cross_entropy(...)`, not `.item()`."
)

LOSS_NOT_SCALAR = (
    "the loss of {name!r} ({loc}) returned a tensor of shape {shape}, not a scalar.\n"
    "Rule: a loss is a single number to minimise.\n"
    "Fix: reduce it, e.g. `.mean()` or `.sum()`, or use reduction='mean' in the loss function."
)

LOSS_NOT_FINITE = (
    "the loss of {name!r} ({loc}) is {value} at its step {step}.\n"
    "Rule: losses and gradients must be finite; the step was rolled back, no parameter or "
    "optimizer state changed.\n"
    "Fix: lower the learning rate, clip gradients, or check the data for NaN/Inf."
)

GRAD_NOT_FINITE = (
    "the gradient of {name!r} ({loc}) has NaN or Inf entries in {where} at its step {step}.\n"
    "Rule: losses and gradients must be finite; the step was rolled back, no parameter or "
    "optimizer state changed.\n"
    "Fix: lower the learning rate (or alpha of Neumann), add damping to CG, or clip gradients."
)

LOSS_NOT_DIFFERENTIABLE = (
    "the loss of {name!r} ({loc}) does not depend differentiably on its parameters.\n"
    "Rule: the loss must be computed from the problem's module with autograd enabled.\n"
    "Fix: call the module through the problem (`{name}(x)`) and do not use torch.no_grad() "
    "or .detach() on the path to the loss."
)

HELD_DETACH_MISMATCH = (
    "the loss of {name!r} ({loc}) called .detach() {got} at θ ± εv but {expected} at θ, so "
    "FiniteDifference, which holds each detached value at its value at θ, cannot match them.\n"
    "Rule: to hold detached values (hold_detached=\"auto\", the default, or True), the loss must "
    "call .detach() the same number of times, on tensors of the same shapes, at every evaluation.\n"
    "Fix: make the detached values independent of θ's exact value (no data-dependent branches "
    "around .detach()), or use FiniteDifference(hold_detached=False) (which also differentiates "
    "through the detached values), Neumann or CG."
)

ESCAPED_REFERENCE = (
    "the loss of {name!r} ({loc}) called problem {other!r}, which the compiler did not see in "
    "its code.\n"
    "Rule: every problem a loss calls must be visible in its code (globals, closures, nested "
    "functions) or declared.\n"
    "Fix: add uses=[{other!r}] to the @problem(...) of {name!r}."
)

DATA_EMPTY = (
    "the data of {name!r} ({loc}) yielded no batch.\n"
    "Rule: data= is an iterable of batches, cycled forever; it must yield at least one batch.\n"
    "Fix: check the dataset is not empty (and drop_last=False when it is smaller than a batch)."
)

DATA_RAN_DRY = (
    "the data of {name!r} ({loc}) ran dry: it is an iterator, which cannot be restarted.\n"
    "Rule: data= is cycled forever, so it must be re-iterable.\n"
    "Fix: pass a list, a DataLoader or another re-iterable object instead of an iterator "
    "or generator."
)

UNKNOWN_METHOD = (
    "problem {name!r} ({loc}) asks for hypergrad={method!r}, which is not a hypergradient method.\n"
    "Rule: known names are {known}.\n"
    "Fix: {fix}"
)

ZERO_GRADIENT = (
    "the gradient of {name!r} ({loc}) is zero: its loss reaches its parameters only through "
    "lower problems whose hypergradient method is first_order.\n"
    "Fix: give those lower problems another method (e.g. hypergrad='fd' or Neumann()), or "
    "make the loss of {name!r} depend on its parameters directly."
)

NEUMANN_DIVERGES = (
    "the Neumann series of {name!r} ({loc}) diverges: its last term is {growth:.3g}× the first "
    "(alpha={alpha:g}).\n"
    "Rule: the series α Σ (I − αH)^i v converges only when α is below 2 / (largest eigenvalue of H).\n"
    "Fix: lower alpha, e.g. Neumann(iterations=..., alpha={half:g}), or use CG(damping=...)."
)

CG_UNCONVERGED = (
    "the conjugate-gradient solve of {name!r} ({loc}) has not reduced its residual: "
    "‖r‖/‖v‖ = {residual:.3g} after {iterations} iterations.\n"
    "Rule: CG's answer is only as good as its residual; a large one means a poor hypergradient.\n"
    "Fix: raise iterations (CG(iterations=...)), or add damping (CG(damping=0.1)) if the Hessian "
    "is indefinite or ill-conditioned."
)

CG_INDEFINITE = (
    "the Hessian of {name!r} ({loc}) is not positive definite where CG used it (curvature "
    "{curvature:.3g} along a search direction).\n"
    "Rule: conjugate gradients solves H p = v only for a positive definite H, i.e. near a minimum.\n"
    "Fix: add damping (CG(damping=...) larger than the most negative curvature), take more lower "
    "steps before the upper one (steps=...), or use Neumann(alpha=...)."
)

# --- issue 4: the catalogue of mistakes ---------------------------------------------------


class MlodslWarning(UserWarning):
    """A program that compiles and runs, but probably not as meant (a level no data flows
    through, a step skipped under ``nan_policy="skip"``). Make it an error with
    ``warnings.simplefilter("error", mlodsl.MlodslWarning)``."""


class NonFiniteError(ProblemError):
    """A NaN or Inf loss or gradient: what ``nan_policy="skip"`` drops instead of raising."""


# compile time, torch side (raised by mlodsl._collect)

OPTIMIZER_FOREIGN_PARAMS = (
    "the optimizer of {name!r} ({loc}) updates {count} tensor(s) that are not parameters of its "
    "module ({module}).\n"
    "Rule: a problem's optimizer is built on its own module's parameters, and only those.\n"
    "Fix: build it as `{opt}(module.parameters(), ...)` on the module passed as module=."
)

OPTIMIZER_MISSES_PARAMS = (
    "the optimizer of {name!r} ({loc}) does not update {count} trainable parameter(s) of its "
    "module, e.g. {example!r}.\n"
    "Rule: every trainable parameter (requires_grad=True) of the module belongs to the optimizer.\n"
    "Fix: build the optimizer on module.parameters(), or freeze those parameters with "
    "requires_grad_(False)."
)

OPTIMIZER_NEEDS_CLOSURE = (
    "the optimizer of {name!r} ({loc}) is {opt}, whose step() needs a closure that re-evaluates "
    "the loss.\n"
    "Rule: mlodsl applies the total gradient (direct + hypergradient) with one optimizer.step().\n"
    "Fix: use an optimizer that steps without a closure (SGD, Adam, AdamW, RMSprop, ...)."
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

SHARED_PARAMETER = (
    "problems {name!r} ({loc}) and {other!r} ({other_loc}) both train the parameter {param!r} "
    "(of the module of {name!r}; {count} shared in all).\n"
    "Rule: each trainable parameter belongs to one problem: θ of one problem is the data of "
    "another, read by calling that problem.\n"
    "Fix: give each problem its own module; for {other!r} to read the parameters of {name!r}, "
    "call `{name}(...)` in its loss. A shared part that neither trains can stay shared if frozen "
    "(requires_grad_(False))."
)

SAME_PROBLEM_TWICE = (
    "problem {name!r} ({loc}) is passed to Program([...]) twice.\n"
    "Rule: a Program takes each problem once.\n"
    "Fix: remove the second {name!r} from the list."
)

SCHEDULER_FOREIGN_OPTIMIZER = (
    "the scheduler of {name!r} ({loc}), a {scheduler}, is built on another optimizer than the "
    "problem's ({opt}).\n"
    "Rule: scheduler= changes the learning rate of the problem's own optimizer.\n"
    "Fix: build it on that optimizer, e.g. `opt = {opt}(...); scheduler = {scheduler}(opt, ...)` "
    "with the same `opt` passed as optimizer=."
)

SCHEDULER_NEEDS_ARGUMENT = (
    "the scheduler of {name!r} ({loc}), a {scheduler}, needs an argument to step ({signature}).\n"
    "Rule: mlodsl calls scheduler.step() with no argument after each optimizer step.\n"
    "Fix: use a scheduler that steps on its own (StepLR, CosineAnnealingLR, LambdaLR, ...), or "
    "step it yourself in an @{name}.after_step hook and leave scheduler= out."
)

LOSS_SIGNATURE = (
    "the loss of {name!r} ({loc}) {takes}, but {data}.\n"
    "Rule: with data=None the loss takes no argument; with data= it takes one, the batch.\n"
    "Fix: {fix}"
)

NO_DATAFLOW = (
    "problem {lower!r} ({lower_loc}) lists {upper!r} ({upper_loc}) in upper=, but no data flows "
    "between {upper!r} and {lower!r} or the problems below it: the loss of {upper!r} reads none "
    "of their optima and none of their losses reads the parameters of {upper!r}.\n"
    "Rule: an upper problem reads the optimum of a lower one, or constrains it; otherwise the "
    "level only orders the steps, and {upper!r} gets no hypergradient through {lower!r}.\n"
    "Fix: call `{lower}(...)` in the loss of {upper!r} or `{upper}(...)` in the loss of "
    "{lower!r} (or declare it with uses=), or remove {upper!r} from upper= of {lower!r}. If the "
    "levels only order the steps on purpose, silence this with "
    "warnings.filterwarnings('ignore', category=mlodsl.MlodslWarning)."
)

# run time

DEVICE_MISMATCH_MODULES = (
    "the modules that the loss of {name!r} ({loc}) calls are on different devices: {devices}.\n"
    "Rule: one program runs on one device.\n"
    "Fix: move every problem's module to one device, e.g. `module.to('cuda')` on each, or pass "
    "Program(..., device='cuda')."
)

DEVICE_MISMATCH_BATCH = (
    "the loss of {name!r} ({loc}) raised {error} at {where}: its batch is on {batch_devices}, "
    "but {modules}.\n"
    "Rule: a batch and the modules it meets are on one device; the step was rolled back.\n"
    "Fix: move the batch in the loss (`x = x.to({device!r})`), build the data on that device, or "
    "pass Program(..., device={device!r}), which moves every module and batch."
)

BATCH_STRUCTURE = (
    "the loss of {name!r} ({loc}) could not take its batch apart: {error} at {where}.\n"
    "The data of {name!r} yields {batch}.\n"
    "Rule: the loss receives each batch exactly as data= yields it; the step was rolled back.\n"
    "Fix: unpack what the data yields (a DataLoader over TensorDataset(x, y) yields [x, y]; a "
    "list of tensors yields one tensor per step), or change data= to yield what the loss expects."
)

LOSS_RAISED = (
    "the loss of {name!r} ({loc}) raised {error} at {where}, on a batch {batch}.\n"
    "Rule: a failing step is rolled back; no parameter, optimizer or data position changed.\n"
    "Fix: see the error above, raised from your code at {where}."
)

STEP_FAILED = (
    "the step of {name!r} ({loc}) failed: {error} at {where}.\n"
    "Rule: a failing step is rolled back: parameters, buffers, optimizer and scheduler state, "
    "counters and data positions are as they were before it.\n"
    "Fix: see the error above (raised from {where}: a hook, the scheduler or the optimizer); "
    "after fixing it, program.run(...) continues with the step that failed."
)

STEP_SKIPPED = (
    "a step of {name!r} ({loc}) in iteration {iteration} was skipped (nan_policy='skip'; "
    "{count} so far): {reason}"
)

DUPLICATE_UPPER = (
    "problem {name!r} ({loc}) lists {upper!r} in upper= {count} times.\n"
    "Rule: upper= lists each problem one level above once (a problem object and its name are the "
    "same problem).\n"
    "Fix: list {upper!r} once in upper= of {name!r}."
)

DEFERRED_NOT_FINITE = (
    "the loss or gradient of {name!r} ({loc}) was NaN or Inf at its step {step}, found at "
    "iteration {iteration}.\n"
    "Rule: with checks='log' finiteness is read only at log iterations and at the end of run(), "
    "so the steps since then were not rolled back.\n"
    "Fix: load the last checkpoint and lower the learning rate or clip gradients; use "
    "checks='step' (the default) to stop at the failing step with nothing lost."
)

GRAPHS_OFF = (
    "CUDA graphs are off for this program: {why}.\n"
    "It goes on without them, step by step (compiled, if compile= says so), with the same results.\n"
    "Fix: to get the graphs, remove what is named above from the steps; to silence this, pass "
    "cuda_graphs=False to Program()."
)
