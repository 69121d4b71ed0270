"""DARTS-style differentiable architecture search on 8×8 digits (Betty §5.1, DARTS).

Two levels. A one-cell supernet: a 3×3 convolution stem (8 channels), then a
cell of three nodes in which every node sums a *mixed operation* over each
earlier state (6 edges; each edge mixes 7 candidate operations with softmax
weights), then 2×2 average pooling and a linear classifier. The architecture
weights α (6 × 7, initialised to zero) are the upper problem; the supernet's
weights w are the lower problem:

    architecture (L2)  min_α  CE_val(w*(α), α)          Adam(3e-3, betas (0.5, 0.999)), data: val half
    classifier   (L1)  w*(α) = argmin_w CE_train(w, α)  SGD(0.05, momentum 0.9, cosine, clip 5), data: train half

``first_order`` is DARTS' first-order approximation (the architecture sees only
its direct gradient); ``fd`` is DARTS' second-order finite-difference
approximation, here at the lower problem's current (unrolled) weights as in
Betty, so ``steps`` 3 means three classifier steps per architecture step.

After the search the discrete architecture is derived as in DARTS (each node
keeps its two strongest incoming edges, each edge its strongest operation other
than ``none``) and trained from scratch on train + val; its test accuracy is
reported. Random search samples architectures from the same space, trains each
on the train half, picks the best on the val half and retrains it the same way.

    python examples/architecture_search.py                       # fd, steps 1
    python examples/architecture_search.py --methods first_order-1 fd-3 random --seeds 0 1 2
"""

from __future__ import annotations

import argparse
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

C = 8                                              # channels
NODES = 3                                          # intermediate nodes of the cell
EDGES = [(i, j) for j in range(1, NODES + 1) for i in range(j)]   # state i -> node j; state 0 is the stem
OPS = ("none", "skip", "conv3x3", "conv5x5", "dil_conv3x3", "avg_pool3x3", "max_pool3x3")
CLIP = 5.0                                         # gradient-norm clipping of the weights, as in DARTS
METHODS = ("first_order-1", "first_order-3", "fd-1", "fd-3", "random")
Genotype = tuple[tuple[int, str], ...]             # per kept edge: (edge index, op)


def make_op(name: str) -> nn.Module:
    convs = {"conv3x3": dict(kernel_size=3, padding=1), "conv5x5": dict(kernel_size=5, padding=2),
             "dil_conv3x3": dict(kernel_size=3, padding=2, dilation=2)}
    if name in convs:
        return nn.Sequential(nn.ReLU(), nn.Conv2d(C, C, **convs[name]))
    if name == "avg_pool3x3":
        return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
    if name == "max_pool3x3":
        return nn.MaxPool2d(3, stride=1, padding=1)
    return nn.Identity()   # skip; "none" is handled by the callers (it contributes zero)


