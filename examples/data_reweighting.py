"""Meta-Weight-Net data reweighting on long-tailed and noisy digits (Betty §5.2, MWN paper).

Two levels. The lower problem ``classifier`` (an MLP 64-128-10, SGD) minimises a
weighted cross-entropy on the training set; each example's weight comes from
the upper problem ``reweight``, a 1-100-1 weight net applied to the example's
(detached) loss. The upper problem minimises the classifier's cross-entropy on
a balanced meta set of 100 clean images (10 per class), differentiating through
the classifier's optimum with the chosen hypergradient method:

    reweight   (L2)  min_φ  CE_meta(θ*(φ))                 Adam(2e-4 × steps), data: meta set
    classifier (L1)  θ*(φ) = argmin_θ Σ R(ℓ_i; φ) ℓ_i(θ) / Σ R(ℓ_i; φ)   SGD(0.1, momentum 0.9)

Training follows the MWN paper's recipe scaled to 2000 classifier steps: the
classifier's learning rate drops ×0.1 at 80% and 90% of training under long
tails and at 90% and 95% under label noise (the paper's epochs 80/90 of 100 and
36/38 of 40). The weight net's Adam learning rate is 2e-4 per classifier step,
so 2e-4 with ``steps=1`` and 1e-3 with ``steps=5``: the weight net moves at the
same pace per classifier step whatever ``steps`` is (at 1e-3 with ``steps=1``
it pushed most weights to zero and the classifier diverged on some seeds).
CG solves the damped system (H + λI) p = v with λ = 1 (``--cg-damping``), as
the runtime's warning advises: the classifier's Hessian is not positive
definite along the way, and undamped CG(3) diverged on some seeds.

Two settings of the MWN paper on scikit-learn's digits (see ``digits.py``):
long-tailed training sets (imbalance factors 10, 50, 100) and balanced ones
with 20% or 40% uniform label noise. Baselines: plain cross-entropy
(``ce``), class-balanced weights ∝ 1/n_c (``cb``), and cross-entropy with the
meta set added to the training data (``ce+meta``). MWN runs as
``mwn-<method>-<steps>`` with method ``fd``, ``fdp``, ``neumann``, ``cg`` or
``itd`` and ``steps`` classifier steps per weight-net step. ``fd`` is
``FiniteDifference()``, which gives the weight net's input ``losses.detach()``
its value at θ in both perturbed evaluations (as autograd treats a detached
value); ``fdp`` is the plain formula (``FiniteDifference(hold_detached=False)``,
DARTS' and Betty's), which re-evaluates the loss at θ ± εv, where that input
moves with θ, so it also differentiates the path the loss detaches
(``bench/fd_detach.py``). ``cmwn-<method>-<steps>`` is a
class-aware variant whose weight net also sees the label (11-100-1), and
``--augment`` translates training images by up to one pixel.

    python examples/data_reweighting.py                                  # 40% noise, CE vs MWN
    python examples/data_reweighting.py --settings lt50 --methods ce cb mwn-neumann-1
    python examples/data_reweighting.py --table --seeds 0 1 2            # the full table
"""

from __future__ import annotations

import argparse
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
from mlodsl.hypergrad import CG, FiniteDifference, Neumann, Unrolled  # noqa: E402

SETTINGS = {"lt10": ("long_tail", 10.0), "lt50": ("long_tail", 50.0), "lt100": ("long_tail", 100.0),
            "noise20": ("noise", 0.2), "noise40": ("noise", 0.4)}
# where the classifier's learning rate drops ×0.1, as fractions of training: the MWN paper's
# schedules (long tails: epochs 80 and 90 of 100; label noise: epochs 36 and 38 of 40)
MILESTONES = {"long_tail": (0.8, 0.9), "noise": (0.9, 0.95)}
META_LR_PER_STEP = 2e-4  # the weight net's Adam lr per classifier step: steps × this per weight-net step
BASELINES = ("ce", "cb", "ce+meta")
MWN = tuple(f"mwn-{m}-{s}" for s in (1, 5) for m in ("fd", "fdp", "neumann", "cg", "itd"))
METHODS = BASELINES + MWN
HYPERGRADS = {"fd": lambda cfg: FiniteDifference(), "fdp": lambda cfg: FiniteDifference(hold_detached=False),
              "neumann": lambda cfg: Neumann(iterations=3),
              "cg": lambda cfg: CG(iterations=3, damping=cfg.cg_damping), "itd": lambda cfg: Unrolled()}


