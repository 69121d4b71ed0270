"""How long `mlodsl graph` takes per program: loading, building the DOT, rendering.

Prints a table: for each program file (tests/programs and examples/ that the CLI
can load), the time to import and compile it (torch already imported), to build
the graph and plan figures, and to render each to SVG with every renderer found
(system `dot`, graphviz-pure). Best of ``--repeat`` runs, in milliseconds. The last
column is one whole `python -m mlodsl graph FILE -o x.svg` in a fresh process, in
seconds: importing torch dominates it.

    python bench/render_times.py [--repeat 5] [--no-cli] [FILE ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from mlodsl._load import LoadError, load
from mlodsl._render import graph_figure, plan_figure, renderers

ROOT = Path(__file__).resolve().parents[1]
BROKEN = {"unrelated", "import_error", "no_problems", "two_programs"}


def default_files() -> list[Path]:
    own = [p for p in sorted((ROOT / "tests" / "programs").glob("*.py")) if p.stem not in BROKEN]
    return own + [p for p in sorted((ROOT / "examples").glob("*.py")) if not p.name.startswith("_")]


def best_ms(fn: Callable[[], object], repeat: int) -> float:
    """The fastest of ``repeat`` calls, in milliseconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def cli_seconds(path: Path) -> float:
    """Wall time of one ``python -m mlodsl graph FILE -o x.svg`` in a new process."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "mlodsl", "graph", str(path), "-o", f"{tmp}/x.svg"],
                       check=True, capture_output=True)
        return time.perf_counter() - start


def measure(path: Path, repeat: int, cli: bool) -> list[str] | None:
    """One table row, or None when the CLI cannot load the file."""
    try:
        load_ms = best_ms(lambda: load(str(path)), repeat)
    except LoadError as e:
        print(f"skipped {path.relative_to(ROOT)}: {str(e).splitlines()[0]}")
        return None
    program = load(str(path))
    row = [str(path.relative_to(ROOT)), f"{len(program.graph.nodes)}", f"{load_ms:.0f}"]
    for name, make in (("graph", lambda: graph_figure(program.graph)),
                       ("plan", lambda: plan_figure(program.plan))):
        row.append(f"{best_ms(lambda: make().source, repeat):.1f}")
        source = make().source
        for r in renderers():
            row.append(f"{best_ms(lambda: r.run(source, 'svg'), repeat):.0f}")
    if cli:
        row.append(f"{cli_seconds(path):.1f}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path, help="program files (default: all)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement (best is kept)")
    parser.add_argument("--no-cli", dest="cli", action="store_false",
                        help="skip the end-to-end CLI run in a new process")
    args = parser.parse_args()
    found = [r.name for r in renderers()]
    header = ["program", "problems", "load ms"]
    for what in ("graph", "plan"):
        header += [f"{what} DOT ms"] + [f"{what} SVG ms ({r})" for r in found]
    header += ["CLI s"] if args.cli else []
    files = args.files or default_files()
    rows = [r for r in (measure(p.resolve(), args.repeat, args.cli) for p in files) if r]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
