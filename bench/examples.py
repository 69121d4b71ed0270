"""The example tables of examples/RESULTS.md ("## Examples (issue 6)"), each produced by one command.

For each example named on the command line (all by default), runs
``python examples/NAME.py --table ARGS`` in this process (the example's
``main``), and writes its markdown table, with the command above it, between
the markers ``<!-- begin examples:NAME -->`` and ``<!-- end examples:NAME -->``
of examples/RESULTS.md. Everything outside the markers (other sections, notes
under the tables) is left as it is; a missing section or block is appended.

    python bench/examples.py                          # every table (about 30 min on one CPU core)
    python bench/examples.py maml domain_adaptation   # some of them
    python bench/examples.py --dry-run                # print the commands only
    python bench/examples.py --snapshot               # against the committed library only
"""

from __future__ import annotations

import argparse
import importlib
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "examples" / "RESULTS.md"
SECTION = "## Examples (issue 6)"
SEEDS = ["--seeds", "0", "1", "2"]

TABLES: dict[str, tuple[str, list[str]]] = {
    "data_reweighting": ("Data reweighting (Meta-Weight-Net)", [
        "--settings", "lt10", "lt50", "lt100", "noise20", "noise40",
        "--methods", "ce", "cb", "ce+meta", "mwn-fd-1", "mwn-fdp-1", "mwn-neumann-1", "mwn-cg-1", "mwn-itd-1",
        "mwn-fd-5", "mwn-fdp-5", "mwn-neumann-5", "mwn-cg-5", "mwn-itd-5", "cmwn-neumann-1", *SEEDS]),
    "architecture_search": ("Architecture search (DARTS-style)", [
        "--methods", "first_order-1", "first_order-3", "fd-1", "fd-3", "random", *SEEDS]),
    "domain_adaptation": ("Domain adaptation (pretrain → finetune → reweight)", [
        "--methods", "target-only", "pretrain-finetune", "reweight-fd", "reweight-neumann", *SEEDS]),
    "hyperparameter_optimization": ("Hyperparameter optimization (per-parameter weight decay)", [
        "--methods", "none", "grid", "global-neumann", "neumann", "cg", "itd", *SEEDS]),
    "maml": ("MAML (5-way few-shot digits)", [
        "--splits", "images", "classes", "--shots", "1", "5", "--methods", "scratch", "fomaml", "maml", *SEEDS]),
}

INTRO = """\
Five examples on scikit-learn's bundled 8×8 digits (nothing downloaded), each
an mlodsl program; every table below is written by `python bench/examples.py`
from the command above it (`--table` prints only the table). Accuracies are
test accuracy in %, mean ± sample std over 3 seeds (the seed picks the data
split, the initialisation and the batch order). **peak MiB** is the growth of
the process's resident memory during one training run: the kernel's
high-water mark is reset first (`/proc/self/clear_refs`), then
`resource.getrusage(RUSAGE_SELF).ru_maxrss` minus the resident set before the
run (`tracemalloc` cannot see PyTorch's tensors); **time** is
`time.perf_counter` wall time of one training run, averaged over seeds (and
settings). One intra-op thread, CPU only, on a shared 2-core machine:
times are noisy (±30%) and only comparable within a table. The whole set is
`python bench/examples.py --snapshot` (26 min here: the sum of the five commands' times below); `--snapshot` imports
mlodsl from its committed files (`git archive HEAD`), so that edits made in
the working tree during a long run cannot change the numbers.
"""


def git(*cmd: str) -> str:
    return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def library_version() -> str:
    """The commit the library was imported from, and whether mlodsl/ or compiler/ had uncommitted changes."""
    dirty = git("status", "--porcelain", "--", "mlodsl", "compiler")
    return f"mlodsl {git('rev-parse', '--short', 'HEAD') or '?'}{' + uncommitted changes' if dirty else ''}"


def use_snapshot() -> str:
    """Import mlodsl and compiler from a copy of their committed files (``git archive HEAD``), so that
    uncommitted edits in the working tree, made while a long command runs, cannot change its numbers."""
    commit = git("rev-parse", "--short", "HEAD")
    target = Path(tempfile.mkdtemp(prefix="mlodsl-snapshot-"))
    archive = subprocess.run(["git", "archive", "HEAD", "mlodsl", "compiler"], cwd=ROOT, capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    sys.path.insert(0, str(target))
    for name in [m for m in sys.modules if m.split(".")[0] in ("mlodsl", "compiler")]:
        del sys.modules[name]
    return f"mlodsl {commit} (its committed files)"


def block(name: str, command: str, table: str, seconds: float, version: str) -> str:
    stamp = (f"{version}, torch {torch.__version__}, {platform.machine()}; "
             f"{seconds / 60:.1f} min for the whole command")
    return (f"<!-- begin examples:{name} -->\n```bash\n{command}\n```\n\n({stamp})\n\n{table}\n"
            f"<!-- end examples:{name} -->")


def update(text: str, name: str, title: str, new_block: str) -> str:
    """Replace the block of ``name`` in ``text``, or append it (and the section) if missing."""
    pattern = re.compile(rf"<!-- begin examples:{name} -->.*?<!-- end examples:{name} -->", re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: new_block, text)
    if SECTION not in text:
        text = text.rstrip() + ("\n\n" if text.strip() else "") + f"{SECTION}\n\n{INTRO}"
    head, _, tail = text.partition(SECTION)
    nxt = re.search(r"^## ", tail, re.M)                 # the section ends at the next "## "
    end = nxt.start() if nxt else len(tail)
    body = tail[:end].rstrip() + f"\n\n### {title}\n\n{new_block}\n"
    return head + SECTION + body + ("\n" + tail[end:] if nxt else "")


def run(name: str) -> tuple[str, str, float]:
    title, args = TABLES[name]
    command = " ".join(["python", f"examples/{name}.py", "--table", *args])
    sys.path.insert(0, str(ROOT / "examples"))
    module = importlib.import_module(name)
    start = time.perf_counter()
    out = module.main([*args, "--table"])
    return command, out["table"], time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list(TABLES), help=f"from {', '.join(TABLES)}")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--snapshot", action="store_true",
                        help="run against the committed library (git archive HEAD), not the working tree")
    args = parser.parse_args(argv)
    for name in args.names:
        if name not in TABLES:
            parser.error(f"unknown example {name!r}; choose from {', '.join(TABLES)}")
    snapshot = use_snapshot() if args.snapshot and not args.dry_run else None
    for name in args.names:
        title, extra = TABLES[name]
        if args.dry_run:
            print(" ".join(["python", f"examples/{name}.py", "--table", *extra]))
            continue
        version = snapshot or library_version()
        command, table, seconds = run(name)
        text = args.output.read_text() if args.output.exists() else "# Examples: results\n"
        args.output.write_text(update(text, name, title, block(name, command, table, seconds, version)))
        print(f"{name}: {seconds / 60:.1f} min, written to {args.output}", flush=True)


if __name__ == "__main__":
    main()