class Head(nn.Module):
    """Stem before the cell, pooling and a linear classifier after it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, C, 3, padding=1)
        self.fc = nn.Linear(NODES * C * 16, digits.CLASSES)

    def begin(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x.reshape(-1, 1, 8, 8))

    def end(self, nodes: list[torch.Tensor]) -> torch.Tensor:
        return self.fc(F.avg_pool2d(torch.cat(nodes, dim=1), 2).flatten(1))


class Supernet(nn.Module):
    """Every edge computes all operations and mixes them with the architecture's weights."""

    def __init__(self) -> None:
        super().__init__()
        self.head = Head()
        self.edges = nn.ModuleList(nn.ModuleList(make_op(o) for o in OPS) for _ in EDGES)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        states = [self.head.begin(x)]
        for j in range(1, NODES + 1):
            states.append(sum(self._mixed(e, states[i], weights[e]) for e, (i, jj) in enumerate(EDGES) if jj == j))
        return self.head.end(states[1:])

    def _mixed(self, e: int, s: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return sum(w[k] * op(s) for k, op in enumerate(self.edges[e]) if OPS[k] != "none")


class Alphas(nn.Module):
    """The architecture: one logit per (edge, operation); ``forward()`` gives the softmax weights."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(len(EDGES), len(OPS)))

    def forward(self) -> torch.Tensor:
        return F.softmax(self.alpha, dim=-1)


class Derived(nn.Module):
    """A discrete architecture: each node sums its kept edges' single operations."""

    def __init__(self, genotype: Genotype) -> None:
        super().__init__()
        self.genotype = genotype
        self.head = Head()
        self.ops = nn.ModuleList(make_op(op) for _, op in genotype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        states = [self.head.begin(x)]
        for j in range(1, NODES + 1):
            terms = [op(states[EDGES[e][0]]) for (e, _), op in zip(self.genotype, self.ops) if EDGES[e][1] == j]
            states.append(sum(terms))
        return self.head.end(states[1:])


def derive(weights: torch.Tensor) -> Genotype:
    """DARTS: per node, the two edges with the strongest non-``none`` op; per edge, that op."""
    keep = []
    live = [k for k, o in enumerate(OPS) if o != "none"]
    for j in range(1, NODES + 1):
        incoming = [e for e, (_, jj) in enumerate(EDGES) if jj == j]
        strength = {e: float(weights[e, live].max()) for e in incoming}
        for e in sorted(incoming, key=lambda e: -strength[e])[:2]:
            keep.append((e, OPS[live[int(weights[e, live].argmax())]]))
    return tuple(sorted(keep))


def random_genotype(g: torch.Generator) -> Genotype:
    live = [o for o in OPS if o != "none"]
    keep = []
    for j in range(1, NODES + 1):
        incoming = [e for e, (_, jj) in enumerate(EDGES) if jj == j]
        chosen = torch.randperm(len(incoming), generator=g)[:2].tolist()
        keep += [(incoming[c], live[int(torch.randint(len(live), (1,), generator=g))]) for c in chosen]
    return tuple(sorted(keep))


class Config(NamedTuple):
    search_iterations: int = 300
    train_iterations: int = 600
    random_candidates: int = 4
    batch_size: int = 64


class Data(NamedTuple):
    train: digits.Data
    val: digits.Data
    test: digits.Data


def data(seed: int) -> Data:
    """Test: 50 per class; the other 1297 images split in half (lower: train, upper: val)."""
    s = digits.split(seed, meta_per_class=0)
    x, y = s.train
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    a, b = perm[: len(y) // 2], perm[len(y) // 2:]
    return Data(train=(x[a], y[a]), val=(x[b], y[b]), test=s.test)


def sgd(module: nn.Module, iterations: int, lr: float = 0.05) -> tuple[torch.optim.Optimizer, object]:
    """SGD with momentum; cosine annealing of the learning rate to 1e-3 over ``iterations`` steps."""
    opt = torch.optim.SGD(module.parameters(), lr=lr, momentum=0.9, weight_decay=3e-4)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iterations, eta_min=1e-3)


def build(d: Data, hypergrad: str, steps: int, seed: int, cfg: Config) -> Program:
    """The search program: architecture α above the supernet's weights."""
    digits.seeded(seed)
    net, arch = Supernet(), Alphas()
    opt, sched = sgd(net, cfg.search_iterations)

    @problem(module=arch, optimizer=torch.optim.Adam(arch.parameters(), lr=3e-3, betas=(0.5, 0.999),
                                                     weight_decay=1e-3),
             data=digits.loader(d.val, cfg.batch_size, seed + 1))
    def architecture(batch):
        x, y = batch
        return F.cross_entropy(classifier(x, architecture()), y)    # reads w*(α) and α

    @problem(module=net, optimizer=opt, scheduler=sched, data=digits.loader(d.train, cfg.batch_size, seed),
             upper=[architecture], hypergrad=hypergrad, steps=steps, clip_grad_norm=CLIP)
    def classifier(batch):
        x, y = batch
        return F.cross_entropy(classifier(x, architecture()), y)    # reads α: upper-to-lower

    return Program([architecture, classifier])


def demo() -> Program:
    """The search program, for ``mlodsl graph examples/architecture_search.py:demo``."""
    return build(data(0), "fd", 1, 0, Config())


def train_derived(genotype: Genotype, train: digits.Data, seed: int, iterations: int, batch_size: int) -> nn.Module:
    """Train a discrete architecture from scratch: a one-level program."""
    digits.seeded(seed)
    net = Derived(genotype)
    opt, sched = sgd(net, iterations)

    @problem(module=net, optimizer=opt, scheduler=sched, data=digits.loader(train, batch_size, seed),
             clip_grad_norm=CLIP)
    def final(batch):
        x, y = batch
        return F.cross_entropy(final(x), y)

    Program([final]).run(iterations=iterations)
    return net


def join(a: digits.Data, b: digits.Data) -> digits.Data:
    return torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])


