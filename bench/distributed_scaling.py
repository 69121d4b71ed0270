"""Scaling of a data-parallel mlodsl program over 1, 2, ... processes (torch.distributed).

Runs the Meta-Weight-Net example under ``torchrun --standalone --nproc_per_node=N``
(``examples/data_reweighting_distributed.py --json``) for each N and each workload, a few
times, and writes the median time per iteration, the throughput in training examples per
second and the speedup over one process into bench/RESULTS.md between the markers
``<!-- distributed:begin -->`` and ``<!-- distributed:end -->`` (appended with its heading if
absent; nothing else in the file is touched).

Workloads: *strong* scaling keeps the combined batch (each of N ranks draws batch/N examples:
the same steps as one process), *weak* scaling keeps the per-rank batch (N times the examples
per step).

    python bench/distributed_scaling.py                       # 1 and 2 processes on this machine
    python bench/distributed_scaling.py --processes 1 2 4 8 --device-note "8x H100, NCCL"
    python bench/distributed_scaling.py --dry-run             # print the commands
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import time
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"
EXAMPLE = ROOT / "examples" / "data_reweighting_distributed.py"
BEGIN, END = "<!-- distributed:begin -->", "<!-- distributed:end -->"
HEADING = "## Distributed scaling (issue 8)"
# (name, batch per process for N = 1, strong: the combined batch is kept)
WORKLOADS = [("strong, batch 64", 64, True), ("strong, batch 1024", 1024, True), ("weak, 128 per rank", 128, False)]


def command(n: int, batch: int, method: str, iterations: int, warmup: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
            str(EXAMPLE), "--json", "--method", method, "--iterations", str(iterations),
            "--warmup", str(warmup), "--batch-size", str(batch)]


def measure(cmd: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(lines[-1])


SIZES = [9610 + 1, 301 + 9610 + 1, 9610, 9610, 9610, 301]  # the all-reduces of one iteration


def probe(rounds: int) -> None:
    """Under torchrun: the time of one iteration's all-reduces alone (no computation)."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    buffers = [torch.randn(n) for n in SIZES]
    for _ in range(10):
        for b in buffers:
            dist.all_reduce(b)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(rounds):
        for b in buffers:
            dist.all_reduce(b)
    seconds = time.perf_counter() - start
    if dist.get_rank() == 0:
        print(json.dumps({"processes": dist.get_world_size(), "ms_per_round": 1000 * seconds / rounds}))
    dist.destroy_process_group()


def table(rows: list[dict]) -> str:
    head = "| workload | processes | combined batch | ms / iteration | examples / s | speedup |\n"
    head += "| --- | ---: | ---: | ---: | ---: | ---: |\n"
    base: dict[str, float] = {}
    body = []
    for r in rows:
        per_it = r["seconds"] / r["iterations"]
        rate = r["batch_size"] / per_it
        base.setdefault(r["workload"], rate)
        body.append(f"| {r['workload']} | {r['processes']} | {r['batch_size']} | {1000 * per_it:.1f} | "
                    f"{rate:,.0f} | {rate / base[r['workload']]:.2f}× |")
    return head + "\n".join(body) + "\n"


def write(text: str) -> None:
    block = f"{BEGIN}\n{text}{END}"
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if BEGIN in old and END in old:
        new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, old, flags=re.S)
    else:
        new = old.rstrip("\n") + f"\n\n{HEADING}\n\n{block}\n"
    RESULTS.write_text(new)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--method", default="neumann")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell; the median is reported")
    parser.add_argument("--device-note", default=None, help="what ran it (default: this machine's CPUs, Gloo)")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--probe", action="store_true", help="(internal) time the all-reduces alone")
    args = parser.parse_args(argv)
    if args.probe:
        return probe(args.iterations)
    rows = []
    load_before = os.getloadavg()[0]
    for name, batch, strong in WORKLOADS:
        for n in args.processes:
            combined = batch if strong else batch * n
            cmd = command(n, combined, args.method, args.iterations, args.warmup)
            if args.dry_run:
                print(" ".join(cmd))
                continue
            runs = [measure(cmd) for _ in range(args.repeats)]
            best = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
            rows.append({**best, "workload": name})
            print(f"{name:22} N={n}: {1000 * best['seconds'] / best['iterations']:.1f} ms/iteration", flush=True)
    probes = []
    for n in [n for n in args.processes if n > 1]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               str(Path(__file__).resolve()), "--probe", "--iterations", str(args.iterations)]
        if args.dry_run:
            print(" ".join(cmd))
            continue
        ms = statistics.median(measure(cmd)["ms_per_round"] for _ in range(args.repeats))
        probes.append(f"{n} processes: {ms:.1f} ms")
    if args.dry_run:
        return
    load = f"load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after the runs"
    note = args.device_note or (f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
                                f"Gloo, one intra-op thread per process, {load}")
    text = (f"MWN on digits (`examples/data_reweighting_distributed.py`, {args.method}, steps=1), "
            f"{args.iterations} timed iterations after {args.warmup}, median of {args.repeats} runs; "
            f"{note}; torch {torch.__version__}. Command: `python bench/distributed_scaling.py "
            f"--processes {' '.join(map(str, args.processes))}`. With Neumann(3) and steps=1 "
            f"an iteration makes 6 all-reduces: the classifier's gradient, the weight net's gradient "
            f"with the seed, 3 Hessian-vector products and the mixed product (about 48,000 numbers).\n\n"
            + table(rows) + "\nThe 6 all-reduces of one iteration alone, without computation: "
            + "; ".join(probes) + ".\n")
    write(text)
    print(text)


if __name__ == "__main__":
    main()
