"""Step transactions (mlodsl/_guard.py): a failing step rolls back, and nothing is lost.

The strongest check: a run in which one step fails (anywhere: the loss, a NaN,
a hook before or after the update, the scheduler, a lower loss inside the
upper's hypergradient, Ctrl-C), is retried after the failure and continued,
ends bit for bit where an uninterrupted run ends: parameters, optimizer and
scheduler state, BatchNorm buffers, counters, data positions and the random
generators were all put back.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mlodsl import MlodslWarning, ProblemError, Program, problem
from mlodsl.hypergrad import Unrolled

FAULTS = ["loss:low", "loss:up", "nan:low", "grad_nan:up", "before_unroll:low", "after_step:up",
          "after_unroll:low", "scheduler:up", "lower_in_hypergrad", "interrupt:low"]


class Faults:
    """One-shot faults, armed by name; ``fire(name)`` is True once after ``arm(name)``."""

    def __init__(self) -> None:
        self.armed: set[str] = set()
        self.up_stepping = False

    def fire(self, name: str) -> bool:
        if name in self.armed:
            self.armed.discard(name)
            return True
        return False


def build(faults: Faults, method: object = "neumann", nan_policy: str = "raise", seed: int = 0) -> Program:
    torch.manual_seed(seed)
    x, y = torch.randn(24, 3), torch.randn(24, 1)
    data = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)
    up_m = nn.Linear(3, 1)
    low_m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1))
    up_opt = torch.optim.Adam(up_m.parameters(), lr=0.01)

    def decay(k: int) -> float:
        if faults.fire("scheduler:up"):
            raise RuntimeError("scheduler fault")
        return 0.95 ** k

    @problem(module=up_m, optimizer=up_opt, data=data,
             scheduler=torch.optim.lr_scheduler.LambdaLR(up_opt, decay))
    def up(batch):
        x, y = batch
        if faults.fire("loss:up"):
            raise RuntimeError("loss fault")
        loss = (low(x) - y).pow(2).mean() + 0.1 * up(x).pow(2).mean()
        return loss * float("nan") if faults.fire("grad_nan:up") else loss

    @problem(module=low_m, optimizer=torch.optim.SGD(low_m.parameters(), lr=0.05, momentum=0.9),
             data=data, upper=[up], steps=2, hypergrad=method)
    def low(batch):
        x, y = batch
        if faults.fire("loss:low") or (faults.up_stepping and faults.fire("lower_in_hypergrad")):
            raise RuntimeError("loss fault")
        loss = (low(x) - y - up(x)).pow(2).mean()
        return loss * float("nan") if faults.fire("nan:low") else loss

    @low.before_unroll
    def _(module):
        module[0].weight.clamp_(-3, 3)
        if faults.fire("before_unroll:low"):
            module[0].weight.add_(100.0)
            raise RuntimeError("hook fault")

    @low.after_step
    def _(module):
        if faults.fire("interrupt:low"):
            module[0].weight.add_(100.0)
            raise KeyboardInterrupt

    @low.after_unroll
    def _(module):
        if faults.fire("after_unroll:low"):
            raise RuntimeError("hook fault")

    @up.before_unroll
    def _(module):
        faults.up_stepping = True

    @up.after_step
    def _(module):
        faults.up_stepping = False
        if faults.fire("after_step:up"):
            module.weight.mul_(0.0)
            raise RuntimeError("hook fault")

    return Program([up, low], nan_policy=nan_policy)


def snapshot(program: Program) -> dict:
    rt = program._runtime
    return {
        "modules": [copy.deepcopy(p.module.state_dict()) for p in program.problems],
        "optimizers": [copy.deepcopy(p.optimizer.state_dict()) for p in program.problems],
        "schedulers": [p.scheduler.state_dict() for p in program.problems if p.scheduler is not None],
        "lr": [p.lr for p in program.problems],
        "counters": (rt.iteration, rt.position, dict(rt.stats)),
        "counts": {n: st.count for n, st in rt.state.items()},
        "data": {n: (st.batches.epoch, st.batches.position) for n, st in rt.state.items()},
        "windows": {n: len(st.window.steps) if getattr(st, "window", None) else None
                    for n, st in rt.state.items()},
        "rng": torch.get_rng_state(),
    }


def same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def fail_once(program: Program, faults: Faults, fault: str, iterations: int) -> BaseException:
    faults.armed.add(fault)
    with pytest.raises((ProblemError, KeyboardInterrupt)) as info:
        program.run(iterations=iterations)
    assert fault not in faults.armed, "the fault never fired"
    return info.value


@pytest.mark.parametrize("method", ["neumann", Unrolled()], ids=["neumann", "unrolled"])
@pytest.mark.parametrize("fault", FAULTS)
def test_a_failed_step_is_rolled_back_and_a_retry_ends_where_a_clean_run_ends(fault, method):
    clean = build(Faults(), method)
    clean.run(iterations=7)

    faults = Faults()
    program = build(faults, method)
    program.run(iterations=3)
    error = fail_once(program, faults, fault, iterations=4)
    if isinstance(error, ProblemError):
        assert "rolled back" in str(error)
    assert program.iteration < 7
    program.run(iterations=7 - program.iteration)
    assert same(snapshot(program), snapshot(clean))


def test_rolled_back_state_equals_the_state_before_the_failing_step():
    faults = Faults()
    program = build(faults)
    program.run(iterations=3)
    states = []
    original = program._runtime.step

    def step(s):
        states.append(snapshot(program))
        original(s)
    program._runtime.step = step
    fail_once(program, faults, "after_step:up", iterations=3)
    assert same(snapshot(program), states[-1])


def test_an_interrupt_is_rolled_back_and_re_raised_unchanged():
    faults = Faults()
    program = build(faults)
    program.run(iterations=2)
    before = snapshot(program)
    error = fail_once(program, faults, "interrupt:low", iterations=1)
    assert type(error) is KeyboardInterrupt
    assert same(snapshot(program), before)


# -- nan_policy="skip" -------------------------------------------------------------
def test_skip_drops_the_step_warns_counts_it_and_training_goes_on():
    faults = Faults()
    program = build(faults, nan_policy="skip")
    program.run(iterations=2)
    before = snapshot(program)
    faults.armed.add("nan:low")
    with pytest.warns(MlodslWarning, match=r"a step of 'low' \(.*\) in iteration 2 was skipped .*1 so far"):
        program.run(iterations=1)
    after = snapshot(program)
    assert program.stats["skipped/low"] == 1
    assert program.iteration == 3                                       # the schedule moved on
    assert same(after["modules"][1], before["modules"][1])              # θ_low, BN stats untouched
    assert same(after["optimizers"][1], before["optimizers"][1])
    assert program.stats["steps/low"] == before["counters"][2]["steps/low"]  # not an applied step
    assert after["data"]["low"] != before["data"]["low"]                 # its batch stays drawn
    program.run(iterations=3)
    assert program.stats["steps/low"] == before["counters"][2]["steps/low"] + 3


def test_a_skipped_step_still_counts_for_the_schedule():
    clean, faults = build(Faults()), Faults()
    program = build(faults, nan_policy="skip")
    faults.armed.add("nan:low")
    with pytest.warns(MlodslWarning):
        program.run(iterations=4)
    clean.run(iterations=4)
    assert program.stats["steps/up"] == clean.stats["steps/up"] == 2   # low has steps=2: up stepped twice
    assert program.stats["steps/low"] == clean.stats["steps/low"] - 1


def test_a_skipped_upper_step_with_nan_gradient_is_dropped():
    faults = Faults()
    program = build(faults, nan_policy="skip")
    program.run(iterations=1)
    up_before = copy.deepcopy(program["up"].module.state_dict())
    faults.armed.add("grad_nan:up")
    with pytest.warns(MlodslWarning, match="'up'"):
        program.run(iterations=1)
    assert program.stats["skipped/up"] == 1
    assert same(program["up"].module.state_dict(), up_before)


def test_skip_keeps_the_unrolled_replay_exact():
    faults = Faults()
    program = build(faults, method=Unrolled(), nan_policy="skip")
    program.run(iterations=2)
    faults.armed.add("nan:low")
    with pytest.warns(MlodslWarning):
        program.run(iterations=4)
    assert program.diagnostics["low/unroll_replay_error"] < 1e-6


def test_raise_is_the_default_and_other_errors_are_never_skipped():
    faults = Faults()
    program = build(faults, nan_policy="skip")
    fail_once(program, faults, "loss:low", iterations=1)
    assert "skipped/low" not in program.stats
    with warnings.catch_warnings():
        warnings.simplefilter("error", MlodslWarning)
        faults2 = Faults()
        strict = build(faults2)
        fail_once(strict, faults2, "nan:low", iterations=1)