def search(d: Data, method: str, seed: int, cfg: Config) -> Genotype:
    if method == "random":
        g = torch.Generator().manual_seed(seed)
        candidates = [random_genotype(g) for _ in range(cfg.random_candidates)]
        scores = [digits.accuracy(train_derived(c, d.train, seed, cfg.search_iterations, cfg.batch_size), d.val)
                  for c in candidates]
        return candidates[max(range(len(scores)), key=scores.__getitem__)]
    hypergrad, steps = method.rsplit("-", 1)
    program = build(d, hypergrad, int(steps), seed, cfg)
    program.run(iterations=cfg.search_iterations)
    with torch.no_grad():
        return derive(program["architecture"].module())


class Result(NamedTuple):
    method: str
    seed: int
    accuracy: float
    params: int
    genotype: Genotype
    search_seconds: float
    search_peak_mib: float


def run(method: str, seed: int, cfg: Config) -> Result:
    d = data(seed)
    measured = digits.measure(lambda: search(d, method, seed, cfg))
    genotype = measured.value
    net = train_derived(genotype, join(d.train, d.val), seed, cfg.train_iterations, cfg.batch_size)
    params = sum(p.numel() for p in net.parameters())
    return Result(method, seed, digits.accuracy(net, d.test), params, genotype,
                  measured.seconds, measured.peak_mib)


def describe(genotype: Genotype) -> str:
    return ", ".join(f"{EDGES[e][0]}→{EDGES[e][1]} {op}" for e, op in genotype)


def table(results: Sequence[Result], methods: Sequence[str]) -> str:
    header = ["method", "test acc. (%)", "params", "search peak MiB", "search time (s)"]
    rows = []
    for m in methods:
        mine = [r for r in results if r.method == m]
        rows.append([m, digits.mean_std([r.accuracy for r in mine]), f"{statistics.fmean(r.params for r in mine):.0f}",
                     *digits.cost_cells([r.search_peak_mib for r in mine], [r.search_seconds for r in mine])])
    return digits.markdown(header, rows)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run what the command line asks (one intra-op thread); returns ``results`` and the ``table``."""
    with digits.threads(1):
        return _main(argv)


def _main(argv: Sequence[str] | None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["fd-1"], choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--search-iterations", type=int, default=Config._field_defaults["search_iterations"])
    parser.add_argument("--train-iterations", type=int, default=Config._field_defaults["train_iterations"])
    parser.add_argument("--random-candidates", type=int, default=Config._field_defaults["random_candidates"])
    parser.add_argument("--table", action="store_true", help="print only the markdown table")
    args = parser.parse_args(argv)
    cfg = Config(args.search_iterations, args.train_iterations, args.random_candidates)
    search(data(0), args.methods[0], 0, cfg._replace(search_iterations=2, random_candidates=1))  # warm-up
    results = []
    for method in args.methods:
        for seed in args.seeds:
            r = run(method, seed, cfg)
            results.append(r)
            if not args.table:
                print(f"{method:14} seed {seed}  test {100 * r.accuracy:5.1f}%  params {r.params}  "
                      f"search {r.search_seconds:6.1f}s {r.search_peak_mib:6.1f} MiB  [{describe(r.genotype)}]",
                      flush=True)
    text = table(results, args.methods)
    print(text)
    return {"results": results, "table": text}


if __name__ == "__main__":
    main()
