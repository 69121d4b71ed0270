"""Pretrain → finetune → reweight (Betty §5.3, domain adaptation): a trilevel chain on the digits.

    reweight (L3)  min_φ  CE_target(v*(w*(φ)))                               Adam(1e-3), target data
    finetune (L2)  v*(w) = argmin_v CE_target(v) + λ‖v − w‖²                  Adam(1e-3), target data
    pretrain (L1)  w*(φ) = argmin_w Σ R(x_i; φ) ℓ_i(w) / Σ R(x_i; φ)          Adam(1e-3), source data

``pretrain`` and ``finetune`` are MLPs 64-``hidden``-10; the proximal term
ties all of the finetuned parameters to the pretrained ones (λ = 1).
``reweight`` R(x; φ) is an MLP 64-32-1 with a sigmoid on the source image.
One path: the hypergradient of ``reweight`` passes through ``finetune`` and
then ``pretrain``, both with the chosen method. One outer iteration: one step
of each problem, bottom up.
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

LR, LAM = 1e-3, 1.0


class Sizes(NamedTuple):
    hidden: int = 128
    batch: int = 64


class Parts(NamedTuple):
    pt: nn.Module
    ft: nn.Module
    rw: nn.Module
    source: Batches
    target_ft: Batches
    target_rw: Batches


def mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def parts(sizes: Sizes, seed: int, dtype: torch.dtype) -> Parts:
    target, source = split(seed, (300, -1))
    seeded(seed)
    pt, ft = mlp(sizes.hidden).to(dtype), mlp(sizes.hidden).to(dtype)
    rw = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1)).to(dtype)
    return Parts(pt, ft, rw, Batches(source, sizes.batch, seed + 1, dtype),
                 Batches(target, sizes.batch, seed + 2, dtype), Batches(target, sizes.batch, seed + 3, dtype))


def build(side: str, method: str, sizes: Sizes = Sizes(), seed: int = 0, dtype: torch.dtype = torch.float32):
    return {"hand": Hand, "mlodsl": build_mlodsl, "betty": build_betty}[side](method, parts(sizes, seed, dtype))


def adam(m: nn.Module) -> torch.optim.Adam:
    return torch.optim.Adam(m.parameters(), lr=LR)


def proximal(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum(((p - q) ** 2).sum() for p, q in zip(a, b))


def weighted(losses: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    w = torch.sigmoid(r).squeeze(1)
    return (w * losses).sum() / w.sum().clamp_min(1e-8)


def modules(p: Parts) -> dict[str, nn.Module]:
    return {"reweight": p.rw, "finetune": p.ft, "pretrain": p.pt}


def build_mlodsl(method: str, p: Parts) -> MlodslRunner:
    from mlodsl import Program, problem

    @problem(module=p.rw, optimizer=adam(p.rw), data=p.target_rw)
    def reweight(batch):
        x, y = batch
        return F.cross_entropy(finetune(x), y)

    @problem(module=p.ft, optimizer=adam(p.ft), data=p.target_ft, upper=[reweight], hypergrad=mlodsl_method(method))
    def finetune(batch):
        x, y = batch
        prox = proximal(list(finetune.module.parameters()), list(pretrain.module.parameters()))
        return F.cross_entropy(finetune(x), y) + LAM * prox

    @problem(module=p.pt, optimizer=adam(p.pt), data=p.source, upper=[finetune], hypergrad=mlodsl_method(method))
    def pretrain(batch):
        x, y = batch
        return weighted(F.cross_entropy(pretrain(x), y, reduction="none"), reweight(x))

    return MlodslRunner(Program([reweight, finetune, pretrain]), modules(p))


class Hand:
    """One step of each problem; the reweight step differentiates through finetune, then pretrain."""

    def __init__(self, method: str, p: Parts) -> None:
        self.method, self.p, self.modules = method, p, modules(p)
        self.w, self.v, self.phi = list(p.pt.parameters()), list(p.ft.parameters()), list(p.rw.parameters())
        self.opt_pt, self.opt_ft, self.opt_rw = adam(p.pt), adam(p.ft), adam(p.rw)
        self.source, self.target_ft, self.target_rw = Cycle(p.source), Cycle(p.target_ft), Cycle(p.target_rw)
        self.names = [n for n, _ in p.pt.named_parameters()]
        self.last_pt = self.last_ft = self.snap_pt = self.snap_ft = None

    def pretrain_loss(self, batch, w=None, live_phi: bool = False) -> torch.Tensor:
        x, y = batch
        logits = self.p.pt(x) if w is None else functional_call(self.p.pt, dict(zip(self.names, w)), (x,))
        with torch.set_grad_enabled(live_phi):
            r = self.p.rw(x)
        return weighted(F.cross_entropy(logits, y, reduction="none"), r)

    def finetune_loss(self, batch, v=None, live_w: bool = False) -> torch.Tensor:
        x, y = batch
        params = self.v if v is None else v
        logits = self.p.ft(x) if v is None else functional_call(self.p.ft, dict(zip(self.names, v)), (x,))
        w = self.w if live_w else [t.detach() for t in self.w]
        return F.cross_entropy(logits, y) + LAM * proximal(params, w)

    def run(self, n: int) -> None:
        for _ in range(n):
            self.iteration()

    def iteration(self) -> None:
        batch = self.source.next()
        if self.method == "itd":
            self.snap_pt = hand.snapshot(self.opt_pt, self.w)
        hand.apply(self.opt_pt, self.w, hand.grads(self.pretrain_loss(batch), self.w))
        self.last_pt = batch
        batch = self.target_ft.next()
        if self.method == "itd":
            self.snap_ft = hand.snapshot(self.opt_ft, self.v)
        hand.apply(self.opt_ft, self.v, hand.grads(self.finetune_loss(batch), self.v))
        self.last_ft = batch
        x, y = self.target_rw.next()
        adjoint_v = hand.grads(F.cross_entropy(self.p.ft(x), y), self.v)
        hand.apply(self.opt_rw, self.phi, self.hypergradient(adjoint_v))

    def hypergradient(self, adjoint_v: list[torch.Tensor]) -> list[torch.Tensor]:
        """Top down: through finetune to an adjoint of w*, then through pretrain to φ."""
        kw = dict(lr=LR, k_neumann=NEUMANN_ITERATIONS, k_cg=CG_ITERATIONS, fd_eps=FD_EPS)
        adjoint_w = hand.through(self.method, lambda v: self.finetune_loss(self.last_ft, v, live_w=True),
                                 self.v, self.w, adjoint_v, snap=self.snap_ft, update=hand.update_for(self.opt_ft), **kw)
        return hand.through(self.method, lambda w: self.pretrain_loss(self.last_pt, w, live_phi=True),
                            self.w, self.phi, adjoint_w, snap=self.snap_pt, update=hand.update_for(self.opt_pt), **kw)


def build_betty(method: str, p: Parts) -> BettyRunner:
    from betty.configs import Config, EngineConfig
    from betty.engine import Engine
    from betty.problems import ImplicitProblem

    quiet_betty()

    class Reweight(ImplicitProblem):
        def training_step(self, batch):
            x, y = batch
            return F.cross_entropy(self.finetune(x), y)

    class Finetune(ImplicitProblem):
        def training_step(self, batch):
            x, y = batch
            prox = proximal(list(self.module.parameters()), list(self.pretrain.module.parameters()))
            return F.cross_entropy(self.module(x), y) + LAM * prox

    class Pretrain(ImplicitProblem):
        def training_step(self, batch):
            x, y = batch
            return weighted(F.cross_entropy(self.module(x), y, reduction="none"), self.reweight(x))

    rw = Reweight(name="reweight", module=p.rw, optimizer=adam(p.rw), train_data_loader=p.target_rw,
                  config=Config(retain_graph=True))
    ft = Finetune(name="finetune", module=p.ft, optimizer=adam(p.ft), train_data_loader=p.target_ft,
                  config=betty_config(method, LR, retain_graph=True))
    pt = Pretrain(name="pretrain", module=p.pt, optimizer=adam(p.pt), train_data_loader=p.source,
                  config=betty_config(method, LR))
    engine = Engine(problems=[rw, ft, pt], config=EngineConfig(train_iters=1, strategy="cpu"),
                    dependencies={"u2l": {rw: [pt]}, "l2u": {pt: [ft], ft: [rw]}})
    engine.train()
    return BettyRunner(engine, modules(p))
