"""Meta-Weight-Net data reweighting, data parallel over processes with torch.distributed.

The program of ``data_reweighting.py`` (imported, not copied: a weight net ``reweight`` over a
classifier, on noisy or long-tailed digits), run by N processes:

    torchrun --nproc_per_node=2 examples/data_reweighting_distributed.py --method neumann
    python examples/data_reweighting_distributed.py --method neumann     # the same script, one process

Nothing in the program changes. Under ``torchrun`` each rank builds the same program from the
same seed; ``Program`` finds the process group (it starts Gloo here, on CPUs; a program built
with ``Program(..., device="cuda")`` gets NCCL and one GPU per rank),
re-builds both DataLoaders with a ``DistributedSampler`` so that each rank draws its own share of
every batch, and makes every gradient, Hessian-vector product and hypergradient the combined
batch's. Only rank 0 prints and logs.

``--batch-size`` is the combined training batch: each rank draws ``batch_size / N`` examples, so
N processes take the same steps as one process on batches of that size. (Exactly the same up to
rounding for losses that are a mean over the batch; MWN's classifier loss is normalised by the
sum of the weights of each rank's batch, ``Σ w ℓ / Σ w``, so its N-rank value is the mean of the
per-rank normalised losses: close to the combined batch's, not equal. The meta set, 100 images
in one batch, is split 100/N per rank.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data_reweighting as mwn  # noqa: E402
import digits  # noqa: E402

from mlodsl import Program  # noqa: E402


def world_size() -> int:
    """The number of processes torchrun started (1 without torchrun), before any Program exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def build(setting: str = "noise40", method: str = "neumann", steps: int = 1, seed: int = 0,
          batch_size: int = 64, iterations: int = 2000) -> Program:
    """The MWN program with each rank drawing ``batch_size / N`` training examples per step."""
    n = world_size()
    if batch_size % n:
        raise SystemExit(f"--batch-size {batch_size} is not divisible by the {n} processes")
    cfg = mwn.Config(iterations=iterations, batch_size=batch_size // n)
    return mwn.build(mwn.data(setting, seed), method, steps, seed, cfg)


def demo() -> Program:
    """For ``mlodsl graph examples/data_reweighting_distributed.py:demo``."""
    return build()


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", default="noise40", choices=list(mwn.SETTINGS))
    parser.add_argument("--method", default="neumann", choices=list(mwn.HYPERGRADS))
    parser.add_argument("--steps", type=int, default=1, help="classifier steps per weight-net step")
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64, help="the combined batch over all processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=0, help="iterations run before the timed ones")
    parser.add_argument("--json", action="store_true", help="print one JSON line (for bench/)")
    args = parser.parse_args(argv)
    with digits.threads(1):
        program = build(args.setting, args.method, args.steps, args.seed, args.batch_size,
                        args.iterations + args.warmup)
        program.run(args.warmup)
        start = time.perf_counter()
        program.run(args.iterations)
        seconds = time.perf_counter() - start
        split = mwn.data(args.setting, args.seed)
        net = program["classifier"].module
        accuracy = digits.accuracy(net, split.test) if program.rank == 0 else float("nan")
    result = {"processes": program.world_size, "method": args.method, "iterations": args.iterations,
              "batch_size": args.batch_size, "seconds": seconds, "accuracy": accuracy}
    if program.rank == 0:
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            print(f"{program.world_size} process(es), {args.method}, {args.iterations} iterations, "
                  f"batch {args.batch_size}: {seconds:.1f}s, test accuracy {100 * accuracy:.1f}%")
    return result


if __name__ == "__main__":
    main()