class Config(NamedTuple):
    iterations: int = 2000
    batch_size: int = 64
    lr: float = 0.1
    meta_lr: float | None = None  # None: META_LR_PER_STEP × steps
    augment: bool = False
    milestones: tuple[float, float] = MILESTONES["noise"]
    cg_damping: float = 1.0


def for_setting(cfg: Config, setting: str) -> Config:
    """``cfg`` with the learning-rate schedule of ``setting``'s kind (``MILESTONES``)."""
    return cfg._replace(milestones=MILESTONES[SETTINGS[setting][0]])


def data(setting: str, seed: int) -> digits.Split:
    """The setting's training set (long-tailed or noisy), the 100-image meta set, the test set."""
    kind, level = SETTINGS[setting]
    s = digits.split(seed)
    train = digits.long_tail(s.train, level, seed) if kind == "long_tail" else \
        digits.label_noise(s.train, level, seed)
    return s._replace(train=train)


def classifier_optimizer(net: nn.Module, cfg: Config) -> tuple[torch.optim.Optimizer, object]:
    """SGD with momentum and weight decay; the learning rate drops ×0.1 at ``cfg.milestones``."""
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    milestones = [int(m * cfg.iterations) for m in cfg.milestones]
    return opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.1)


def train_loader(train: digits.Data, seed: int, cfg: Config):
    batches = digits.loader(train, cfg.batch_size, seed)
    return digits.Jittered(batches) if cfg.augment else batches


