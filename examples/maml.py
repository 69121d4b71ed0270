"""MAML: few-shot classification of digits by a meta-learned initialisation (Finn et al., 2017).

Tasks are 5-way k-shot problems with a fresh random assignment of five digit
classes to the five labels, so no task can be solved without adapting. Two
meta-test splits: ``images`` draws meta-test tasks from all ten classes but
from images held out of meta-training; ``classes`` meta-trains on the digits
0–4 and meta-tests on 5–9 (novel classes). Two levels:

    meta  (L2)  min_θ  Σ_tasks CE_query(θ + δ*(θ))             Adam(1e-3), data: query sets
    adapt (L1)  δ*(θ) = `steps` SGD steps on Σ_tasks CE_support(θ + δ), from δ = 0

The lower problem's parameters are an offset δ from the meta-parameters θ,
zeroed in ``@adapt.before_unroll`` (which also draws the next meta-batch of 4
tasks): adapting from the initialisation θ is adapting δ from zero, and the
lower loss reads θ, so ``Unrolled()`` differentiates the query loss through the
``steps`` inner SGD updates back to θ — the MAML gradient. With
``FirstOrder()`` only the direct gradient reaches θ: first-order MAML. The
network is a 64-64-5 MLP written functionally so one call runs all tasks of a
meta-batch. Baseline ``scratch``: the same inner adaptation from a random
initialisation (no meta-learning).

    python examples/maml.py                                   # 5-way 1-shot, held-out images
    python examples/maml.py --splits images classes --shots 1 5 --methods scratch fomaml maml --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits  # noqa: E402

from mlodsl import Program, problem  # noqa: E402
from mlodsl.hypergrad import FirstOrder, Unrolled  # noqa: E402

WAYS, HIDDEN = 5, 64
SPLITS = {"images": (tuple(range(10)), tuple(range(10))),     # meta-train classes, meta-test classes
          "classes": ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))}
METHODS = ("scratch", "fomaml", "maml")
HYPERGRADS = {"fomaml": FirstOrder, "maml": Unrolled}
SHAPES = {"w1": (HIDDEN, 64), "b1": (HIDDEN,), "w2": (WAYS, HIDDEN), "b2": (WAYS,)}


class Config(NamedTuple):
    iterations: int = 3000         # inner steps in total (meta steps × steps)
    steps: int = 5                 # inner SGD steps per task
    inner_lr: float = 0.5
    meta_lr: float = 1e-3
    tasks_per_batch: int = 4
    queries: int = 10              # query images per class
    test_tasks: int = 200


def forward(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The MLP on a batch of tasks: x (tasks, n, 64); parameters with or without a task dimension."""
    h = F.relu(x @ params["w1"].transpose(-1, -2) + params["b1"].unsqueeze(-2))
    return h @ params["w2"].transpose(-1, -2) + params["b2"].unsqueeze(-2)


def init_params() -> dict[str, nn.Parameter]:
    """PyTorch's default Linear initialisation, uniform(±1/sqrt(fan_in))."""
    out = {}
    for name, shape in SHAPES.items():
        bound = 1.0 / (shape[-1] if name.startswith("w") else (64 if name == "b1" else HIDDEN)) ** 0.5
        out[name] = nn.Parameter(torch.empty(shape).uniform_(-bound, bound))
    return out


class Init(nn.Module):
    """θ: the meta-learned initialisation; ``forward()`` returns it by name."""

    def __init__(self) -> None:
        super().__init__()
        for name, p in init_params().items():
            self.register_parameter(name, p)

    def forward(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in SHAPES}


class Offset(nn.Module):
    """δ: one offset per task of the meta-batch; ``forward(x, θ)`` runs each task's θ + δ."""

    def __init__(self, tasks: int) -> None:
        super().__init__()
        for name, shape in SHAPES.items():
            self.register_parameter(name, nn.Parameter(torch.zeros(tasks, *shape)))

    def forward(self, x: torch.Tensor, theta: dict[str, torch.Tensor]) -> torch.Tensor:
        return forward(x, {n: theta[n] + getattr(self, n) for n in SHAPES})


class Task(NamedTuple):
    support: digits.Data      # (tasks, ways·shots, 64), (tasks, ways·shots)
    query: digits.Data


