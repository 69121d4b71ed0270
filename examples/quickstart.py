"""Quick start: Meta-Weight-Net data reweighting on handwritten digits with 40% label noise.

A classifier learns from noisy labels; a small weight net maps each example's
loss to a weight, and learns (one level up) to weight examples so that the
classifier does well on 100 clean meta examples. The data ships with
scikit-learn (no download). Runs on a CPU in well under a minute:

    python examples/quickstart.py            # MWN vs plain cross-entropy
    python examples/quickstart.py --iterations 50
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mlodsl import Program, problem
from mlodsl.hypergrad import CG


def digits(noise: float, seed: int = 0):
    """Train (noisy labels), 100 clean meta examples, and a clean test set."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    test, meta, train = perm[:500], perm[500:600], perm[600:]
    noisy = y[train].clone()
    flip = torch.rand(len(train), generator=g) < noise
    noisy[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=g)
    return (x[train], noisy), (x[meta], y[meta]), (x[test], y[test])


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def build(train, meta, seed: int = 0) -> Program:
    torch.manual_seed(seed)
    net = mlp()
    wnet = nn.Sequential(nn.Linear(1, 100), nn.ReLU(), nn.Linear(100, 1), nn.Sigmoid())
    train_loader = DataLoader(TensorDataset(*train), batch_size=64, shuffle=True)
    meta_loader = DataLoader(TensorDataset(*meta), batch_size=100)

    @problem(module=wnet, optimizer=torch.optim.Adam(wnet.parameters(), lr=1e-3), data=meta_loader)
    def reweight(batch):
        x, y = batch
        return F.cross_entropy(classifier(x), y)          # reads the classifier's optimum

    @problem(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
             data=train_loader, upper=[reweight], hypergrad=CG(iterations=3))
    def classifier(batch):
        x, y = batch
        losses = F.cross_entropy(classifier(x), y, reduction="none")
        w = reweight(losses.detach()[:, None]).squeeze(1)  # reads the weight net's parameters
        return (w * losses).sum() / w.sum().clamp_min(1e-8)  # normalised, as in MWN

    return Program([reweight, classifier])


def baseline(train, iterations: int, seed: int = 0) -> nn.Module:
    """Plain cross-entropy on the noisy labels: the same classifier, one level."""
    torch.manual_seed(seed)
    net = mlp()
    loader = DataLoader(TensorDataset(*train), batch_size=64, shuffle=True)

    @problem(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), data=loader)
    def plain(batch):
        x, y = batch
        return F.cross_entropy(plain(x), y)

    Program([plain]).run(iterations=iterations)
    return net


@torch.no_grad()
def accuracy(net: nn.Module, data) -> float:
    x, y = data
    return float((net(x).argmax(1) == y).float().mean())


NOISE = 0.4
TRAIN, META, TEST = digits(NOISE)
program = build(TRAIN, META)  # module level, so that `mlodsl graph examples/quickstart.py` can draw it


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1500, help="classifier steps")
    parser.add_argument("--noise", type=float, default=NOISE, help="fraction of training labels resampled")
    args = parser.parse_args(argv)
    train, meta, test = digits(args.noise)
    program = build(train, meta)
    print(program.plan, "\n")
    program.run(iterations=args.iterations)
    results = {"cross-entropy": accuracy(baseline(train, args.iterations), test),
               "meta-weight-net": accuracy(program["classifier"].module, test)}
    for name, acc in results.items():
        print(f"test accuracy, {name:<16} {100 * acc:5.1f}%")
    return results


if __name__ == "__main__":
    main()
