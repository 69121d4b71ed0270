"""Why plain finite differences trail the other methods on Meta-Weight-Net (examples/RESULTS.md).

FD and ``Neumann(iterations=0)`` compute the same one-step formula,
−α (∂²C/∂φ∂θ) v: FD by differencing ∇_φ C at θ ± εv, Neumann(0) with autograd.
They differ only where the loss hides a dependence on θ from autograd: MWN's
weight net reads ``losses.detach()``. FD re-evaluates the loss at θ ± εv, so
the weight net's input moves with θ and FD differentiates that too; autograd
does not. With a weight net linear in the loss and uniform weights the extra
term equals the autograd one, so FD is twice Neumann(0) at initialisation.

This script trains the MWN program of ``examples/data_reweighting.py`` (40%
noise, plain FD: ``FiniteDifference(hold_detached=False)``, steps 1, seed 0) and, every ``--every`` iterations, prints the
cosine and the norm ratio between the FD and Neumann(0) hypergradients of the
weight net on the meta set (the same batch for both).

    python bench/fd_detach.py
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))

import data_reweighting as dr  # noqa: E402

from mlodsl.hypergrad import FiniteDifference, Neumann  # noqa: E402


def flat(vec: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in vec])


def compare(program, batch) -> tuple[float, float]:
    """(cosine, ‖FD‖ / ‖Neumann(0)‖) of the weight net's hypergradient on ``batch``."""
    lower = program["classifier"]
    method = lower.hypergrad
    try:
        lower.hypergrad = FiniteDifference(hold_detached=False)
        fd = flat(program.gradient("reweight", batch))
        lower.hypergrad = Neumann(iterations=0)
        exact = flat(program.gradient("reweight", batch))
    finally:
        lower.hypergrad = method
    return float(fd @ exact / (fd.norm() * exact.norm())), float(fd.norm() / exact.norm())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", module="mlodsl")
    torch.set_num_threads(1)
    cfg = dr.for_setting(dr.Config(iterations=args.iterations), "noise40")
    split = dr.data("noise40", args.seed)
    program = dr.build(split, "fdp", 1, args.seed, cfg)
    batch = next(iter(dr.digits.loader(split.meta, 100, args.seed)))
    print("| iteration | cosine(FD, Neumann(0)) | ‖FD‖ / ‖Neumann(0)‖ |\n| ---: | ---: | ---: |")
    done = 0
    while True:
        cos, ratio = compare(program, batch)
        print(f"| {done} | {cos:.3f} | {ratio:.2f} |", flush=True)
        if done >= args.iterations:
            break
        program.run(iterations=args.every, progress=False)
        done += args.every


if __name__ == "__main__":
    main()
