"""mlodsl against a hand-written PyTorch loop of the same algorithm and Betty 0.2.1 (issue 7).

    python bench/run.py                      # the full run (about 20 minutes on 2 cores)
    python bench/run.py --quick              # a smoke run at reduced repeats and ladder depths
    python bench/run.py --out bench/RESULTS.md --programs mwn --methods neumann cg --no-memory

Writes its section of ``--out`` between ``<!-- bench:begin -->`` and
``<!-- bench:end -->`` (other sections of the file are kept) and prints it.

Programs (``bench/programs``): Meta-Weight-Net with an MLP, a DARTS-style
search, the trilevel pretrain → finetune → reweight chain (one path each), and
the ladder DAG whose number of paths doubles with each level. Each is built
three ways on the same data, sizes, seeds and float32 on the CPU: ``mlodsl``
(the public API), ``hand`` (a hand-written loop of exactly mlodsl's algorithm;
``tests/test_bench_equivalence.py`` checks that they give the same parameters)
and ``betty`` (Betty 0.2.1's ImplicitProblem and Engine).

What is measured, per (program, method, side):

- **time per outer iteration** (one step of the uppermost problem with the
  lower steps it waits for): after a warm-up, blocks of as many iterations as
  the side does in about 40 ms, the sides interleaved (A B C, B C A, …, ``repeats`` rounds), each block timed
  with the CPU time of the calling thread (``time.thread_time``: torch runs on
  one thread, ``torch.set_num_threads(1)``, so this is the work done and other
  jobs on the machine do not count) and with the wall clock. Reported: the
  median over blocks; the ratio against the hand-written loop is the median
  over rounds of (side / hand) in the same round. A second, independent
  instance of the hand-written loop ("hand, again") is timed in the same
  rounds: its ratio to the first shows the noise floor of the machine. The
  check against Betty is paired the same way: the median over rounds of
  (mlodsl / Betty).
  The rounds run in ``processes`` fresh processes (``repeats`` rounds each)
  and are pooled: something a process fixes when it builds a side (where its
  tensors and data land; not pinned down) shifts that side by a few percent for
  the process's whole life (the same code gave
  MWN/fd 1.08× in one process and 0.98× in the next two, with the noise floor
  at 1.01× in all three; two copies of the same hand-written loop differed by
  0.94–1.13× from process to process), which more rounds in one process
  cannot average out: many short-lived processes do, as pyperf's worker
  processes do for the same reason. The median ratio of each process is
  reported too.
  mlodsl gives torch's optimizers their fused or foreach update
  (``Program(fuse_updates=True)``, the default); the hand-written loop and
  Betty use torch's default loop. So on single-path programs a fourth side,
  "mlodsl, loop updates", is mlodsl with that undone: its ratio is the cost
  of the framework alone, and the difference to mlodsl's is the fused update.
- **forward / backward / hvp**: counted over one further outer iteration with
  the same instrument on every side (``bench.common.counting``): calls of the
  problems' modules, first-order reverse sweeps, and reverse sweeps through a
  gradient graph (Hessian-vector and mixed second-order products, and reverse
  passes through unrolled updates).
- **peak memory**: a fresh subprocess per (program, method, side) imports
  torch, the program's module, the data and the side's library, then resets
  the kernel's high-water mark of its resident set (``/proc/self/clear_refs``)
  and builds the program and trains ``warm-up + 10`` outer iterations;
  reported is ``ru_maxrss`` at the end minus the resident set at the reset:
  the memory that building and training
  the program needs, without the imports (a plain ``ru_maxrss`` difference
  against an import-only process is swamped by the import peak of torch and
  scikit-learn). What importing the library adds is listed separately.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import METHODS, SIDES, NotExpressible, counting  # noqa: E402
from bench.programs import SINGLE_PATH, load  # noqa: E402

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
AA = "hand, again"   # a second hand-written loop timed in the same rounds: its ratio is the noise floor
LOOP = "mlodsl, loop updates"  # mlodsl with torch's default optimizer loop (fuse_updates undone)
LADDER_METHODS = ("fd", "neumann")


class Settings(NamedTuple):
    warmup: int            # outer iterations per side before timing
    repeats: int           # rounds of interleaved blocks in each process
    processes: int         # fresh processes whose rounds are pooled (module docstring)
    block_ms: float        # a block is as many iterations as the side does in about this time
    depths: tuple[int, ...]
    ladder_repeats: int    # the ladder's rounds, in one process (its claims are factors, not percents)
    memory_iterations: int


FULL = Settings(warmup=5, repeats=5, processes=8, block_ms=40.0, depths=(2, 3, 4, 5, 6), ladder_repeats=7,
                memory_iterations=20)
QUICK = Settings(warmup=2, repeats=3, processes=2, block_ms=15.0, depths=(2, 3, 4), ladder_repeats=3,
                 memory_iterations=5)


class Timing(NamedTuple):
    cpu_ms: float        # median CPU ms per outer iteration
    wall_ms: float       # median wall ms per outer iteration
    ratio: float | None  # median over rounds of (this side / hand), CPU time
    block: int           # iterations per timed block (of the first process)
    rounds: tuple[float, ...]  # CPU ms per iteration of each round's block, in round order
    per_process: tuple[float, ...] = ()  # the median ratio to hand within each process


class Row(NamedTuple):
    program: str
    method: str
    side: str
    timing: Timing | None
    counts: dict[str, int] | None
    peak_mb: float | None
    note: str = ""


# -- building and timing -------------------------------------------------------------------------
def build(program: str, side: str, method: str, depth: int | None = None):
    """The runner, or the reason the side cannot express ``method`` on ``program``."""
    module = load(program)
    try:
        return module.build(side, method, **({"depth": depth} if depth is not None else {}))
    except NotExpressible as e:
        return str(e)


def time_block(runner, n: int) -> tuple[float, float]:
    gc.collect()
    wall, cpu = time.perf_counter(), time.thread_time()
    runner.run(n)
    return (time.thread_time() - cpu) * 1000 / n, (time.perf_counter() - wall) * 1000 / n


def interleaved(runners: dict[str, Any], warmup: int, repeats: int, block_ms: float) -> dict[str, dict]:
    """Warm every side up, then time blocks round-robin with a rotating order; each side's block
    is as many iterations as it does in about ``block_ms``. Per side: its block and the CPU and
    wall ms per iteration of each round."""
    blocks = {}
    for s, r in runners.items():
        r.run(warmup)
        blocks[s] = max(1, round(block_ms / time_block(r, 1)[0]))
    sides = list(runners)
    out: dict[str, dict] = {s: {"block": blocks[s], "cpu": [], "wall": []} for s in sides}
    for i in range(repeats):
        for s in sides[i % len(sides):] + sides[:i % len(sides)]:
            c, w = time_block(runners[s], blocks[s])
            out[s]["cpu"].append(c)
            out[s]["wall"].append(w)
    return out


def time_here(program: str, method: str, settings: Settings, depth: int | None) -> dict[str, dict]:
    """In a fresh process: build every side (with the two extra ones) and time them interleaved."""
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    runners = {s: r for s in SIDES if not isinstance(r := build(program, s, method, depth), str)}
    runners[AA] = build(program, "hand", method, depth)
    if depth is None and "mlodsl" in runners:
        runners[LOOP] = loop_updates(build(program, "mlodsl", method))
    repeats = settings.repeats if depth is None else settings.ladder_repeats
    return interleaved(runners, settings.warmup, repeats, settings.block_ms)


def pooled(program: str, method: str, settings: Settings, depth: int | None) -> dict[str, Timing]:
    """:func:`time_here` in ``settings.processes`` fresh processes (one for the ladder), pooled."""
    cmd = [sys.executable, str(Path(__file__)), "--time", program, method, "--settings", json.dumps(settings)]
    if depth is not None:
        cmd += ["--depth", str(depth)]
    return pool([json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
                            .strip().splitlines()[-1]) for _ in range(settings.processes if depth is None else 1)])


def pool(runs: list[dict[str, dict]]) -> dict[str, Timing]:
    """The rounds of several processes' :func:`interleaved` as one: medians over every round,
    ratios paired within each round, and each process's own median ratio."""
    def ratios(run: dict[str, dict], s: str) -> list[float]:
        return [a / b for a, b in zip(run[s]["cpu"], run["hand"]["cpu"])]

    out = {}
    for s in runs[0]:
        out[s] = Timing(cpu_ms=statistics.median(c for run in runs for c in run[s]["cpu"]),
                        wall_ms=statistics.median(w for run in runs for w in run[s]["wall"]),
                        ratio=statistics.median(r for run in runs for r in ratios(run, s)),
                        block=runs[0][s]["block"], rounds=tuple(c for run in runs for c in run[s]["cpu"]),
                        per_process=tuple(statistics.median(ratios(run, s)) for run in runs))
    return out