class WeightNet(nn.Module):
    """R(ℓ; φ) ∈ (0, 1): 1-100-1 on the loss, or 11-100-1 on the loss and the one-hot label."""

    def __init__(self, class_aware: bool = False) -> None:
        super().__init__()
        self.class_aware = class_aware
        width = 1 + (digits.CLASSES if class_aware else 0)
        self.net = nn.Sequential(nn.Linear(width, 100), nn.ReLU(), nn.Linear(100, 1), nn.Sigmoid())

    def forward(self, losses: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        feats = losses[:, None]
        if self.class_aware:
            feats = torch.cat([feats, F.one_hot(labels, digits.CLASSES).float()], dim=1)
        return self.net(feats).squeeze(1)


def build(split: digits.Split, method: str, steps: int, seed: int, cfg: Config,
          class_aware: bool = False) -> Program:
    """The two-level MWN program on ``split`` with hypergradient ``method`` and ``steps``."""
    digits.seeded(seed)
    net, wnet = digits.mlp(), WeightNet(class_aware)
    opt, sched = classifier_optimizer(net, cfg)

    meta_lr = cfg.meta_lr if cfg.meta_lr is not None else META_LR_PER_STEP * steps
    @problem(module=wnet, optimizer=torch.optim.Adam(wnet.parameters(), lr=meta_lr),
             data=digits.loader(split.meta, 100, seed))
    def reweight(batch):
        x, y = batch
        return F.cross_entropy(classifier(x), y)                       # reads θ*: lower-to-upper

    @problem(module=net, optimizer=opt, scheduler=sched, data=train_loader(split.train, seed, cfg),
             upper=[reweight], hypergrad=HYPERGRADS[method](cfg), steps=steps)
    def classifier(batch):
        x, y = batch
        losses = F.cross_entropy(classifier(x), y, reduction="none")
        w = reweight(losses.detach(), y)                               # reads φ: upper-to-lower
        return (w * losses).sum() / w.sum().clamp_min(1e-8)            # normalised, as in MWN

    return Program([reweight, classifier])


def demo() -> Program:
    """The program at its default setting, for ``mlodsl graph examples/data_reweighting.py:demo``."""
    return build(data("noise40", 0), "neumann", 1, 0, Config())


def train_plain(train: digits.Data, seed: int, cfg: Config, class_weights: torch.Tensor | None = None) -> nn.Module:
    """A one-level program: the same classifier and schedule, (class-weighted) cross-entropy."""
    digits.seeded(seed)
    net = digits.mlp()
    opt, sched = classifier_optimizer(net, cfg)

    @problem(module=net, optimizer=opt, scheduler=sched, data=train_loader(train, seed, cfg))
    def plain(batch):
        x, y = batch
        return F.cross_entropy(plain(x), y, weight=class_weights)

    Program([plain]).run(iterations=cfg.iterations)
    return net


def class_balanced(train: digits.Data) -> torch.Tensor:
    """Weights ∝ 1/n_c, scaled to average 1 over the classes."""
    counts = torch.tensor(digits.class_counts(train), dtype=torch.float32).clamp_min(1)
    w = 1.0 / counts
    return w * len(w) / w.sum()


def parse(method: str) -> tuple[str, str, int]:
    """``"mwn-neumann-5"`` → ``("mwn", "neumann", 5)``."""
    family, hypergrad, steps = method.split("-")
    if family not in ("mwn", "cmwn") or hypergrad not in HYPERGRADS:
        raise ValueError(f"unknown method {method!r}: use {', '.join(METHODS)} or cmwn-<method>-<steps>")
    return family, hypergrad, int(steps)


def train_one(split: digits.Split, method: str, seed: int, cfg: Config) -> tuple[nn.Module, Program | None]:
    if method == "ce":
        return train_plain(split.train, seed, cfg), None
    if method == "cb":
        return train_plain(split.train, seed, cfg, class_balanced(split.train)), None
    if method == "ce+meta":
        both = tuple(torch.cat([a, b]) for a, b in zip(split.train, split.meta))
        return train_plain(both, seed, cfg), None
    family, hypergrad, steps = parse(method)
    program = build(split, hypergrad, steps, seed, cfg, class_aware=family == "cmwn")
    program.run(iterations=cfg.iterations)
    return program["classifier"].module, program


class Result(NamedTuple):
    setting: str
    method: str
    seed: int
    accuracy: float
    seconds: float
    peak_mib: float


def run(setting: str, method: str, seed: int, cfg: Config) -> Result:
    split, cfg = data(setting, seed), for_setting(cfg, setting)
    measured = digits.measure(lambda: train_one(split, method, seed, cfg))
    net, _ = measured.value
    return Result(setting, method, seed, digits.accuracy(net, split.test), measured.seconds, measured.peak_mib)


def warm_up(setting: str, methods: Sequence[str], cfg: Config) -> None:
    """A few iterations of each method first, so one-off allocations do not count against the first."""
    split = data(setting, 0)
    for method in methods:
        train_one(split, method, 0, cfg._replace(iterations=4))


def table(results: Sequence[Result], settings: Sequence[str], methods: Sequence[str]) -> str:
    """Test accuracy (%) mean ± std over seeds per setting; time and memory averaged over all settings."""
    header = ["method", *settings, "peak MiB", "time (s)"]
    rows = []
    for m in methods:
        mine = [r for r in results if r.method == m]
        cells = [digits.mean_std([r.accuracy for r in mine if r.setting == s]) for s in settings]
        rows.append([m, *cells, *digits.cost_cells([r.peak_mib for r in mine], [r.seconds for r in mine])])
    return digits.markdown(header, rows)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run what the command line asks (one intra-op thread); returns ``results`` and the ``table``."""
    with digits.threads(1):
        return _main(argv)


def _main(argv: Sequence[str] | None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["noise40"], choices=list(SETTINGS))
    parser.add_argument("--methods", nargs="+", default=["ce", "mwn-neumann-1"],
                        help=f"from {', '.join(METHODS)}, or cmwn-<method>-<steps> (class-aware weight net)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--iterations", type=int, default=Config._field_defaults["iterations"], help="classifier steps")
    parser.add_argument("--meta-lr", type=float, default=None,
                        help=f"weight net's Adam lr (default: {META_LR_PER_STEP:g} × steps)")
    parser.add_argument("--cg-damping", type=float, default=Config._field_defaults["cg_damping"],
                        help="damping λ of CG: solves (H + λI) p = v")
    parser.add_argument("--augment", action="store_true", help="random ±1 pixel translations of training images")
    parser.add_argument("--table", action="store_true", help="print only the markdown table")
    args = parser.parse_args(argv)
    for m in args.methods:
        if m not in BASELINES:
            parse(m)
    cfg = Config(iterations=args.iterations, meta_lr=args.meta_lr, augment=args.augment, cg_damping=args.cg_damping)
    warm_up(args.settings[0], args.methods, cfg)
    results = []
    for setting in args.settings:
        for method in args.methods:
            for seed in args.seeds:
                r = run(setting, method, seed, cfg)
                results.append(r)
                if not args.table:
                    print(f"{setting:8} {method:16} seed {seed}  test {100 * r.accuracy:5.1f}%  "
                          f"{r.seconds:6.1f}s  {r.peak_mib:6.1f} MiB", flush=True)
    text = table(results, args.settings, args.methods)
    print(text)
    return {"results": results, "table": text}


if __name__ == "__main__":
    main()
