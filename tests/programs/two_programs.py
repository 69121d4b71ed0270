"""Two Programs over the same problems: the CLI must be told which (FILE:NAME)."""

import torch
from torch import nn

from mlodsl import Program, problem

x = torch.randn(4, 2)
a_m, b_m = nn.Linear(2, 1), nn.Linear(2, 1)


@problem(module=a_m, optimizer=torch.optim.SGD(a_m.parameters(), lr=0.1))
def outer():
    return inner(x).pow(2).mean()


@problem(module=b_m, optimizer=torch.optim.SGD(b_m.parameters(), lr=0.1), upper=[outer])
def inner():
    return (inner(x) - outer(x)).pow(2).mean()


first = Program([outer, inner])
second = Program([outer, inner])
