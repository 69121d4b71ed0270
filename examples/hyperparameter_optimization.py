"""Hyperparameter optimization: learn a weight decay for every parameter against validation loss.

Two levels, as in Lorraine et al. (2020), "Optimizing millions of
hyperparameters by implicit differentiation". The lower problem ``classifier``
(an MLP 64-128-10, SGD) fits a small training set (20 digits per class) with an
L2 penalty whose coefficient is a hyperparameter per parameter element; the
upper problem ``decay`` holds their logarithms and minimises the classifier's
cross-entropy on a validation set (10 per class):

    decay      (L2)  min_λ  CE_val(θ*(λ))                               Adam(1e-2), data: val set
    classifier (L1)  θ*(λ) = argmin_θ CE_train(θ) + ½ Σ_i exp(λ_i) θ_i²     SGD(0.1, momentum 0.9)

The hypergradient is −(exp(λ) ⊙ θ) ⊙ H⁻¹ ∇_θ CE_val, the inverse-Hessian
product from ``neumann`` or ``cg`` (one classifier step per decay step), or
reverse mode through the last 5 classifier steps (``itd``). ``global-neumann``
learns one shared coefficient the same way. Baselines: no weight decay
(``none``) and the best global weight decay of a grid {1e-4, 1e-3, 1e-2, 1e-1}
picked on the validation set (``grid``, 4 trainings).

    python examples/hyperparameter_optimization.py
    python examples/hyperparameter_optimization.py --methods none grid neumann cg itd --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits  # noqa: E402

from mlodsl import Program, problem  # noqa: E402
from mlodsl.hypergrad import CG, Neumann, Unrolled  # noqa: E402

METHODS = ("none", "grid", "neumann", "cg", "itd", "global-neumann")
GRID = (1e-4, 1e-3, 1e-2, 1e-1)
HYPERGRADS = {"neumann": (lambda: Neumann(iterations=5), 1), "cg": (lambda: CG(iterations=5, damping=0.1), 1),
              "itd": (Unrolled, 5)}


class Config(NamedTuple):
    iterations: int = 1500
    batch_size: int = 64
    lr: float = 0.1
    hyper_lr: float = 1e-2
    init_decay: float = 1e-3


class Data(NamedTuple):
    train: digits.Data
    val: digits.Data
    test: digits.Data


def data(seed: int) -> Data:
    """20 training and 10 validation images per class; 50 per class for the test."""
    s = digits.split(seed, test_per_class=50, meta_per_class=10)
    rest = digits.split(seed + 1000, test_per_class=20, meta_per_class=0, data=s.train)
    return Data(train=rest.test, val=s.meta, test=s.test)


class LogDecay(nn.Module):
    """λ: a log weight decay for every element of ``net``'s parameters (or one shared, ``shared=True``)."""

    def __init__(self, net: nn.Module, init: float, shared: bool = False) -> None:
        super().__init__()
        shapes = [(1,) if shared else p.shape for p in net.parameters()]
        self.logs = nn.ParameterList(nn.Parameter(torch.full(s, math.log(init))) for s in shapes)

    def forward(self) -> list[torch.Tensor]:
        return [log.exp() for log in self.logs]


def penalty(decays: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> torch.Tensor:
    return 0.5 * sum((d * p * p).sum() for d, p in zip(decays, params))


def tensors(net: nn.Sequential) -> list[torch.Tensor]:
    """The MLP's parameters by attribute, so the loss sees what the runtime binds."""
    return [net[0].weight, net[0].bias, net[2].weight, net[2].bias]


def build(d: Data, method: str, seed: int, cfg: Config) -> Program:
    """The two-level program: log weight decays above the classifier."""
    digits.seeded(seed)
    net = digits.mlp()
    shared = method.startswith("global-")
    make, steps = HYPERGRADS[method.removeprefix("global-")]
    hyper = LogDecay(net, cfg.init_decay, shared)

    @problem(module=hyper, optimizer=torch.optim.Adam(hyper.parameters(), lr=cfg.hyper_lr),
             data=digits.loader(d.val, 100, seed))
    def decay(batch):
        x, y = batch
        return F.cross_entropy(classifier(x), y)                          # reads θ*: lower-to-upper

    @problem(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=0.9),
             data=digits.loader(d.train, cfg.batch_size, seed), upper=[decay], hypergrad=make(), steps=steps)
    def classifier(batch):
        x, y = batch
        return F.cross_entropy(classifier(x), y) + penalty(decay(), tensors(classifier.module))  # reads λ

    return Program([decay, classifier])


