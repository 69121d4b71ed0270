"""Domain adaptation by pretraining, finetuning and reweighting: a trilevel program (Betty §5.3).

Source domain: 1247 digits, each rotated by a quarter turn k = i mod 4 (so one
source image in four is upright-rotated-90° like the target, the others are
not). Target domain: digits rotated by 90° and blurred (3×3 binomial), with
only 5 labelled images per class for training and 500 for testing. Domains
are built from disjoint images by deterministic shifts (``digits.shift``).

Three levels, as in the paper's Listing 5:

    reweight (L3)  min_φ  CE_target(v*(w*(φ)))                        data: target train
    finetune (L2)  v*(w) = argmin_v CE_target(v) + λ‖v_body − w_body‖²   data: target train
    pretrain (L1)  w*(φ) = argmin_w Σ R(x_i; φ) ℓ_i(w) / Σ R(x_i; φ)       data: source

``pretrain`` and ``finetune`` are MLPs 64-128-10 (Adam 1e-3); the proximal
term ties the finetuned body (first layer) to the pretrained one (λ = 1; the
output layer is free, as the paper leaves its ``fc`` out). ``reweight`` is an
MLP 64-32-1 on the source image with a sigmoid, R(x; φ) ∈ (0, 1). The
hypergradient of ``reweight`` passes through ``finetune`` and then
``pretrain``, each with the chosen method (the paper uses finite differences).

Baselines: ``target-only`` (the finetune network trained on the 50 target
images alone) and ``pretrain-finetune``, the two-level program without the
reweighting level. The table also reports the mean weight the reweighting
network gives to the rotated-by-90° quarter of the source and to the rest.

    python examples/domain_adaptation.py
    python examples/domain_adaptation.py --methods target-only pretrain-finetune reweight-fd --seeds 0 1 2
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
from mlodsl.hypergrad import FiniteDifference, Neumann  # noqa: E402

METHODS = ("target-only", "pretrain-finetune", "reweight-fd", "reweight-neumann")
HYPERGRADS = {"fd": FiniteDifference, "neumann": lambda: Neumann(iterations=3)}
TARGET_SHIFT = ("rot90", "blur")


class Config(NamedTuple):
    iterations: int = 1000
    batch_size: int = 64
    lam: float = 1.0
    lr: float = 1e-3
    rw_lr: float = 1e-3


class Data(NamedTuple):
    source: digits.Data
    turns: torch.Tensor        # quarter turns of each source image (0..3)
    target_train: digits.Data
    target_test: digits.Data


def data(seed: int) -> Data:
    """Disjoint images: 5 + 50 per class for the target (train, test), the rest for the source."""
    s = digits.split(seed, test_per_class=50, meta_per_class=5)
    x, y = s.train
    turns = torch.arange(len(y)) % 4
    source = torch.stack([digits.rotate(x[i:i + 1], int(k))[0] for i, k in enumerate(turns)])
    return Data(source=(source, y), turns=turns,
                target_train=(digits.shift(s.meta[0], *TARGET_SHIFT), s.meta[1]),
                target_test=(digits.shift(s.test[0], *TARGET_SHIFT), s.test[1]))


def body(net: nn.Module) -> list[torch.Tensor]:
    """The parameters the proximal term ties: the first layer (``net[2]`` is the output layer)."""
    return [net[0].weight, net[0].bias]


def proximal(a: nn.Module, b: nn.Module) -> torch.Tensor:
    return sum(((p - q) ** 2).sum() for p, q in zip(body(a), body(b)))


def adam(module: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    return torch.optim.Adam(module.parameters(), lr=cfg.lr)


def build(d: Data, method: str | None, seed: int, cfg: Config) -> Program:
    """The trilevel program (``method``: the hypergradient of pretrain and finetune), or the
    two-level pretrain → finetune program when ``method`` is None."""
    digits.seeded(seed)
    pt_net, ft_net = digits.mlp(), digits.mlp()
    target = digits.loader(d.target_train, cfg.batch_size, seed)
    source = digits.loader(d.source, cfg.batch_size, seed + 1)
    if method is None:
        return _two_level(pt_net, ft_net, source, target, cfg)
    rw_net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1))

    @problem(module=rw_net, optimizer=torch.optim.Adam(rw_net.parameters(), lr=cfg.rw_lr), data=target)
    def reweight(batch):
        x, y = batch
        return F.cross_entropy(finetune(x), y)                        # reads v*: lower-to-upper

    @problem(module=ft_net, optimizer=adam(ft_net, cfg), data=target, upper=[reweight],
             hypergrad=HYPERGRADS[method]())
    def finetune(batch):
        x, y = batch
        return F.cross_entropy(finetune(x), y) + cfg.lam * proximal(finetune.module, pretrain.module)  # reads w*

    @problem(module=pt_net, optimizer=adam(pt_net, cfg), data=source, upper=[finetune],
             hypergrad=HYPERGRADS[method]())
    def pretrain(batch):
        x, y = batch
        losses = F.cross_entropy(pretrain(x), y, reduction="none")
        w = torch.sigmoid(reweight(x)).squeeze(1)                     # reads φ: upper-to-lower
        return (w * losses).sum() / w.sum().clamp_min(1e-8)

    return Program([reweight, finetune, pretrain])


def demo() -> Program:
    """The trilevel program, for ``mlodsl graph examples/domain_adaptation.py:demo``."""
    return build(data(0), "fd", 0, Config())


def _two_level(pt_net: nn.Module, ft_net: nn.Module, source, target, cfg: Config) -> Program:
    @problem(module=ft_net, optimizer=adam(ft_net, cfg), data=target)
    def finetune(batch):
        x, y = batch
        return F.cross_entropy(finetune(x), y) + cfg.lam * proximal(finetune.module, pretrain.module)

    @problem(module=pt_net, optimizer=adam(pt_net, cfg), data=source, upper=[finetune])
    def pretrain(batch):
        x, y = batch
        return F.cross_entropy(pretrain(x), y)

    return Program([finetune, pretrain])


def target_only(d: Data, seed: int, cfg: Config) -> nn.Module:
    digits.seeded(seed)
    net = digits.mlp()

    @problem(module=net, optimizer=adam(net, cfg), data=digits.loader(d.target_train, cfg.batch_size, seed))
    def scratch(batch):
        x, y = batch
        return F.cross_entropy(scratch(x), y)

    Program([scratch]).run(iterations=cfg.iterations)
    return net


def train_one(d: Data, method: str, seed: int, cfg: Config) -> tuple[nn.Module, Program | None]:
    if method == "target-only":
        return target_only(d, seed, cfg), None
    program = build(d, None if method == "pretrain-finetune" else method.split("-")[1], seed, cfg)
    program.run(iterations=cfg.iterations)
    return program["finetune"].module, program


class Result(NamedTuple):
    method: str
    seed: int
    accuracy: float
    weight_rot90: float        # mean R(x) on the source images rotated like the target
    weight_other: float        # and on the rest (NaN without a reweighting level)
    seconds: float
    peak_mib: float


def source_weights(program: Program | None, d: Data) -> tuple[float, float]:
    if program is None or "reweight" not in [p.name for p in program.problems]:
        return float("nan"), float("nan")
    with torch.no_grad():
        w = torch.sigmoid(program["reweight"].module(d.source[0])).squeeze(1)
    like = d.turns == 1
    return float(w[like].mean()), float(w[~like].mean())


def run(method: str, seed: int, cfg: Config) -> Result:
    d = data(seed)
    measured = digits.measure(lambda: train_one(d, method, seed, cfg))
    net, program = measured.value
    return Result(method, seed, digits.accuracy(net, d.target_test), *source_weights(program, d),
                  measured.seconds, measured.peak_mib)


def table(results: Sequence[Result], methods: Sequence[str]) -> str:
    header = ["method", "levels", "target test acc. (%)", "R(x) rot90 / other", "peak MiB", "time (s)"]
    levels = {"target-only": 1, "pretrain-finetune": 2}
    rows = []
    for m in methods:
        mine = [r for r in results if r.method == m]
        weights = "–" if m in levels else \
            f"{statistics.fmean(r.weight_rot90 for r in mine):.3f} / {statistics.fmean(r.weight_other for r in mine):.3f}"
        rows.append([m, levels.get(m, 3), digits.mean_std([r.accuracy for r in mine]), weights,
                     *digits.cost_cells([r.peak_mib for r in mine], [r.seconds for r in mine])])
    return digits.markdown(header, rows)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run what the command line asks (one intra-op thread); returns ``results`` and the ``table``."""
    with digits.threads(1):
        return _main(argv)


