"""A trilevel chain: top reads mid's optimum, mid reads bottom's; each constrains the one below."""

import torch
from torch import nn

from mlodsl import Program, problem
from mlodsl.hypergrad import CG, Unrolled

x = torch.randn(8, 2)
top_m, mid_m, bottom_m = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 1)


@problem(module=top_m, optimizer=torch.optim.SGD(top_m.parameters(), lr=0.01))
def top():
    return mid(x).pow(2).mean()


@problem(module=mid_m, optimizer=torch.optim.SGD(mid_m.parameters(), lr=0.05), upper=[top],
         hypergrad=CG(iterations=4))
def mid():
    return bottom(mid(x)).pow(2).mean() + (mid(x) - top(x)).pow(2).mean()


@problem(module=bottom_m, optimizer=torch.optim.SGD(bottom_m.parameters(), lr=0.1), upper=[mid],
         hypergrad=Unrolled(), steps=2)
def bottom():
    return (bottom(mid(x)) - 1).pow(2).mean()


program = Program([top, mid, bottom])