class Tasks:
    """Draws meta-batches of N-way k-shot tasks from ``classes`` of ``data``."""

    def __init__(self, data: digits.Data, classes: Sequence[int], shots: int, queries: int, seed: int) -> None:
        x, y = data
        self.pools = [x[y == c] for c in classes]
        self.shots, self.queries = shots, queries
        self.g = torch.Generator().manual_seed(seed)

    def one(self) -> tuple[digits.Data, digits.Data]:
        order = torch.randperm(len(self.pools), generator=self.g)[:WAYS]
        sx, sy, qx, qy = [], [], [], []
        for label, c in enumerate(order.tolist()):
            pool = self.pools[c]
            pick = torch.randperm(len(pool), generator=self.g)[: self.shots + self.queries]
            sx.append(pool[pick[: self.shots]])
            qx.append(pool[pick[self.shots:]])
            sy += [label] * self.shots
            qy += [label] * self.queries
        return (torch.cat(sx), torch.tensor(sy)), (torch.cat(qx), torch.tensor(qy))

    def batch(self, n: int) -> Task:
        tasks = [self.one() for _ in range(n)]
        stack = lambda part, i: torch.stack([t[part][i] for t in tasks])  # noqa: E731
        return Task(support=(stack(0, 0), stack(0, 1)), query=(stack(1, 0), stack(1, 1)))


class Current:
    """The meta-batch being adapted to; ``support``/``query`` iterate its sets forever."""

    def __init__(self, tasks: Tasks, n: int) -> None:
        self.tasks, self.n = tasks, n
        self.task = tasks.batch(n)

    def next(self) -> None:
        self.task = self.tasks.batch(self.n)

    def stream(self, part: str) -> Iterator[digits.Data]:
        while True:
            yield getattr(self.task, part)


class Stream:
    """An iterable over ``current.stream(part)`` (data for @problem; read lazily at each step)."""

    def __init__(self, current: Current, part: str) -> None:
        self.current, self.part = current, part

    def __iter__(self) -> Iterator[digits.Data]:
        return self.current.stream(self.part)


