"""Parameters and modules as a PyTorch user has them, in every hypergradient method.

0-d (scalar) parameters get their exact hypergradients (TorchOpt's users met
zero gradients there); parameters with ``requires_grad=False`` and frozen
submodules are constants that never move, inside or outside the optimizer;
BatchNorm buffers change only by the forward passes of the stepping losses,
never by a method's own evaluations; train/eval modes are kept and respected;
dropout masks agree between the two evaluations of a finite difference.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mlodsl import Program, problem
from mlodsl.hypergrad import CG, FiniteDifference, FirstOrder, Neumann, Unrolled

# the programs here are small and not tuned: solver-health and zero-gradient warnings are expected
pytestmark = [pytest.mark.filterwarnings("ignore::mlodsl.SolverWarning"),
              pytest.mark.filterwarnings("ignore:the gradient of 'up'.*is zero")]

DT = torch.float64
METHODS = {"cg": CG(iterations=2), "neumann": Neumann(iterations=3), "fd": FiniteDifference(),
           "unrolled": Unrolled(), "first_order": FirstOrder()}


def method_S(name: str, a: float, lr: float, steps: int) -> float:
    """The method's stand-in for 1/a (DESIGN §3), for a scalar lower problem with curvature a."""
    if name == "cg":
        return 1.0 / a
    if name == "neumann":
        return lr * sum((1 - lr * a) ** i for i in range(4))
    if name == "fd":
        return lr
    if name == "unrolled":
        return lr * sum((1 - lr * a) ** k for k in range(steps))
    return 0.0


# -- 0-d parameters, and a frozen 0-d parameter in the module --------------------------
class Scalar(nn.Module):
    """θ is one 0-d parameter; ``a`` is a 0-d parameter with requires_grad=False (a constant)."""

    def __init__(self, value: float, a: float = 1.0) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(value, dtype=DT))
        self.a = nn.Parameter(torch.tensor(a, dtype=DT), requires_grad=False)

    def forward(self) -> torch.Tensor:
        return self.w


B, C, T, R = 0.8, 0.3, 1.5, 0.2


def scalar_program(method: object, lr: float = 0.1, steps: int = 1, frozen_in_optimizer: bool = True,
                   optimizer: type = torch.optim.SGD) -> Program:
    """C_low = ½ a w² + b w λ + c w,  C_up = ½ (w* − t)² + ½ r λ²:  dw*/dλ = −b/a."""
    up_m, low_m = Scalar(0.7), Scalar(-0.3, a=2.0)
    low_params = low_m.parameters() if frozen_in_optimizer else [low_m.w]

    @problem(module=up_m, optimizer=torch.optim.SGD(up_m.parameters(), lr=0.05))
    def up():
        return 0.5 * (low() - T) ** 2 + 0.5 * R * up() ** 2

    @problem(module=low_m, optimizer=optimizer(low_params, lr=lr), upper=[up], hypergrad=method, steps=steps)
    def low():
        w = low()
        return 0.5 * low.module.a * w ** 2 + B * w * up() + C * w

    return Program([up, low])


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("frozen_in_optimizer", [True, False], ids=["frozen-in-opt", "frozen-out-of-opt"])
@pytest.mark.parametrize("name", METHODS)
def test_scalar_parameters_get_their_exact_hypergradient(name, frozen_in_optimizer, steps):
    program = scalar_program(METHODS[name], steps=steps, frozen_in_optimizer=frozen_in_optimizer)
    program.run(iterations=2 * steps)
    up_m, low_m = program["up"].module, program["low"].module
    (g,) = program.gradient("up")
    lam, w = float(up_m.w), float(low_m.w)
    want = R * lam + (w - T) * (-B * method_S(name, 2.0, 0.1, steps))
    assert g.shape == () and abs(float(g) - want) < 1e-10, (float(g), want)
    assert float(up_m.w) != 0.7 and float(low_m.w) != -0.3             # both 0-d θ moved
    assert float(low_m.a) == 2.0 and low_m.a.grad is None              # the frozen one did not


def test_a_scalar_parameter_replays_exactly_through_adam():
    program = scalar_program(Unrolled(), steps=3, optimizer=torch.optim.Adam)
    program.run(iterations=6)
    assert program.diagnostics["low/unroll_replay_error"] < 1e-12
    (g,) = program.gradient("up")
    assert g.shape == () and float(g) != 0.0


