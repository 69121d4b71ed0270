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

LOSS_FAILED = (
    "the loss of {name!r} ({loc}) raised {error}.\n"
    "Rule: the step was rolled back, no parameter or optimizer state changed.\n"
    "Fix: see the error above (raised from your function)."
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