def task_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over tasks of each task's mean cross-entropy (so each δ gets its own task's gradient)."""
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / y.shape[1]


def build(train: digits.Data, classes: Sequence[int], method: str, shots: int, seed: int, cfg: Config) -> Program:
    """The MAML program: the initialisation θ above the per-task adaptation δ."""
    digits.seeded(seed)
    init, offset = Init(), Offset(cfg.tasks_per_batch)
    current = Current(Tasks(train, classes, shots, cfg.queries, seed), cfg.tasks_per_batch)

    @problem(module=init, optimizer=torch.optim.Adam(init.parameters(), lr=cfg.meta_lr),
             data=Stream(current, "query"))
    def meta(batch):
        x, y = batch
        return task_loss(adapt(x, meta()), y) / cfg.tasks_per_batch      # reads δ* and θ

    @problem(module=offset, optimizer=torch.optim.SGD(offset.parameters(), lr=cfg.inner_lr),
             data=Stream(current, "support"), upper=[meta], hypergrad=HYPERGRADS[method](), steps=cfg.steps)
    def adapt(batch):
        x, y = batch
        return task_loss(adapt(x, meta()), y)                              # reads θ: upper-to-lower

    @adapt.before_unroll
    def new_tasks(module: nn.Module) -> None:
        """Each round starts at θ (δ = 0) on a fresh meta-batch."""
        for p in module.parameters():
            p.zero_()
        current.next()

    return Program([meta, adapt])


def demo() -> Program:
    """The MAML program, for ``mlodsl graph examples/maml.py:demo``."""
    return build(data(0)[0], SPLITS["images"][0], "maml", 1, 0, Config())


def evaluate(theta: dict[str, torch.Tensor], test: digits.Data, classes: Sequence[int], shots: int, seed: int,
             cfg: Config) -> float:
    """Mean query accuracy over ``test_tasks`` meta-test tasks after ``steps`` SGD steps from θ."""
    tasks = Tasks(test, classes, shots, cfg.queries, seed + 12345)
    correct = []
    for _ in range(cfg.test_tasks // cfg.tasks_per_batch):
        t = tasks.batch(cfg.tasks_per_batch)
        fast = {n: theta[n].detach().expand(cfg.tasks_per_batch, *SHAPES[n]).clone().requires_grad_()
                for n in SHAPES}
        for _ in range(cfg.steps):
            grads = torch.autograd.grad(task_loss(forward(t.support[0], fast), t.support[1]), list(fast.values()))
            fast = {n: (p - cfg.inner_lr * g).detach().requires_grad_() for (n, p), g in zip(fast.items(), grads)}
        with torch.no_grad():
            correct.append((forward(t.query[0], fast).argmax(-1) == t.query[1]).float().mean())
    return float(torch.stack(correct).mean())


def data(seed: int) -> tuple[digits.Data, digits.Data]:
    """Meta-train and meta-test images: a seeded half of all images each."""
    x, y = digits.load()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    a, b = perm[: len(y) // 2], perm[len(y) // 2:]
    return (x[a], y[a]), (x[b], y[b])


def meta_train(train: digits.Data, classes: Sequence[int], method: str, shots: int, seed: int, cfg: Config
               ) -> dict[str, torch.Tensor]:
    if method == "scratch":
        digits.seeded(seed)
        return Init()()
    program = build(train, classes, method, shots, seed, cfg)
    program.run(iterations=cfg.iterations)
    return program["meta"].module()


class Result(NamedTuple):
    method: str
    split: str
    shots: int
    seed: int
    accuracy: float
    seconds: float
    peak_mib: float


def run(method: str, split: str, shots: int, seed: int, cfg: Config) -> Result:
    train, test = data(seed)
    train_classes, test_classes = SPLITS[split]
    measured = digits.measure(lambda: meta_train(train, train_classes, method, shots, seed, cfg))
    return Result(method, split, shots, seed, evaluate(measured.value, test, test_classes, shots, seed, cfg),
                  measured.seconds, measured.peak_mib)


def table(results: Sequence[Result], methods: Sequence[str], settings: Sequence[tuple[str, int]]) -> str:
    header = ["method", *[f"{split}, {k}-shot (%)" for split, k in settings], "peak MiB", "time (s)"]
    rows = []
    for m in methods:
        mine = [r for r in results if r.method == m]
        rows.append([m, *[digits.mean_std([r.accuracy for r in mine if (r.split, r.shots) == s]) for s in settings],
                     *digits.cost_cells([r.peak_mib for r in mine], [r.seconds for r in mine])])
    return digits.markdown(header, rows)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run what the command line asks (one intra-op thread); returns ``results`` and the ``table``."""
    with digits.threads(1):
        return _main(argv)


def _main(argv: Sequence[str] | None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["scratch", "maml"], choices=METHODS)
    parser.add_argument("--splits", nargs="+", default=["images"], choices=list(SPLITS),
                        help="meta-test on held-out images of all classes, or on held-out classes 5-9")
    parser.add_argument("--shots", nargs="+", type=int, default=[1])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--iterations", type=int, default=Config._field_defaults["iterations"],
                        help="inner steps in total (meta steps × --steps)")
    parser.add_argument("--steps", type=int, default=Config._field_defaults["steps"], help="inner SGD steps per task")
    parser.add_argument("--test-tasks", type=int, default=Config._field_defaults["test_tasks"])
    parser.add_argument("--table", action="store_true", help="print only the markdown table")
    args = parser.parse_args(argv)
    cfg = Config(iterations=args.iterations, steps=args.steps, test_tasks=args.test_tasks)
    for method in args.methods:                                          # warm-up
        meta_train(data(0)[0], SPLITS["images"][0], method, args.shots[0], 0, cfg._replace(iterations=cfg.steps))
    settings = [(split, shots) for split in args.splits for shots in args.shots]
    results = []
    for split, shots in settings:
        for method in args.methods:
            for seed in args.seeds:
                r = run(method, split, shots, seed, cfg)
                results.append(r)
                if not args.table:
                    print(f"{split:7} 5-way {shots}-shot  {method:8} seed {seed}  meta-test {100 * r.accuracy:5.1f}%  "
                          f"{r.seconds:6.1f}s  {r.peak_mib:6.1f} MiB", flush=True)
    text = table(results, args.methods, settings)
    print(text)
    return {"results": results, "table": text}


if __name__ == "__main__":
    main()
