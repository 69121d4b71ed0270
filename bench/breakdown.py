"""Where the time of one outer iteration goes: the work every side does, and the framework's own.

    python bench/breakdown.py mwn neumann              # mlodsl and the hand-written loop
    python bench/breakdown.py ladder fd --depth 6 --sides mlodsl betty --tree

Samples the CPU time of the calling thread (pyinstrument with
``time.thread_time`` as its clock, so other processes on the machine do not
count) over ``--iterations`` outer iterations after a warm-up, then sorts each
sample into one bucket:

- the **work**, the same on every side: module forwards (``nn.Module``
  calls), the loss functions' own code, autograd sweeps
  (``torch.autograd.grad`` / ``backward``), optimizer ``step`` / ``zero_grad``,
  drawing batches, and mlodsl's vector arithmetic (``mlodsl/_tree.py``, what
  the hand-written loop writes as list comprehensions);
- else the **overhead** of the innermost framework function on the stack
  (mlodsl / compiler / Betty), with whatever torch calls it makes itself (a
  finiteness check, a norm for diagnostics, listing buffers).

Milliseconds are the sample shares scaled to the CPU time per iteration
measured without the profiler. ``--tree`` also prints pyinstrument's call tree.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import SIDES  # noqa: E402
from bench.programs import load  # noqa: E402

FRAMEWORK = (f"{ROOT}/mlodsl/", f"{ROOT}/compiler/", "site-packages/betty/")
WORK = {  # (function, file fragment) -> bucket
    ("_wrapped_call_impl", "torch/nn/modules/module.py"): "work: module forwards",
    ("grad", "torch/autograd/__init__.py"): "work: autograd sweeps",
    ("backward", "torch/autograd/__init__.py"): "work: autograd sweeps",
    ("wrapper", "torch/optim/optimizer.py"): "work: optimizer step",
    ("zero_grad", "torch/optim/optimizer.py"): "work: optimizer step",
    ("__iter__", "bench/common.py"): "work: drawing batches",
    ("update", "mlodsl/_hypergrad/_unroll.py"): "work: differentiable optimizer update",
}


def build(program: str, side: str, method: str, depth: int | None):
    module = load(program)
    kwargs = {"depth": depth} if depth is not None else {}
    return module.build(side, method, **kwargs)


def cpu_ms_per_iteration(runner, iterations: int) -> float:
    start = time.thread_time()
    runner.run(iterations)
    return 1000 * (time.thread_time() - start) / iterations


def sample(runner, iterations: int, interval: float):
    from pyinstrument import Profiler
    from pyinstrument.stack_sampler import get_stack_sampler

    get_stack_sampler().timer_func = time.thread_time
    profiler = Profiler(interval=interval, async_mode="disabled")
    profiler.start()
    runner.run(iterations)
    return profiler, profiler.stop()


def _frame(identifier: str) -> tuple[str, str]:
    """(function, file) of a pyinstrument frame identifier; comprehensions get their line."""
    function, file, line = (identifier.split("\x01")[0].split("\x00") + ["", ""])[:3]
    return (f"{function}@{line}" if function.startswith("<") else function), file


def bucket(stack: list[str]) -> str:
    """The bucket of one sample (module docstring)."""
    frames = [_frame(f) for f in stack]
    inner = max((i for i, (_, file) in enumerate(frames) if any(k in file for k in FRAMEWORK)), default=-1)
    for function, file in frames[inner + 1:]:
        for (name, fragment), label in WORK.items():
            if function == name and file.endswith(fragment):
                return label
    if any("/bench/" in file for _, file in frames[inner + 1:]):
        return "work: loss functions (and the hand-written loop's own code)"
    if inner < 0:
        return "other: " + ":".join(_short(frames[-1]))
    if frames[inner][1].endswith("mlodsl/_tree.py"):
        caller = max((i for i in range(inner) if any(k in frames[i][1] for k in FRAMEWORK)), default=inner)
        return f"work: vector arithmetic (_tree.{frames[inner][0]} from {frames[caller][0]})"
    return "overhead: " + ":".join(_short(frames[inner]))


def _short(frame: tuple[str, str]) -> tuple[str, str]:
    function, file = frame
    for key in FRAMEWORK:
        if key in file:
            return key.rstrip("/").rsplit("/", 1)[1] + "/" + file.split(key, 1)[1], function
    return Path(file).name, function


def breakdown(session, ms_per_iteration: float) -> list[tuple[str, float]]:
    totals: Counter[str] = Counter()
    for stack, seconds in session.frame_records:
        totals[bucket(stack)] += seconds
    whole = sum(totals.values()) or 1.0
    return [(label, ms_per_iteration * t / whole) for label, t in totals.most_common()]


def report(program: str, method: str, sides: list[str], iterations: int, depth: int | None,
           tree: bool, interval: float = 0.0002) -> str:
    lines = []
    for side in sides:
        runner = build(program, side, method, depth)
        runner.run(10)
        ms = min(cpu_ms_per_iteration(runner, iterations) for _ in range(3))
        profiler, session = sample(runner, iterations, interval)
        rows = breakdown(session, ms)
        overhead = sum(v for label, v in rows if not label.startswith("work"))
        lines.append(f"### {program} / {method} / {side}: {ms:.3f} ms CPU per outer iteration "
                     f"({overhead:.3f} ms outside the work)\n")
        lines.append("| where | ms per outer iteration |\n| --- | ---: |")
        lines += [f"| {label} | {v:.3f} |" for label, v in rows if v >= 0.005]
        lines.append("")
        if tree:
            lines.append("```text\n" + profiler.output_text(unicode=False, color=False) + "```\n")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("program", help="mwn, darts, trilevel or ladder")
    parser.add_argument("method", help="fd, neumann, cg or itd")
    parser.add_argument("--sides", nargs="+", default=["hand", "mlodsl"], choices=SIDES)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--depth", type=int, default=None, help="ladder depth")
    parser.add_argument("--tree", action="store_true", help="also print the call tree")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    print(report(args.program, args.method, args.sides, args.iterations, args.depth, args.tree))


if __name__ == "__main__":
    main()
