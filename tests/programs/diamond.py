"""Four problems in a diamond, as in the paper's Figure 2: one top, two middles, one bottom.

The bottom also reads the top's parameters, so θ_top reaches θ*_left both directly and
through θ*_bottom (the two paths of the paper's example).

Problems only, no Program: the CLI compiles all the problems of the file.
"""

import torch
from torch import nn

from mlodsl import problem

x = torch.randn(8, 2)
mods = {n: nn.Linear(2, 2) for n in ("top", "left", "right", "bottom")}


def sgd(name, lr=0.1):
    return torch.optim.SGD(mods[name].parameters(), lr=lr)


@problem(module=mods["top"], optimizer=sgd("top", 0.01))
def top():
    return (left(x) + right(x)).pow(2).mean()


@problem(module=mods["left"], optimizer=sgd("left"), upper=[top], hypergrad="neumann")
def left():
    return (left(x) - top(x)).pow(2).mean() + bottom(left(x)).pow(2).mean()


@problem(module=mods["right"], optimizer=sgd("right"), upper=[top], hypergrad="cg")
def right():
    return (right(x) + top(x)).pow(2).mean() + bottom(right(x)).pow(2).mean()


@problem(module=mods["bottom"], optimizer=sgd("bottom"), upper=[left, right], steps=3)
def bottom():
    return (bottom(left(x)) - bottom(right(x)) - top(x)).pow(2).mean()
