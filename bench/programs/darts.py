"""DARTS-style architecture search (Liu et al. 2019; Betty §5.1) on the digits: a bilevel program.

    architecture (upper)  min_α  CE_val(w*(α), α)        Adam(3e-3, betas (0.5, 0.999))
    classifier   (lower)  w*(α) = argmin_w CE_train(w, α)  SGD(0.05, momentum 0.9, weight decay 3e-4)

A dense one-cell supernet: a stem (64 → C, ReLU), then three nodes, each the
sum over every earlier state of a *mixed operation* — the softmax(α)-weighted
sum of the candidate operations (``none``, ``skip``, linear+ReLU,
linear+tanh, linear+sigmoid) — and a linear classifier on the concatenated
nodes. α has one logit per (edge, operation); the upper loss reads α both
directly and through w*(α). One outer iteration: one classifier step, then one
architecture step.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from bench import hand
from bench.common import CG_ITERATIONS, FD_EPS, NEUMANN_ITERATIONS, Batches, Cycle, seeded, split
from bench.programs.mwn import BettyRunner, MlodslRunner, betty_config, mlodsl_method, quiet_betty

LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 3e-4
ARCH_LR, ARCH_BETAS = 3e-3, (0.5, 0.999)
NODES = 3
EDGES = [(i, j) for j in range(1, NODES + 1) for i in range(j)]   # state i -> node j; state 0 is the stem
OPS = ("none", "skip", "linear_relu", "linear_tanh", "linear_sigmoid")
ACTIVATIONS = {"linear_relu": torch.relu, "linear_tanh": torch.tanh, "linear_sigmoid": torch.sigmoid}


class Sizes(NamedTuple):
    channels: int = 32
    batch: int = 64


class Supernet(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.stem = nn.Linear(64, c)
        self.ops = nn.ModuleList(nn.ModuleList(nn.Linear(c, c) for _ in ACTIVATIONS) for _ in EDGES)
        self.head = nn.Linear(NODES * c, 10)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        states = [torch.relu(self.stem(x))]
        for j in range(1, NODES + 1):
            states.append(sum(self.mixed(e, states[i], weights[e]) for e, (i, jj) in enumerate(EDGES) if jj == j))
        return self.head(torch.cat(states[1:], dim=1))

    def mixed(self, e: int, s: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = w[1] * s   # skip; "none" (w[0]) contributes zero
        for k, (layer, act) in enumerate(zip(self.ops[e], ACTIVATIONS.values()), start=2):
            out = out + w[k] * act(layer(s))
        return out


class Alphas(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(len(EDGES), len(OPS)))

    def forward(self) -> torch.Tensor:
        return F.softmax(self.alpha, dim=-1)


class Parts(NamedTuple):
    net: Supernet
    arch: Alphas
    train: Batches
    val: Batches


def parts(sizes: Sizes, seed: int, dtype: torch.dtype) -> Parts:
    train, val = split(seed, (898, -1))
    seeded(seed)
    net, arch = Supernet(sizes.channels).to(dtype), Alphas().to(dtype)
    return Parts(net, arch, Batches(train, sizes.batch, seed + 1, dtype), Batches(val, sizes.batch, seed + 2, dtype))


def build(side: str, method: str, sizes: Sizes = Sizes(), seed: int = 0, dtype: torch.dtype = torch.float32):
    return {"hand": Hand, "mlodsl": build_mlodsl, "betty": build_betty}[side](method, parts(sizes, seed, dtype))


def sgd(net: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def adam(arch: nn.Module) -> torch.optim.Adam:
    return torch.optim.Adam(arch.parameters(), lr=ARCH_LR, betas=ARCH_BETAS)


def build_mlodsl(method: str, p: Parts) -> MlodslRunner:
    from mlodsl import Program, problem

    @problem(module=p.arch, optimizer=adam(p.arch), data=p.val)
    def architecture(batch):
        x, y = batch
        return F.cross_entropy(classifier(x, architecture()), y)

    @problem(module=p.net, optimizer=sgd(p.net), data=p.train, upper=[architecture], hypergrad=mlodsl_method(method))
    def classifier(batch):
        x, y = batch
        return F.cross_entropy(classifier(x, architecture()), y)

    return MlodslRunner(Program([architecture, classifier]), {"architecture": p.arch, "classifier": p.net})


class Hand(hand.Bilevel):
    upper_reads_own = True

    def __init__(self, method: str, p: Parts) -> None:
        theta, phi = list(p.net.parameters()), list(p.arch.parameters())
        super().__init__(method, theta, phi, sgd(p.net), adam(p.arch), Cycle(p.train), Cycle(p.val),
                         neumann_iterations=NEUMANN_ITERATIONS, cg_iterations=CG_ITERATIONS, fd_eps=FD_EPS)
        self.net, self.arch = p.net, p.arch
        self.modules = {"architecture": p.arch, "classifier": p.net}
        self.names = [n for n, _ in p.net.named_parameters()]

    def lower_loss(self, batch, theta=None, live_phi: bool = False) -> torch.Tensor:
        x, y = batch
        with torch.set_grad_enabled(live_phi):
            weights = self.arch()
        if theta is None:
            return F.cross_entropy(self.net(x, weights), y)
        return F.cross_entropy(functional_call(self.net, dict(zip(self.names, theta)), (x, weights)), y)

    def upper_loss(self, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x, self.arch()), y)


def build_betty(method: str, p: Parts) -> BettyRunner:
    from betty.configs import Config, EngineConfig
    from betty.engine import Engine
    from betty.problems import ImplicitProblem

    quiet_betty()
    lower = betty_config(method, LR)

    class Architecture(ImplicitProblem):
        def training_step(self, batch):
            x, y = batch
            return F.cross_entropy(self.classifier(x, self.forward()), y)

    class Classifier(ImplicitProblem):
        def training_step(self, batch):
            x, y = batch
            return F.cross_entropy(self.module(x, self.architecture()), y)

    arch = Architecture(name="architecture", module=p.arch, optimizer=adam(p.arch), train_data_loader=p.val,
                        config=Config(retain_graph=True))
    cl = Classifier(name="classifier", module=p.net, optimizer=sgd(p.net), train_data_loader=p.train, config=lower)
    engine = Engine(problems=[arch, cl], config=EngineConfig(train_iters=1, strategy="cpu"),
                    dependencies={"u2l": {arch: [cl]}, "l2u": {cl: [arch]}})
    engine.train()
    return BettyRunner(engine, {"architecture": p.arch, "classifier": p.net})
