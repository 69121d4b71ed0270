"""Bilevel data reweighting (DESIGN §1), tiny: a classifier below, a weighting net above."""

import torch
import torch.nn.functional as F
from torch import nn

from mlodsl import Program, problem
from mlodsl.hypergrad import Neumann

torch.manual_seed(0)
X, Y = torch.randn(16, 4), torch.randint(0, 3, (16,))
net = nn.Linear(4, 3)
wnet = nn.Sequential(nn.Linear(1, 1), nn.Sigmoid())


@problem(module=wnet, optimizer=torch.optim.Adam(wnet.parameters(), 1e-3), data=[(X, Y)])
def reweight(batch):
    x, y = batch
    return F.cross_entropy(classifier(x), y)


@problem(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), data=[(X, Y)],
         upper=[reweight], hypergrad=Neumann(iterations=3))
def classifier(batch):
    x, y = batch
    losses = F.cross_entropy(classifier(x), y, reduction="none")
    w = reweight(losses.detach()[:, None]).squeeze(1)
    return (w * losses).mean()


program = Program([reweight, classifier])

if __name__ == "__main__":
    raise SystemExit("the __main__ block must not run under the mlodsl CLI")
