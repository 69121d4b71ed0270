"""The ``mlodsl`` command: see a multilevel program before training it.

    mlodsl graph FILE [-o OUT] [--format svg|png|dot] [--plan]   draw the dataflow graph
    mlodsl plan FILE [--code]                                    print the execution plan (or its fx code)
    mlodsl check FILE                                            compile and report

FILE is a ``.py`` path or a dotted module name (``FILE:NAME`` picks one Program
of several); it is imported without running its ``__main__`` block. ``main``
returns the exit status instead of exiting, so tests call it in-process.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from compiler.errors import CompileError
from mlodsl import __version__
from mlodsl._load import LoadError, load
from mlodsl._program import Program
from mlodsl._render import FORMATS, RenderError, graph_figure, plan_figure, render

EXIT_OK, EXIT_COMPILE, EXIT_LOAD, EXIT_OUTPUT = 0, 1, 2, 3

EXIT_CODES = """exit status:
  0  ok
  1  the program does not compile (CompileError: function, file:line, fix)
  2  FILE not found, does not import, or defines no problems; or a bad command line
  3  the picture could not be rendered or written"""

FILE_HELP = ("a Python file (path/to/program.py) or a dotted module name (pkg.program); "
             "append :NAME to pick one Program when the file defines several. It is imported "
             "without running its `if __name__ == \"__main__\":` block; its Program is used, or, "
             "when it has none, all the problems it defines")

UNKNOWN_SUFFIX = (
    "cannot tell the format from the output name {out!r}.\n"
    "Fix: name it .svg, .png or .dot, or pass --format svg|png|dot."
)

PNG_TO_TERMINAL = (
    "PNG is binary and standard output is a terminal.\n"
    "Fix: pass -o graph.png, or redirect: mlodsl graph FILE --format png > graph.png."
)

Handler = Callable[[Program, argparse.Namespace], int]


class OutputError(Exception):
    """The output could not be written (CLI exit code 3)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``) and return the exit status."""
    try:
        args = build_parser().parse_args(argv)
        if args.command == "graph":
            args.format = output_format(args.subparser, args)
    except SystemExit as e:  # --help, --version, or a usage error argparse already printed
        return e.code if isinstance(e.code, int) else EXIT_LOAD
    return run(args)


# --- the command line ------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The ``mlodsl`` parser: one subcommand each for graph, plan and check, all with --help."""
    parser = argparse.ArgumentParser(
        prog="mlodsl", description="See a multilevel optimization program before training it.",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"mlodsl {__version__}",
                        help="print the version of mlodsl and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     help="what to do; `mlodsl COMMAND --help` explains each")
    _add_graph(commands)
    plan = _add_command(commands, "plan", cmd_plan, "print the execution plan: problems, edges, "
                        "the schedule of one period and each hypergradient pass")
    plan.add_argument("--code", action="store_true",
                      help="print instead the Python that torch.fx generated for one period of the "
                           "lowered plan (what program.run executes)")
    _add_command(commands, "check", cmd_check, "compile FILE and print one line per problem, "
                 "then 'ok'")
    return parser


def _add_command(commands: argparse._SubParsersAction, name: str, handler: Handler,
                 summary: str) -> argparse.ArgumentParser:
    sub = commands.add_parser(name, help=summary, description=summary, epilog=EXIT_CODES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.add_argument("file", metavar="FILE", help=FILE_HELP)
    sub.add_argument("--traceback", action="store_true",
                     help="on an error, also print the Python traceback")
    sub.set_defaults(handler=handler, subparser=sub)
    return sub


def _add_graph(commands: argparse._SubParsersAction) -> None:
    sub = _add_command(commands, "graph", cmd_graph, "draw the dataflow graph (as in Figure 2 "
                       "of the Betty paper), or with --plan the schedule and hypergradient passes")
    sub.add_argument("-o", "--output", metavar="OUT", default="-",
                     help="where to write the picture (default: standard output); its suffix "
                          "(.svg, .png, .dot) sets the format unless --format is given")
    sub.add_argument("--format", choices=FORMATS, default=None,
                     help="svg (default), png, or dot (the Graphviz source; needs no renderer)")
    sub.add_argument("--plan", action="store_true",
                     help="draw the plan: the schedule of one period and, for each upper "
                          "problem, the lower problems it differentiates through and how")
    sub.add_argument("--renderer", choices=("auto", "dot", "graphviz-pure"), default="auto",
                     help="what draws SVG/PNG: auto (default) uses a system `dot` when on PATH, "
                          "else the graphviz-pure binary installed with mlodsl")


def output_format(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """--format if given, else the suffix of --output, else svg; an unknown suffix is a usage error."""
    if args.format:
        return args.format
    if args.output == "-":
        return "svg"
    suffix = Path(args.output).suffix.lower().lstrip(".")
    suffix = "dot" if suffix == "gv" else suffix
    if suffix not in FORMATS:
        parser.error(UNKNOWN_SUFFIX.format(out=args.output))  # exits 2
    return suffix


# --- running a command -------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    """Load FILE and run the command; user errors become a message and an exit status."""
    try:
        return args.handler(load(args.file), args)
    except CompileError as e:
        return fail(e, args, EXIT_COMPILE)
    except LoadError as e:
        return fail(e, args, EXIT_LOAD, e.cause)
    except (RenderError, OutputError) as e:
        return fail(e, args, EXIT_OUTPUT)


def fail(error: Exception, args: argparse.Namespace, code: int,
         cause: BaseException | None = None) -> int:
    """Print ``error`` (and, with --traceback, the traceback of ``cause`` or of the error)."""
    if args.traceback:
        traceback.print_exception(cause or error, file=sys.stderr)
    print(f"mlodsl {args.command}: error: {error}", file=sys.stderr)
    return code


def cmd_graph(program: Program, args: argparse.Namespace) -> int:
    """Write the picture of the graph (or of the plan) in ``args.format`` to ``args.output``."""
    figure = plan_figure(program.plan) if args.plan else graph_figure(program.graph)
    source = figure.source
    if args.format == "dot":
        data, by = source.encode("utf-8"), "no renderer needed"
    else:
        data, renderer = render(source, args.format, args.renderer)
        by = f"rendered by {renderer.name}"
    write(data, args.output, args.format)
    if args.output != "-":
        what = "plan" if args.plan else "graph"
        print(f"wrote {args.output}: {what} of {describe(program)} ({args.format}, {by})")
    return EXIT_OK


def write(data: bytes, output: str, fmt: str) -> None:
    """Write ``data`` to the file ``output``, or to standard output for ``-``."""
    if output == "-":
        _write_stdout(data, fmt)
        return
    try:
        Path(output).write_bytes(data)
    except OSError as e:
        raise OutputError(f"cannot write {output}: {e.strerror or e}.\n"
                          "Fix: check that its directory exists and is writable.") from e


def _write_stdout(data: bytes, fmt: str) -> None:
    if fmt != "png":
        sys.stdout.write(data.decode("utf-8"))
        sys.stdout.flush()
        return
    if sys.stdout.isatty():
        raise OutputError(PNG_TO_TERMINAL)
    sys.stdout.flush()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def describe(program: Program) -> str:
    """``"2 problems, 2 edges"``."""
    g = program.graph
    return f"{len(g.nodes)} problems, {len(g.edges)} edges"


def cmd_plan(program: Program, args: argparse.Namespace) -> int:
    """Print the plan, as ``print(program.plan)`` does, or with ``--code`` its lowered fx code."""
    if getattr(args, "code", False):
        from mlodsl._lowering import code
        print(code(program.plan), end="")
    else:
        print(program.plan)
    return EXIT_OK


def cmd_check(program: Program, args: argparse.Namespace) -> int:
    """One line per problem (top level first), then ``ok`` and the size of the program."""
    for node in sorted(program.graph.nodes, key=lambda n: -n.level):
        print(summary_line(program, node.name))
    period = len(program.plan.schedule.period)
    print(f"ok: {describe(program)}, a period of {period} iteration(s)")
    return EXIT_OK


def summary_line(program: Program, name: str) -> str:
    """``L1 classifier  Linear, 15 params, SGD(lr=0.1), steps=1, hypergrad=Neumann(...)  (f.py:22)``."""
    node = program.graph.node(name)
    info = dict(node.spec.info)
    parts = [f"{info['module']}" if "module" in info else None,
             f"{info['params']} params" if "params" in info else None,
             info.get("optimizer"), f"steps={node.steps}",
             f"hypergrad={node.spec.method_repr}" if node.above else "uppermost"]
    return f"L{node.level} {name:<14} {', '.join(p for p in parts if p)}  ({node.spec.loc})"


if __name__ == "__main__":  # pragma: no cover - `python -m mlodsl.cli`
    sys.exit(main())
