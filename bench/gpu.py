"""The GPU check of issue 7, as one prepared script: MWN on one CUDA device.

    python bench/gpu.py                                  # on a machine with a GPU (a few minutes)
    python bench/gpu.py --device cpu --rounds 2 --out /tmp/gpu.md   # a dry run of the script on CPU

Sides, on the benchmark's MWN program (``bench/programs/mwn.py``: MLP 64-128-10,
weight net 1-100-1, batch 64, one classifier step and one weight-net step per
outer iteration), for each method:

- ``hand``: the hand-written loop, eager;
- ``mlodsl``: the program with the defaults (``checks="step"``: one read per step);
- ``mlodsl, checks=log``: no host read in the hot loop;
- ``mlodsl, CUDA graphs``: ``Program(cuda_graphs=True)``: each iteration captured in a
  CUDA graph and replayed (``mlodsl._graphs``), modules eager;
- ``mlodsl, compile``: ``Program(compile=True, cuda_graphs=False)``, modules under
  ``torch.compile``, no graph;
- ``mlodsl, compile + CUDA graphs``: ``Program(compile=True)``, what ``compile=True`` does on
  CUDA: both (the issue asks for ≥ 2× the hand-written eager loop);
- ``mlodsl, compile reduce-overhead``: ``compile={"mode": "reduce-overhead"}``, torch's own
  CUDA graphs of each compiled region instead of mlodsl's of the whole iteration.

The *graphs* column says what ``program.cuda_graphs`` reported after the timing: the
iterations replayed, or why graphs were off. Every captured iteration's first replay is
checked against the eager iteration by mlodsl itself; a mismatch turns graphs off, and
the column shows it. With ``--device cpu`` the graph sides run on mlodsl's emulated backend
(the dry run checks the script, not the speed).

Time per outer iteration is wall time between ``torch.cuda.synchronize()`` calls,
median of ``--rounds`` interleaved blocks of ``--block`` iterations after
``--warmup`` iterations (compilation happens in the warm-up); **× hand** is the
median of the per-round ratios. Peak memory is ``torch.cuda.max_memory_allocated``
over one more block of each side after the timing, above what was allocated before
it (the same runner: a fresh build would compile again). The table goes between
``<!-- gpu:begin -->`` and ``<!-- gpu:end -->`` of ``--out`` (bench/RESULTS.md), and
is written again after each method, so a run cut short keeps what it measured.

On a tight device budget: ``python bench/gpu.py --methods neumann fd --rounds 7``
(compilation, once per compiled side and method, is most of the time).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.programs import mwn  # noqa: E402

BEGIN, END = "<!-- gpu:begin -->", "<!-- gpu:end -->"
SIDES = {  # name -> (side, Program keyword arguments)
    "hand": ("hand", {}),
    "mlodsl": ("mlodsl", {}),
    "mlodsl, checks=log": ("mlodsl", {"checks": "log"}),
    "mlodsl, CUDA graphs": ("mlodsl", {"cuda_graphs": True}),
    "mlodsl, compile": ("mlodsl", {"checks": "log", "compile": True, "cuda_graphs": False}),
    "mlodsl, compile + CUDA graphs": ("mlodsl", {"compile": True}),
    "mlodsl, compile reduce-overhead": ("mlodsl", {"checks": "log", "compile": {"mode": "reduce-overhead"},
                                                   "cuda_graphs": False}),
}
GRAPHED = ("mlodsl, CUDA graphs", "mlodsl, compile + CUDA graphs")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(name: str, method: str, device: torch.device):
    side, program = SIDES[name]
    if device.type == "cuda" or name not in GRAPHED:
        return mwn.build(side, method, device=str(device), **program)
    from mlodsl import _graphs  # the dry run on a CPU: the emulated graphs

    runner = mwn.build(side, method, device=str(device), checks="log",
                       **{k: v for k, v in program.items() if k != "cuda_graphs"})
    _graphs.attach(runner.program._runtime, _graphs.Emulated(), {})
    return runner


def graphs_of(runner) -> str:
    info = getattr(getattr(runner, "program", None), "cuda_graphs", None)
    if info is None:
        return "–"
    if info["off"] is not None:
        return f"off: {info['off'][:90]}"
    return f"{info['replays']} replays ({info['backend']})"


def timed(runner, n: int, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    runner.run(n)
    sync(device)
    return (time.perf_counter() - start) * 1000 / n


def peak_mib(runner, device: torch.device, n: int) -> float | None:
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    runner.run(n)
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


def measure(method: str, device: torch.device, args: argparse.Namespace) -> list[list[str]]:
    runners = {name: build(name, method, device) for name in SIDES}
    for runner in runners.values():
        runner.run(args.warmup)
    ms: dict[str, list[float]] = {name: [] for name in SIDES}
    names = list(SIDES)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            ms[name].append(timed(runners[name], args.block, device))
    rows = []
    for name in SIDES:
        ratio = statistics.median(a / b for a, b in zip(ms[name], ms["hand"]))
        peak = peak_mib(runners[name], device, args.block)
        rows.append([method, name, f"{statistics.median(ms[name]):.3f}", f"{ratio:.2f}",
                     "–" if peak is None else f"{peak:.1f}", graphs_of(runners[name]).replace("|", "/")])
        print(f"[gpu] {method} {name}: {statistics.median(ms[name]):.3f} ms, x hand {ratio:.2f}", flush=True)
    return rows


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()})"


def write(out: Path, text: str) -> None:
    old = out.read_text() if out.exists() else ""
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + text + old[old.index(END) + len(END):]
    else:
        new = (old.rstrip() + "\n\n" if old.strip() else "# Benchmark results\n\n") + text + "\n"
    out.write_text(new)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--methods", nargs="+", default=["fd", "neumann", "cg", "itd"])
    parser.add_argument("--warmup", type=int, default=20, help="iterations before timing (compilation happens here)")
    parser.add_argument("--block", type=int, default=50, help="iterations per timed block")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS.md")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; use --device cpu for a dry run")
    warnings.filterwarnings("ignore", module="mlodsl")
    start = time.perf_counter()
    command = "python bench/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows: list[list[str]] = []
    for method in args.methods:
        rows += measure(method, device, args)
        head = ("## GPU (issue 7)\n\n"
                f"Produced by `{command.strip()}` in {(time.perf_counter() - start) / 60:.1f} min on "
                f"{device_name(device)}, torch {torch.__version__}; MWN (`bench/programs/mwn.py`), float32. "
                f"ms = wall time per outer iteration between CUDA synchronisations, median of {args.rounds} "
                f"interleaved blocks of {args.block} iterations after {args.warmup} warm-up iterations; "
                "× hand = median of the per-round ratios to the hand-written eager loop; peak MiB = "
                "`torch.cuda.max_memory_allocated` over one more block, above the allocation before it; "
                "graphs = what `program.cuda_graphs` reported (replays kept, or why graphs were off).\n\n")
        speedups = {r[0]: 1 / float(r[3]) for r in rows if r[1] == "mlodsl, compile + CUDA graphs"}
        check = ("✓" if all(v >= 2 for v in speedups.values()) else "✗") + " `compile=True` at least 2× faster " \
            "per iteration than the hand-written eager loop: " + \
            ", ".join(f"{m} {v:.2f}×" for m, v in speedups.items()) + "\n\n"
        table = ["| method | side | ms / outer it. | × hand | peak MiB | graphs |",
                 "| --- | --- | ---: | ---: | ---: | --- |"]
        table += ["| " + " | ".join(r) + " |" for r in rows]
        head += check
        write(args.out, f"{BEGIN}\n{head}" + "\n".join(table) + f"\n{END}")
        print(f"written to {args.out}", flush=True)


if __name__ == "__main__":
    main()