def _main(argv: Sequence[str] | None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["pretrain-finetune", "reweight-fd"], choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--iterations", type=int, default=Config._field_defaults["iterations"])
    parser.add_argument("--lam", type=float, default=Config._field_defaults["lam"], help="proximal weight λ")
    parser.add_argument("--rw-lr", type=float, default=Config._field_defaults["rw_lr"], help="reweight's Adam lr")
    parser.add_argument("--table", action="store_true", help="print only the markdown table")
    args = parser.parse_args(argv)
    cfg = Config(iterations=args.iterations, lam=args.lam, rw_lr=args.rw_lr)
    for method in args.methods:                                           # warm-up
        train_one(data(0), method, 0, cfg._replace(iterations=2))
    results = []
    for method in args.methods:
        for seed in args.seeds:
            r = run(method, seed, cfg)
            results.append(r)
            if not args.table:
                print(f"{method:18} seed {seed}  target test {100 * r.accuracy:5.1f}%  "
                      f"R(x) {r.weight_rot90:.3f}/{r.weight_other:.3f}  {r.seconds:6.1f}s  {r.peak_mib:6.1f} MiB",
                      flush=True)
    text = table(results, args.methods)
    print(text)
    return {"results": results, "table": text}


if __name__ == "__main__":
    main()