def demo() -> Program:
    """The program with Neumann, for ``mlodsl graph examples/hyperparameter_optimization.py:demo``."""
    return build(data(0), "neumann", 0, Config())


def train_fixed(d: Data, weight_decay: float, seed: int, cfg: Config) -> nn.Module:
    """A one-level program with a fixed global weight decay (SGD's own)."""
    digits.seeded(seed)
    net = digits.mlp()

    @problem(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=0.9,
                                                   weight_decay=weight_decay),
             data=digits.loader(d.train, cfg.batch_size, seed))
    def fixed(batch):
        x, y = batch
        return F.cross_entropy(fixed(x), y)

    Program([fixed]).run(iterations=cfg.iterations)
    return net


@torch.no_grad()
def val_loss(net: nn.Module, val: digits.Data) -> float:
    return float(F.cross_entropy(net(val[0]), val[1]))


def train_one(d: Data, method: str, seed: int, cfg: Config) -> tuple[nn.Module, float]:
    """The trained classifier and the weight decay it used (the geometric mean when learned)."""
    if method == "none":
        return train_fixed(d, 0.0, seed, cfg), 0.0
    if method == "grid":
        nets = {wd: train_fixed(d, wd, seed, cfg) for wd in GRID}
        best = min(GRID, key=lambda wd: val_loss(nets[wd], d.val))
        return nets[best], best
    program = build(d, method, seed, cfg)
    program.run(iterations=cfg.iterations)
    logs = torch.cat([t.detach().flatten() for t in program["decay"].module.logs])
    return program["classifier"].module, float(logs.mean().exp())


class Result(NamedTuple):
    method: str
    seed: int
    accuracy: float
    val_loss: float
    decay: float
    seconds: float
    peak_mib: float


def run(method: str, seed: int, cfg: Config) -> Result:
    d = data(seed)
    measured = digits.measure(lambda: train_one(d, method, seed, cfg))
    net, decay = measured.value
    return Result(method, seed, digits.accuracy(net, d.test), val_loss(net, d.val), decay,
                  measured.seconds, measured.peak_mib)


def table(results: Sequence[Result], methods: Sequence[str]) -> str:
    header = ["method", "test acc. (%)", "val loss", "weight decay (geo. mean)", "peak MiB", "time (s)"]
    rows = []
    for m in methods:
        mine = [r for r in results if r.method == m]
        rows.append([m, digits.mean_std([r.accuracy for r in mine]),
                     digits.mean_std([r.val_loss for r in mine], scale=1.0, digits=3),
                     f"{statistics.geometric_mean(r.decay for r in mine):.2g}" if all(r.decay > 0 for r in mine) else "0",
                     *digits.cost_cells([r.peak_mib for r in mine], [r.seconds for r in mine])])
    return digits.markdown(header, rows)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run what the command line asks (one intra-op thread); returns ``results`` and the ``table``."""
    with digits.threads(1):
        return _main(argv)


def _main(argv: Sequence[str] | None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["none", "grid", "neumann"], choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--iterations", type=int, default=Config._field_defaults["iterations"])
    parser.add_argument("--table", action="store_true", help="print only the markdown table")
    args = parser.parse_args(argv)
    cfg = Config(iterations=args.iterations)
    for method in args.methods:                                             # warm-up
        train_one(data(0), method, 0, cfg._replace(iterations=5))
    results = []
    for method in args.methods:
        for seed in args.seeds:
            r = run(method, seed, cfg)
            results.append(r)
            if not args.table:
                print(f"{method:15} seed {seed}  test {100 * r.accuracy:5.1f}%  val loss {r.val_loss:.3f}  "
                      f"decay {r.decay:.2g}  {r.seconds:6.1f}s  {r.peak_mib:6.1f} MiB", flush=True)
    text = table(results, args.methods)
    print(text)
    return {"results": results, "table": text}


if __name__ == "__main__":
    main()
