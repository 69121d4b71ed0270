"""Broken on purpose: `student` reads `teacher`, but neither is above the other."""

import torch
from torch import nn

from mlodsl import Program, problem

x = torch.randn(4, 2)
t, s = nn.Linear(2, 1), nn.Linear(2, 1)


@problem(module=t, optimizer=torch.optim.SGD(t.parameters(), lr=0.1))
def teacher():
    return teacher(x).pow(2).mean()


@problem(module=s, optimizer=torch.optim.SGD(s.parameters(), lr=0.1))
def student():
    return (student(x) - teacher(x)).pow(2).mean()


program = Program([teacher, student])