def count(runner) -> dict[str, int]:
    with counting(runner.modules) as counts:
        runner.run(1)
    return dict(counts)


def measure(program: str, method: str, settings: Settings, memory: bool, depth: int | None = None) -> list[Row]:
    timings = pooled(program, method, settings, depth)
    rows = []
    for s in SIDES:
        built = build(program, s, method, depth)
        if isinstance(built, str):
            rows.append(Row(program, method, s, None, None, None, note=built))
            continue
        built.run(settings.warmup)  # counted after the warm-up, as the timed iterations ran
        peak = peak_mb(program, method, s, depth, settings) if memory else None
        rows.append(Row(program, method, s, timings[s], count(built), peak))
    return rows + [Row(program, method, s, timings[s], None, None) for s in (AA, LOOP) if s in timings]


def loop_updates(runner):
    """An mlodsl runner with what ``fuse_updates`` set undone: the optimizers run torch's default
    loop, as the hand-written loop's do, so its ratio is the framework's cost alone."""
    for name, how in runner.program.fused.items():
        for group in runner.program[name].optimizer.param_groups:
            group[how] = None
    return runner


# -- memory: fresh subprocesses ------------------------------------------------------------------
def rss_kib(key: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def warm_up_torch() -> None:
    """What torch imports or allocates on first use whichever side runs (``torch._dynamo`` on the
    first optimizer, ``torch.func``, autograd's first sweep), so that it is not counted as the
    program's memory."""
    import torch.func  # noqa: F401

    x = torch.zeros(4, requires_grad=True)
    opt = torch.optim.SGD([x], lr=0.1, momentum=0.9)
    (g,) = torch.autograd.grad((x * x).sum(), x, create_graph=True)
    (g * g).sum().backward()
    opt.step()
    opt.zero_grad()


def probe(program: str, method: str, side: str, depth: int | None, iterations: int) -> dict[str, int]:
    """In a fresh process: import torch, the program, the data and the side's library; then reset
    the kernel's high-water mark of the resident set and build the program and train it.
    Returns the resident set before (KiB), its peak after, and what importing the library added."""
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    module = load(program)
    if program != "ladder":
        from bench.common import digits
        digits()
    warm_up_torch()
    before_import = rss_kib()
    if side != "hand":
        __import__({"mlodsl": "mlodsl", "betty": "betty.engine"}[side])
    start = rss_kib()
    Path("/proc/self/clear_refs").write_text("5")   # VmHWM := VmRSS
    runner = module.build(side, method, **({"depth": depth} if depth is not None else {}))
    runner.run(iterations)
    return {"start_kib": start, "peak_kib": rss_kib("VmHWM"), "import_kib": start - before_import}


def run_probe(program: str, method: str, side: str, depth: int | None, iterations: int) -> dict[str, int]:
    cmd = [sys.executable, str(Path(__file__)), "--probe", program, method, side, "--iterations", str(iterations)]
    if depth is not None:
        cmd += ["--depth", str(depth)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


_imports: dict[str, list[float]] = {}


def peak_mb(program: str, method: str, side: str, depth: int | None, settings: Settings) -> float:
    """Growth of the resident set while building and training (MiB), in a fresh process."""
    runs = [run_probe(program, method, side, depth, settings.memory_iterations)]
    _imports.setdefault(side, []).extend(r["import_kib"] / 1024 for r in runs)
    return min(r["peak_kib"] - r["start_kib"] for r in runs) / 1024


def import_footprint() -> dict[str, float]:
    return {side: statistics.median(v) for side, v in _imports.items() if side != "hand"}


# -- tables --------------------------------------------------------------------------------------
def fmt(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def single_path_table(rows: list[Row]) -> str:
    lines = ["| program | method | side | ms / outer it. (CPU) | × hand | *per process* | wall ms | peak RSS MB "
             "| forward | backward | hvp |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r.timing is None:
            lines.append(f"| {r.program} | {r.method} | {r.side} | n/a | | | | | | | |")
            continue
        c = r.counts or {}
        ratio = "1" if r.side == "hand" else fmt(r.timing.ratio)
        per = "" if r.side == "hand" else " ".join(fmt(x) for x in r.timing.per_process)
        side = f"*{r.side}*" if r.side in (AA, LOOP) else r.side
        lines.append(f"| {r.program} | {r.method} | {side} | {fmt(r.timing.cpu_ms, 3)} | {ratio} | {per} | "
                     f"{fmt(r.timing.wall_ms, 3)} | {fmt(r.peak_mb, 1)} | {c.get('forward', '')} | "
                     f"{c.get('backward', '')} | {c.get('hvp', '')} |")
    return "\n".join(lines)


def ladder_table(rows: list[Row]) -> str:
    from bench.programs import ladder

    lines = ["| method | depth | edges | paths | hand ms | mlodsl ms | Betty ms | mlodsl × hand | *A/A* | Betty / mlodsl "
             "| mlodsl ms / edge | Betty ms / path | peak RSS MB (mlodsl / Betty) | fwd · bwd · hvp (mlodsl / Betty) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    key = lambda r: (r.method, int(r.note.split("=")[1]))  # noqa: E731
    groups: dict[tuple[str, int], dict[str, Row]] = {}
    for r in rows:
        groups.setdefault(key(r), {})[r.side] = r
    for (method, depth), g in sorted(groups.items(), key=lambda kv: (LADDER_METHODS.index(kv[0][0]), kv[0][1])):
        h, m, b = (g[s].timing for s in SIDES)
        cm, cb = g["mlodsl"].counts, g["betty"].counts
        counts = f"{cm['forward']} · {cm['backward']} · {cm['hvp']} / {cb['forward']} · {cb['backward']} · {cb['hvp']}"
        lines.append(f"| {method} | {depth} | {ladder.edges(depth)} | {ladder.paths(depth)} | {fmt(h.cpu_ms)} | "
                     f"{fmt(m.cpu_ms)} | {fmt(b.cpu_ms)} | {fmt(m.ratio)} | {fmt(g[AA].timing.ratio)} | "
                     f"{fmt(b.cpu_ms / m.cpu_ms, 1)} | "
                     f"{fmt(m.cpu_ms / ladder.edges(depth), 3)} | {fmt(b.cpu_ms / ladder.paths(depth), 2)} | "
                     f"{fmt(g['mlodsl'].peak_mb, 1)} / {fmt(g['betty'].peak_mb, 1)} | {counts} |")
    return "\n".join(lines)


def checks(single: list[Row], lad: list[Row], max_depth: int) -> str:
    """The issue's claims, each evaluated on this run."""
    out = []
    floor = [r.timing.ratio for r in single + lad if r.side == AA]
    if floor:
        out.append((f"noise floor: a second hand-written loop timed alongside the first ran at "
                    f"{min(floor):.2f}–{max(floor):.2f}× of it (median {statistics.median(floor):.2f}×)", True, ""))
    by = {(r.program, r.method, r.side): r for r in single}
    def floor_of(p: str, m: str) -> str:  # the same row's second hand-written copy: its noise
        again = by.get((p, m, AA))
        return f" (hand, again: {again.timing.ratio:.2f}×)" if again is not None and again.timing else ""

    slow = [f"{p}/{m} {by[(p, m, 'mlodsl')].timing.ratio:.2f}×{floor_of(p, m)}" for (p, m, s), r in by.items()
            if s == "mlodsl" and r.timing and r.timing.ratio > 1.05]
    out.append(("mlodsl within 1.05× of the hand-written loop on every single-path program", not slow,
                "over: " + ", ".join(slow) if slow else ""))
    loop = [r.timing.ratio for r in single if r.side == LOOP]
    if loop:
        out.append((f"without its fused updates (*{LOOP}*: torch's default optimizer loop, as the hand-written "
                    f"loop's) mlodsl ran at {min(loop):.2f}–{max(loop):.2f}× of the hand-written loop "
                    f"(median {statistics.median(loop):.2f}×): the framework's own cost", True, ""))
    # paired, as × hand is: the median over rounds of mlodsl's block time over Betty's in the same round
    vs_betty = {(p, m): statistics.median(a / b for a, b in zip(r.timing.rounds, by[(p, m, "betty")].timing.rounds))
                for (p, m, s), r in by.items() if s == "mlodsl" and r.timing and by[(p, m, "betty")].timing}
    worse = [f"{p}/{m} {v:.2f}×" for (p, m), v in vs_betty.items() if v > 1.0]
    spread = f" (mlodsl / Betty, median of the per-round ratios: {min(vs_betty.values()):.2f}–" \
             f"{max(vs_betty.values()):.2f}×)" if vs_betty else ""
    out.append(("mlodsl no slower than Betty on every single-path program (where Betty expresses the method)"
                + spread, not worse, "slower on: " + ", ".join(worse) if worse else ""))
    deep = {r.method: {} for r in lad}
    for r in lad:
        deep[r.method][r.side] = deep[r.method].get(r.side, {}) | {int(r.note.split("=")[1]): r}
    for method, sides in deep.items():
        if max_depth in sides.get("mlodsl", {}):
            m, b = sides["mlodsl"][max_depth].timing.cpu_ms, sides["betty"][max_depth].timing.cpu_ms
            out.append((f"ladder ({method}), depth {max_depth}: mlodsl ≥ 8× faster than Betty", b / m >= 8,
                        f"{b / m:.1f}×"))
    mem = [r for r in single + lad if r.side == "mlodsl" and r.peak_mb is not None]
    higher = []
    for r in mem:
        twin = next((t for t in single + lad if (t.program, t.method, t.side, t.note) == (r.program, r.method, "betty", r.note)
                     and t.peak_mb is not None), None)
        if twin is not None and r.peak_mb > twin.peak_mb:
            higher.append(f"{r.program}{'/' + r.note if r.note else ''}/{r.method} "
                          f"({r.peak_mb:.1f} vs {twin.peak_mb:.1f} MB)")
    if mem:
        out.append(("peak memory of mlodsl no higher than Betty's on every program", not higher,
                    "higher on: " + ", ".join(higher) if higher else ""))
    mark = lambda text, ok: "-" if text.startswith(("noise", "without")) else "- ✓" if ok else "- ✗"  # noqa: E731
    return "\n".join(f"{mark(text, ok)} {text}{' — ' + detail if detail else ''}" for text, ok, detail in out)


def environment() -> str:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        except OSError:
            return "?"

    import betty  # noqa: F401

    # the code only: a table this script wrote earlier is not a change to what it measures
    dirty = " (with uncommitted changes)" if git("status", "--porcelain", "--", "mlodsl", "compiler", "bench",
                                                 ":(exclude)*.md") else ""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    return (f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, mlodsl at `{git('rev-parse', '--short', 'HEAD')}`"
            f"{dirty}, torch {torch.__version__}, Betty {_betty_version()}, Python {platform.python_version()}, "
            f"{cpu} ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start), "
            f"float32, CPU, `torch.set_num_threads(1)`")


def _betty_version() -> str:
    try:
        from importlib.metadata import version
        return version("betty-ml")
    except Exception:
        return "?"


def section(command: str, env: str, settings: Settings, single: list[Row], lad: list[Row],
            imports: dict[str, float] | None, seconds: float) -> str:
    parts = [BEGIN, "## Benchmarks (issue 7): mlodsl, a hand-written loop, Betty 0.2.1", "",
             f"Produced by `{command}` in {seconds / 60:.1f} min; {env}. What each column measures is in "
             "the docstring of `bench/run.py`; in short: **CPU ms of the calling thread per outer iteration** "
             f"(median of {settings.processes * settings.repeats} interleaved blocks of about {settings.block_ms:.0f} ms "
             f"each, {settings.repeats} rounds in each of {settings.processes} fresh processes, after "
             f"{settings.warmup} warm-up iterations; the machine is shared, so wall time is shown but not compared), **× hand** = median "
             "of the per-round ratios to the hand-written loop over all processes (*per process*: the median within "
             "each; *hand, again* is a second copy of the hand-written loop "
             "timed alongside: its ratio is the noise floor; *mlodsl, loop updates* is mlodsl with torch's default "
             "optimizer loop instead of the fused updates it sets, as the other sides run: its ratio is the framework's "
             "own cost), **peak RSS** = the high-water mark of a fresh process "
             "(after the imports and the data, which are listed apart) that builds and trains, minus its resident set "
             "before building, **forward / backward / hvp** = problem-module calls, first-order reverse sweeps and "
             "reverse sweeps through a gradient graph in one outer iteration, counted the same way on every side.",
             "", "Methods: `fd` = finite differences (Betty `darts`, which omits the factor α = the lower "
             "learning rate: a scale, not a cost), `neumann` = 3 Neumann terms, `cg` = 5 CG iterations, `itd` = "
             "reverse mode through the lower problem's last update (Betty 0.2.1: n/a, see below). In every "
             "program each lower problem takes one step per upper step.", "", "### Checks", "",
             checks(single, lad, max(settings.depths)) if single or lad else "(nothing measured)", ""]
    if single:
        parts += ["### Single-path programs", "", single_path_table(single), ""]
    if lad:
        parts += ["### Ladder: paths double with each level", "",
                  "Levels 0 … d−1 hold two problems each, `top` is level d; each problem reads both optima of "
                  "the level below and `top` constrains level 0, so 4d edges and 2^d paths (`bench/programs/"
                  "ladder.py`; θ ∈ R^8, quadratic losses, so the time is Python and graph work). ms = CPU ms per "
                  f"outer iteration (median of {settings.ladder_repeats} interleaved blocks); one outer iteration "
                  "steps all 2d+1 problems.", "",
                  ladder_table(lad), ""]
    if imports:
        parts += ["### Library import", "", "Resident memory that importing the library adds to a process "
                  "that has imported torch and built the data (not part of the peaks above): " + ", ".join(f"{k} {v:.1f} MB" for k, v in imports.items())
                  + ".", ""]
    notes = sorted({r.note for r in single if r.timing is None and r.note})
    if notes:
        parts += ["### n/a", ""] + [f"- Betty, `itd`: {n}." for n in notes] + [""]
    parts.append(END)
    return "\n".join(parts)


def write(out: Path, text: str) -> None:
    old = out.read_text() if out.exists() else ""
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + text + old[old.index(END) + len(END):]
    else:
        new = (old.rstrip() + "\n\n" if old.strip() else "# Benchmark results\n\n") + text + "\n"
    out.write_text(new)


# -- main ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, ladder depths 2-4")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS.md")
    parser.add_argument("--programs", nargs="+", default=[*SINGLE_PATH, "ladder"],
                        choices=[*SINGLE_PATH, "ladder"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--no-memory", action="store_true", help="skip the subprocess memory probes")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"rounds of interleaved blocks per process and single-path program (default {FULL.repeats})")
    parser.add_argument("--processes", type=int, default=None,
                        help=f"fresh processes per single-path program, their rounds pooled (default {FULL.processes})")
    parser.add_argument("--time", nargs=2, metavar=("PROGRAM", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--probe", nargs=3, metavar=("PROGRAM", "METHOD", "SIDE"), help=argparse.SUPPRESS)
    parser.add_argument("--iterations", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(probe(*args.probe, args.depth, args.iterations)))
        return
    if args.time:
        settings = Settings(*json.loads(args.settings))
        print(json.dumps(time_here(*args.time, settings._replace(depths=tuple(settings.depths)), args.depth)))
        return
    command = "python bench/run.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    settings = QUICK if args.quick else FULL
    if args.repeats is not None:
        settings = settings._replace(repeats=args.repeats)
    if args.processes is not None:
        settings = settings._replace(processes=args.processes)
    memory = not args.no_memory
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    start, env = time.perf_counter(), environment()
    single: list[Row] = []
    for program in [p for p in args.programs if p != "ladder"]:
        for method in args.methods:
            rows = measure(program, method, settings, memory)
            single += rows
            _progress(rows)
    lad: list[Row] = []
    if "ladder" in args.programs:
        for method in [m for m in LADDER_METHODS if m in args.methods]:
            for depth in settings.depths:
                rows = measure("ladder", method, settings, memory and depth == max(settings.depths), depth)
                rows = [r._replace(note=f"depth={depth}") for r in rows]
                lad += rows
                _progress(rows)
    imports = import_footprint() if memory else None
    text = section(command, env, settings, single, lad, imports, time.perf_counter() - start)
    write(args.out, text)
    print(text)


def _progress(rows: list[Row]) -> None:
    parts = [f"{r.side} {r.timing.cpu_ms:.3f} ms" if r.timing else f"{r.side} n/a" for r in rows]
    r = rows[0]
    print(f"[bench] {r.program} {r.method} {r.note}: " + ", ".join(parts), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
