"""Reverse-over-reverse or forward-over-reverse Hessian-vector products? Measured (issue 7).

The implicit methods (Neumann, CG) need K products H v of a lower problem's
Hessian. mlodsl builds the gradient graph g = ∇_θ C once (``create_graph=True``)
and runs one reverse sweep through it per product (reverse-over-reverse, graph
reused). The alternative is forward-over-reverse: ``torch.func.jvp`` of the
gradient function, one forward-mode pass through forward and backward per
product, nothing kept between products.

For the lower problems of the benchmark's programs (MWN's classifier, the DARTS
supernet, the trilevel program's pretraining network) and K = 1, 3, 5 and 10,
this prints the CPU time of K products both ways (median of interleaved
rounds, one thread) and checks that the two agree.

    python bench/hvp.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.func import grad, jvp  # noqa: E402

from bench.programs import load  # noqa: E402

Loss = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def lower_problem(program: str) -> tuple[torch.nn.Module, Loss]:
    """The lower problem of ``program``'s hand-written loop: its module and C(θ) on one batch."""
    runner = load(program).build("hand", "neumann")
    runner.run(3)
    if program == "mwn":
        module, batch = runner.net, runner.train.next()
        names = [n for n, _ in module.named_parameters()]
        return module, lambda p: runner.lower_loss(batch, [p[n] for n in names], live_phi=False)
    if program == "darts":
        module, batch = runner.net, runner.train.next()
        names = [n for n, _ in module.named_parameters()]
        return module, lambda p: runner.lower_loss(batch, [p[n] for n in names])
    module, batch = runner.p.pt, runner.source.next()
    names = [n for n, _ in module.named_parameters()]
    return module, lambda p: runner.pretrain_loss(batch, [p[n] for n in names])


def reverse_over_reverse(loss: Loss, params: dict[str, torch.Tensor], vs: list[list[torch.Tensor]]) -> list:
    theta = {n: t.detach().requires_grad_(True) for n, t in params.items()}
    g = torch.autograd.grad(loss(theta), list(theta.values()), create_graph=True)
    return [torch.autograd.grad(g, list(theta.values()), grad_outputs=v, retain_graph=True) for v in vs]


def forward_over_reverse(loss: Loss, params: dict[str, torch.Tensor], vs: list[list[torch.Tensor]]) -> list:
    theta = {n: t.detach() for n, t in params.items()}
    g = grad(loss)
    return [tuple(jvp(g, (theta,), (dict(zip(theta, v)),))[1].values()) for v in vs]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", nargs="+", default=["mwn", "darts", "trilevel"])
    parser.add_argument("--products", nargs="+", type=int, default=[1, 3, 5, 10])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| lower problem | products K | reverse-over-reverse ms | forward-over-reverse ms | forward / reverse |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for program in args.programs:
        module, loss = lower_problem(program)
        params = dict(module.named_parameters())
        for k in args.products:
            g = torch.Generator().manual_seed(k)
            vs = [[torch.randn(t.shape, generator=g, dtype=t.dtype) for t in params.values()] for _ in range(k)]
            a, b = reverse_over_reverse(loss, params, vs), forward_over_reverse(loss, params, vs)
            for x, y in zip(a, b):
                for s, t in zip(x, y):
                    assert torch.allclose(s, t, rtol=1e-3, atol=1e-5), "the two products disagree"
            times: dict[str, list[float]] = {"rr": [], "fr": []}
            for _ in range(args.rounds):
                for key, fn in (("rr", reverse_over_reverse), ("fr", forward_over_reverse)):
                    start = time.thread_time()
                    fn(loss, params, vs)
                    times[key].append((time.thread_time() - start) * 1000)
            rr, fr = statistics.median(times["rr"]), statistics.median(times["fr"])
            print(f"| {program} | {k} | {rr:.2f} | {fr:.2f} | {fr / rr:.2f} |", flush=True)


if __name__ == "__main__":
    main()
