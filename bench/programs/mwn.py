"""Meta-Weight-Net (Shu et al. 2019; Betty §5.2) on the digits: a bilevel program with an MLP.

    reweight   (upper)  min_φ  CE_meta(w*(φ))                                    Adam(1e-3), 100 meta images
    classifier (lower)  w*(φ) = argmin_w Σ R(ℓ_i(w); φ) ℓ_i(w) / Σ R(ℓ_i(w); φ)   SGD(0.1, momentum 0.9)

The classifier is an MLP 64-``hidden``-10, the weight net R an MLP 1-100-1
with a sigmoid on the detached per-example loss (the quick start's program).
One outer iteration: one classifier step, then one reweight step whose
hypergradient passes through the classifier with the chosen method.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from bench import hand
from bench.common import CG_ITERATIONS, FD_EPS, NEUMANN_ITERATIONS, Batches, Cycle, NotExpressible, seeded, split

LR, META_LR, MOMENTUM = 0.1, 1e-3, 0.9


class Sizes(NamedTuple):
    hidden: int = 128
    batch: int = 64
    meta: int = 100     # meta images, one batch


class Parts(NamedTuple):
    net: nn.Module
    wnet: nn.Module
    train: Batches
    meta: Batches


def parts(sizes: Sizes, seed: int, dtype: torch.dtype) -> Parts:
    """The same modules (from ``seed``) and data streams for every side."""
    meta, train = split(seed, (sizes.meta, -1))
    seeded(seed)
    net = nn.Sequential(nn.Linear(64, sizes.hidden), nn.ReLU(), nn.Linear(sizes.hidden, 10)).to(dtype)
    wnet = nn.Sequential(nn.Linear(1, 100), nn.ReLU(), nn.Linear(100, 1), nn.Sigmoid()).to(dtype)
    return Parts(net, wnet, Batches(train, sizes.batch, seed + 1, dtype), Batches(meta, sizes.meta, seed + 2, dtype))


def weighted(losses: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (w * losses).sum() / w.sum().clamp_min(1e-8)


def build(side: str, method: str, sizes: Sizes = Sizes(), seed: int = 0, dtype: torch.dtype = torch.float32,
          device: str | None = None, **program):
    """One side of the benchmark. ``device`` moves the modules and the data there first (the
    GPU check, ``bench/gpu.py``); ``program`` are keyword arguments of mlodsl's ``Program``."""
    p = parts(sizes, seed, dtype)
    if device is not None:
        p = on_device(p, torch.device(device))
    if side == "mlodsl":
        return build_mlodsl(method, p, **program)
    return {"hand": Hand, "betty": build_betty}[side](method, p)


def on_device(p: Parts, device: torch.device) -> Parts:
    """The same parts with modules and data on ``device`` (before any optimizer exists)."""
    for batches in (p.train, p.meta):
        batches.x, batches.y = batches.x.to(device), batches.y.to(device)
    return p._replace(net=p.net.to(device), wnet=p.wnet.to(device))


# -- mlodsl ----------------------------------------------------------------------------------
class MlodslRunner:
    def __init__(self, program, modules) -> None:
        self.program, self.modules = program, modules

    def run(self, n: int) -> None:
        self.program.run(iterations=n, progress=False)


def mlodsl_method(method: str):
    from mlodsl.hypergrad import CG, FiniteDifference, Neumann, Unrolled

    # fd: the plain DARTS formula (every value re-evaluated at θ ± εv), as the hand-written loop and
    # Betty compute it; mlodsl's default would also hold what the loss detaches (one more forward)
    return {"fd": lambda: FiniteDifference(eps=FD_EPS, hold_detached=False), "neumann": lambda: Neumann(iterations=NEUMANN_ITERATIONS),
            "cg": lambda: CG(iterations=CG_ITERATIONS), "itd": Unrolled}[method]()


def build_mlodsl(method: str, p: Parts, **program) -> MlodslRunner:
    from mlodsl import Program, problem

    @problem(module=p.wnet, optimizer=torch.optim.Adam(p.wnet.parameters(), lr=META_LR), data=p.meta)
    def reweight(batch):
        x, y = batch
        return F.cross_entropy(classifier(x), y)

    @problem(module=p.net, optimizer=torch.optim.SGD(p.net.parameters(), lr=LR, momentum=MOMENTUM),
             data=p.train, upper=[reweight], hypergrad=mlodsl_method(method))
    def classifier(batch):
        x, y = batch
        losses = F.cross_entropy(classifier(x), y, reduction="none")
        return weighted(losses, reweight(losses.detach()[:, None]).squeeze(1))

    return MlodslRunner(Program([reweight, classifier], **program), {"reweight": p.wnet, "classifier": p.net})