# -- a frozen submodule is a constant -----------------------------------------------------
class Head(nn.Module):
    """The same function as Sequential(frozen Linear, Tanh, head), with the frozen part as constants."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, head: nn.Linear) -> None:
        super().__init__()
        self.weight_c, self.bias_c = weight, bias
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(x @ self.weight_c.T + self.bias_c))


def features_program(method: object, frozen_as: str, seed: int = 0) -> Program:
    torch.manual_seed(seed)
    x, y = torch.randn(8, 3, dtype=DT), torch.randn(8, 1, dtype=DT)
    feat, head = nn.Linear(3, 4).to(DT), nn.Linear(4, 1).to(DT)
    decay = nn.Linear(1, 4, bias=False).to(DT)
    if frozen_as == "submodule":
        feat.requires_grad_(False)
        low_m = nn.Sequential(feat, nn.Tanh(), head)
    else:
        low_m = Head(feat.weight.detach().clone(), feat.bias.detach().clone(), head)

    @problem(module=decay, optimizer=torch.optim.SGD(decay.parameters(), lr=0.05))
    def up():
        return (low(x) - y).pow(2).mean()

    @problem(module=low_m, optimizer=torch.optim.SGD(low_m.parameters(), lr=0.1), upper=[up],
             hypergrad=method, steps=2)
    def low():
        penalty = (head.weight.pow(2) * up(torch.ones(1, 1, dtype=DT)).exp()).sum()
        return (low(x) - y).pow(2).mean() + 0.1 * penalty

    return Program([up, low])


@pytest.mark.parametrize("name", METHODS)
def test_a_frozen_submodule_is_a_constant_in_every_method(name):
    frozen, constant = features_program(METHODS[name], "submodule"), features_program(METHODS[name], "constant")
    before = copy.deepcopy(frozen["low"].module[0].state_dict())
    for program in (frozen, constant):
        program.run(iterations=4)
    assert all(torch.equal(before[k], v) for k, v in frozen["low"].module[0].state_dict().items())
    assert all(t.grad is None for t in frozen["low"].module[0].parameters())
    assert torch.allclose(frozen["low"].module[2].weight, constant["low"].module.head.weight, atol=1e-12)
    (g1,), (g2,) = frozen.gradient("up"), constant.gradient("up")
    assert torch.allclose(g1, g2, atol=1e-12)
    assert name == "first_order" or float(g1.abs().max()) > 0


# -- buffers and modes --------------------------------------------------------------------
def bn_program(method: object, mode: str = "train", dropout: float = 0.0, seed: int = 0) -> Program:
    torch.manual_seed(seed)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    up_m = nn.Linear(1, 4, bias=False)
    low_m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(dropout), nn.Tanh(), nn.Linear(4, 1))
    low_m.train(mode == "train")

    @problem(module=up_m, optimizer=torch.optim.SGD(up_m.parameters(), lr=0.01))
    def up():
        return (low(x + 1) - y).pow(2).mean()

    @problem(module=low_m, optimizer=torch.optim.SGD(low_m.parameters(), lr=0.05), upper=[up],
             hypergrad=method)
    def low():
        return (low(x) - y).pow(2).mean() + (up(torch.ones(1, 1)) * low_m[0].weight.T).pow(2).mean()

    return Program([up, low])


def buffers(program: Program) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in program["low"].module.named_buffers()}


@pytest.mark.parametrize("name", METHODS)
def test_batchnorm_statistics_move_only_with_the_stepping_losses(name):
    program = bn_program(METHODS[name])
    program.run(iterations=4)
    tracked = int(program["low"].module[1].num_batches_tracked)
    # each step of low runs its loss once; each step of up runs low's module once in its own loss;
    # the method's evaluations of low's loss (HVPs, FD, replays) do not count
    assert tracked == program.stats["steps/low"] + program.stats["steps/up"] == 8
    before = buffers(program)
    program.gradient("up")
    assert all(torch.equal(before[k], v) for k, v in buffers(program).items())


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_modes_are_kept_and_eval_mode_freezes_buffers(name, mode):
    program = bn_program(METHODS[name], mode=mode, dropout=0.3)
    before = buffers(program)
    program.run(iterations=3)
    module = program["low"].module
    assert all(m.training == (mode == "train") for m in module.modules())
    if mode == "eval":  # eval: running stats are read, never written; dropout is off, so runs repeat
        assert all(torch.equal(before[k], v) for k, v in buffers(program).items())
        again = bn_program(METHODS[name], mode=mode, dropout=0.3)
        again.run(iterations=3)
        assert all(torch.equal(a, b) for a, b in zip(module.parameters(), again["low"].module.parameters()))
    else:
        assert not torch.equal(before["1.running_mean"], buffers(program)["1.running_mean"])


def dropout_program(method: object, seed: int = 3) -> Program:
    torch.manual_seed(seed)
    x, y = torch.randn(16, 3, dtype=DT), torch.randn(16, 1, dtype=DT)
    head = nn.Linear(8, 1).to(DT)
    low_m = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.5), head).to(DT)
    decay = nn.Linear(1, 8, bias=False).to(DT)

    @problem(module=decay, optimizer=torch.optim.SGD(decay.parameters(), lr=0.05))
    def up():
        return (low(x) - y).pow(2).mean()

    @problem(module=low_m, optimizer=torch.optim.SGD(low_m.parameters(), lr=0.1), upper=[up], hypergrad=method)
    def low():
        return (low(x) - y).pow(2).mean() + (up(torch.ones(1, 1, dtype=DT)).T * head.weight).pow(2).sum()

    return Program([up, low])


def test_finite_differences_see_one_dropout_mask():
    """With dropout in train mode, FD's two evaluations share their masks: as eps shrinks FD tends
    to its limit, Neumann with K=0 (DARTS), instead of noise divided by eps."""
    def gradient(method):
        program = dropout_program(method)
        program.run(iterations=2)
        return program.gradient("up")[0]

    limit = gradient(Neumann(iterations=0))
    assert float(limit.norm()) > 1e-3
    for eps, tol in ((1e-2, 1e-3), (1e-4, 1e-7)):
        assert float((gradient(FiniteDifference(eps=eps)) - limit).norm()) < tol * float(limit.norm())


def test_method_evaluations_do_not_draw_from_the_random_generator():
    """How many times a method evaluates a lower loss does not change training's random numbers."""
    finals = []
    for method in (FirstOrder(), Neumann(iterations=5)):
        program = bn_program(method, dropout=0.5, seed=4)
        program.run(iterations=3)
        finals.append(torch.rand(3))
    assert torch.equal(finals[0], finals[1])