# -- hand-written ----------------------------------------------------------------------------
class Hand(hand.Bilevel):
    """The loop a researcher writes for MWN with this hypergradient method."""

    def __init__(self, method: str, p: Parts) -> None:
        theta, phi = list(p.net.parameters()), list(p.wnet.parameters())
        super().__init__(method, theta, phi, torch.optim.SGD(theta, lr=LR, momentum=MOMENTUM),
                         torch.optim.Adam(phi, lr=META_LR), Cycle(p.train), Cycle(p.meta),
                         neumann_iterations=NEUMANN_ITERATIONS, cg_iterations=CG_ITERATIONS, fd_eps=FD_EPS)
        self.net, self.wnet = p.net, p.wnet
        self.modules = {"reweight": p.wnet, "classifier": p.net}
        self.names = [n for n, _ in p.net.named_parameters()]

    def lower_loss(self, batch, theta=None, live_phi: bool = False) -> torch.Tensor:
        x, y = batch
        logits = self.net(x) if theta is None else functional_call(self.net, dict(zip(self.names, theta)), (x,))
        losses = F.cross_entropy(logits, y, reduction="none")
        with torch.set_grad_enabled(live_phi):
            w = self.wnet(losses.detach()[:, None]).squeeze(1)
        return weighted(losses, w)

    def upper_loss(self, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)


# -- Betty -----------------------------------------------------------------------------------
def betty_config(method: str, lr: float, **kw):
    """Betty's Config for a lower problem differentiated with ``method`` (n/a: NotExpressible)."""
    from betty.configs import Config

    if method == "fd":
        return Config(type="darts", darts_alpha=FD_EPS, **kw)
    if method == "neumann":
        return Config(type="neumann", neumann_iterations=NEUMANN_ITERATIONS, neumann_alpha=lr, **kw)
    if method == "cg":
        return Config(type="cg", cg_iterations=CG_ITERATIONS, **kw)
    raise NotExpressible("Betty 0.2.1's hypergradient types for ImplicitProblem are darts, sama, neumann "
                         "and cg; its IterativeProblem (for ITD) fails when the Engine initialises it "
                         "(KeyError: 'params' in IterativeProblem.initialize_optimizer_state)")


class BettyRunner:
    def __init__(self, engine, modules) -> None:
        self.engine, self.modules = engine, modules

    def run(self, n: int) -> None:
        """Betty's ``Engine.run`` loop body, without its logging and validation."""
        for _ in range(n):
            self.engine.global_step += 1
            self.engine.train_step()


def quiet_betty() -> None:
    from betty.logging.logger_base import get_logger

    get_logger().setLevel("WARNING")


def build_betty(method: str, p: Parts) -> BettyRunner:
    from betty.configs import Config, EngineConfig
    from betty.engine import Engine
    from betty.problems import ImplicitProblem

    quiet_betty()
    lower = betty_config(method, LR)

    class Reweight(ImplicitProblem):
        def training_step(self, batch):
            x, y = batch
            return F.cross_entropy(self.classifier(x), y)

    class Classifier(ImplicitProblem):
        def training_step(self, batch):
            x, y = batch
            losses = F.cross_entropy(self.module(x), y, reduction="none")
            return weighted(losses, self.reweight(losses.detach()[:, None]).squeeze(1))

    rw = Reweight(name="reweight", module=p.wnet, optimizer=torch.optim.Adam(p.wnet.parameters(), lr=META_LR),
                  train_data_loader=p.meta, config=Config(retain_graph=True))
    cl = Classifier(name="classifier", module=p.net,
                    optimizer=torch.optim.SGD(p.net.parameters(), lr=LR, momentum=MOMENTUM),
                    train_data_loader=p.train, config=lower)
    engine = Engine(problems=[rw, cl], config=EngineConfig(train_iters=1, strategy="cpu"),
                    dependencies={"u2l": {rw: [cl]}, "l2u": {cl: [rw]}})
    engine.train()
    return BettyRunner(engine, {"reweight": p.wnet, "classifier": p.net})
