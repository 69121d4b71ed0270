"""Pictures of a program: its dataflow graph (the paper's Figure 2) and its plan, as DOT.

``graph_figure(graph)`` and ``plan_figure(plan)`` build a ``graphviz.Digraph``;
``render(source, fmt)`` turns DOT into SVG or PNG with the first renderer that
works: a system ``dot`` when one is on PATH, else the ``graphviz-pure`` binary
(a dependency of mlodsl, so a plain ``pip install`` can render).

The SVG is meant to be read by tests as well as people: every element carries
a ``class`` — ``problem`` nodes, ``u2l`` / ``l2u`` edges, ``legend`` items,
the ``schedule`` table, hypergradient ``visit`` / ``seed`` / ``theta`` nodes
joined by ``adjoint`` edges — and each node's ``<title>`` is its DOT id
(the problem's name for problem nodes).
"""

from __future__ import annotations

import html
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import graphviz
from attrs import frozen

from compiler.errors import MlodslError
from compiler.ir import Edge, EdgeKind, Graph, Node
from compiler.plan import HypergradPlan, Iteration, Plan

FONT = "Helvetica"  # has metrics in both system Graphviz and graphviz-pure (θ, ∂, → included)
U2L_COLOR = "#d62728"  # red, as in the paper's Figure 2
L2U_COLOR = "#2ca02c"  # green, as in the paper's Figure 2
ADJOINT_COLOR = "#1f77b4"
NODE_FILL = "#f7f7f7"
FORMATS = ("svg", "png", "dot")
RENDER_TIMEOUT_S = 60


@frozen
class EdgeStyle:
    """How one kind of edge is drawn, and what the legend says about it."""

    css_class: str
    color: str
    style: str
    legend: str


STYLES = {
    EdgeKind.U2L: EdgeStyle("u2l", U2L_COLOR, "solid", "upper-to-lower (θ)"),
    EdgeKind.L2U: EdgeStyle("l2u", L2U_COLOR, "dashed", "lower-to-upper (θ*)"),
}
ADJOINT = EdgeStyle("adjoint", ADJOINT_COLOR, "dotted", "adjoint (one hypergrad call per box)")

NO_RENDERER = (
    "could not render {fmt}: {tried}.\n"
    "Rule: SVG and PNG are drawn by Graphviz's `dot`, or by the `graphviz-pure` binary that "
    "mlodsl depends on.\n"
    "Fix: `pip install graphviz-pure` in this environment (or install Graphviz: "
    "`apt install graphviz`, `brew install graphviz`, `conda install graphviz`); "
    "`--format dot` always works and writes the DOT source."
)


class RenderError(MlodslError):
    """No renderer could turn the DOT source into the requested format."""


# --- the dataflow graph ------------------------------------------------------

def graph_figure(graph: Graph, title: str | None = None) -> graphviz.Digraph:
    """The dataflow graph: one node per problem, ranked by level (uppermost at the top),
    red solid upper-to-lower and green dashed lower-to-upper edges, and a legend."""
    dot = _digraph("mlodsl_graph", title)
    add_problems(dot, graph)
    add_edges(dot, graph)
    add_legend(dot, (STYLES[EdgeKind.U2L], STYLES[EdgeKind.L2U]))
    return dot


def _digraph(name: str, title: str | None) -> graphviz.Digraph:
    dot = graphviz.Digraph(name)
    dot.attr(rankdir="TB", fontname=FONT, newrank="true", nodesep="0.5", ranksep="0.6")
    if title:
        dot.attr(label=title, labelloc="t", fontsize="16")
    dot.attr("node", fontname=FONT, fontsize="11")
    dot.attr("edge", fontname=FONT, fontsize="10")
    return dot


def node_id(graph: Graph, name: str) -> str:
    """The DOT id of a problem: its name, unless the name would confuse DOT (``a:b`` is a port)."""
    if name.isidentifier():
        return name
    return f"problem{graph.names.index(name)}"


def add_problems(dot: graphviz.Digraph, graph: Graph) -> None:
    """One node per problem; problems of one level share a rank, the highest level on top."""
    for level in sorted({n.level for n in graph.nodes}, reverse=True):
        with dot.subgraph() as same:
            same.attr(rank="same")
            for node in (n for n in graph.nodes if n.level == level):
                same.node(node_id(graph, node.name), label=problem_label(node), shape="box",
                          style="rounded,filled", fillcolor=NODE_FILL, margin="0.12,0.06",
                          **{"class": "problem", "tooltip": str(node.spec.loc)})


def problem_label(node: Node) -> str:
    """An HTML-like label: name, module and parameter count, optimizer, level and steps, method."""
    info = dict(node.spec.info)
    rows = [f"<b>{_esc(node.name)}</b>"]
    if "module" in info or "params" in info:
        rows.append(_module_row(info))
    if "optimizer" in info:
        rows.append(_esc(info["optimizer"]))
    rows.append(f"level {node.level} · steps={node.steps}")
    rows.append(_method_row(node))
    cells = "".join(f"<tr><td>{r}</td></tr>" for r in rows)
    return f'<<table border="0" cellborder="0" cellspacing="1" cellpadding="1">{cells}</table>>'


def _module_row(info: dict[str, str]) -> str:
    params = info.get("params", "")
    count = f"{int(params):,} params" if params.isdigit() else params
    return _esc(" · ".join(p for p in (info.get("module", ""), count) if p))


def _method_row(node: Node) -> str:
    """The hypergradient method; an uppermost problem is never differentiated through."""
    if not node.above:
        return '<font color="#777777">hypergrad: unused (uppermost)</font>'
    return f"hypergrad: {_esc(node.spec.method_repr)}"


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def add_edges(dot: graphviz.Digraph, graph: Graph) -> None:
    """The dataflow edges; levels are ranked by upper= (invisible where no u2l edge shows it)."""
    for edge in graph.edges:
        dot.edge(node_id(graph, edge.src), node_id(graph, edge.dst), **edge_attrs(edge))
    for node in graph.nodes:
        for upper in node.upper:
            if not graph.has_edge(upper, node.name, EdgeKind.U2L):
                dot.edge(node_id(graph, upper), node_id(graph, node.name), style="invis")


def edge_attrs(edge: Edge) -> dict[str, str]:
    """Colour, style and label of a dataflow edge: ``θ_src`` (u2l) or ``θ*_src`` (l2u).

    Lower-to-upper edges point up, so they do not constrain the ranking.
    """
    style = STYLES[edge.kind]
    label = f"θ_{edge.src}" if edge.kind is EdgeKind.U2L else f"θ*_{edge.src}"
    attrs = {"class": style.css_class, "color": style.color, "fontcolor": style.color,
             "style": style.style, "label": label, "penwidth": "1.4"}
    if edge.kind is EdgeKind.L2U:
        attrs["constraint"] = "false"
    return attrs


def add_legend(dot: graphviz.Digraph, styles: Sequence[EdgeStyle]) -> None:
    """A boxed legend on one row: a sample arrow per edge style, labelled with what it means."""
    with dot.subgraph(name="cluster_legend") as legend:
        legend.attr(label="legend", fontsize="10", style="dashed", color="#999999",
                    **{"class": "legend"})
        with legend.subgraph() as row:
            row.attr(rank="same")
            for i, style in enumerate(styles):
                for end in ("from", "to"):
                    row.node(f"legend_{i}_{end}", label="", shape="point", width="0.06",
                             **{"class": "legend"})
                row.edge(f"legend_{i}_from", f"legend_{i}_to", label=style.legend, color=style.color,
                         fontcolor=style.color, style=style.style, penwidth="1.4", minlen="2",
                         **{"class": f"legend {style.css_class}"})
                if i:  # keeps the samples in order, left to right
                    row.edge(f"legend_{i - 1}_to", f"legend_{i}_from", style="invis")


# --- the plan ------------------------------------------------------------------

def plan_figure(plan: Plan, title: str | None = None) -> graphviz.Digraph:
    """The dataflow graph, the schedule of one period, and each problem's hypergradient pass:
    which lower problems it differentiates through, in order, with which method."""
    dot = _digraph("mlodsl_plan", title)
    with dot.subgraph(name="cluster_graph") as g:
        g.attr(label="dataflow graph", fontsize="12", color="#999999", **{"class": "dataflow"})
        add_problems(g, plan.graph)
        add_edges(g, plan.graph)
    dot.node("schedule", label=schedule_label(plan), shape="plain", **{"class": "schedule"})
    for i, hp in enumerate(h for h in plan.hypergrads if h.visits):
        add_hypergrad(dot, hp, i)
    add_legend(dot, (STYLES[EdgeKind.U2L], STYLES[EdgeKind.L2U], ADJOINT))
    return dot


def schedule_label(plan: Plan) -> str:
    """An HTML table: the prologue (when there is one) and one period, runs of equal iterations
    collapsed (``iter 1-2``)."""
    rows = []
    if plan.schedule.prologue:
        rows += [_header("prologue (runs once)")] + _schedule_rows(plan.schedule.prologue, 1)
    rows += [_header("schedule, one period (repeats)")]
    rows += _schedule_rows(plan.schedule.period, len(plan.schedule.prologue) + 1)
    return (f'<<table border="1" cellborder="0" cellspacing="0" cellpadding="4" color="#999999">'
            f'{"".join(rows)}</table>>')


def _header(text: str) -> str:
    return f'<tr><td colspan="2" bgcolor="#eeeeee"><b>{_esc(text)}</b></td></tr>'


def _schedule_rows(iterations: Sequence[Iteration], start: int) -> list[str]:
    rows = []
    for first, last, it in collapse(iterations):
        label = f"iter {start + first}" if first == last else f"iter {start + first}-{start + last}"
        steps = " → ".join(_esc(s.problem) for s in it.steps)
        rows.append(f'<tr><td align="left">{label}</td><td align="left">{steps}</td></tr>')
    return rows


def collapse(iterations: Sequence[Iteration]) -> list[tuple[int, int, Iteration]]:
    """Runs of iterations stepping the same problems, as ``(first, last, iteration)`` (0-based)."""
    runs: list[tuple[int, int, Iteration]] = []
    for i, it in enumerate(iterations):
        if runs and _same(runs[-1][2], it):
            runs[-1] = (runs[-1][0], i, runs[-1][2])
        else:
            runs.append((i, i, it))
    return runs


def _same(a: Iteration, b: Iteration) -> bool:
    return [s.problem for s in a.steps] == [s.problem for s in b.steps]


def add_hypergrad(dot: graphviz.Digraph, hp: HypergradPlan, index: int) -> None:
    """One cluster per problem P with a hypergradient: ∂C_P seeds adjoints at the lower optima
    P reads; each visit (one method call, in order) passes them on to θ_P and lower optima."""
    prefix = f"hg{index}"
    visit_ids = {v.problem: f"{prefix}_visit{j}" for j, v in enumerate(hp.visits)}
    with dot.subgraph(name=f"cluster_{prefix}") as c:
        c.attr(label=f"hypergradient of {hp.problem}", fontsize="12", color=ADJOINT_COLOR,
               **{"class": "hypergrad"})
        _hypergrad_nodes(c, hp, prefix, visit_ids)
        for seed in hp.seeds:
            _adjoint(c, f"{prefix}_seed", visit_ids[seed], f"v_{seed}")
        for v in hp.visits:
            for lower in v.to_lowers:
                _adjoint(c, visit_ids[v.problem], visit_ids[lower], f"v_{lower}")
            if v.to_upper:
                _adjoint(c, visit_ids[v.problem], f"{prefix}_theta", "")


def _hypergrad_nodes(c: graphviz.Digraph, hp: HypergradPlan, prefix: str,
                     visit_ids: dict[str, str]) -> None:
    """The seed ∂C_P, one box per visit (its order, problem and method), and the total dC_P/dθ_P."""
    p = hp.problem
    c.node(f"{prefix}_seed", label=f"∂C_{p}", shape="ellipse", **{"class": "seed"})
    c.node(f"{prefix}_theta", label=f"dC_{p} / dθ_{p}", shape="box", style="rounded,filled",
           fillcolor="#dde8f3", **{"class": "theta"})
    for j, v in enumerate(hp.visits):
        c.node(visit_ids[v.problem], label=_visit_label(j, v.problem, v.method_repr), shape="box",
               **{"class": "visit"})


def _visit_label(order: int, problem: str, method_repr: str) -> str:
    return (f'<<b>{order + 1}. {_esc(problem)}</b><br/>'
            f'<font point-size="10">{_esc(method_repr)}</font>>')


def _adjoint(dot: graphviz.Digraph, src: str, dst: str, label: str) -> None:
    dot.edge(src, dst, label=label, color=ADJOINT.color, fontcolor=ADJOINT.color,
             style=ADJOINT.style, penwidth="1.4", **{"class": ADJOINT.css_class})


# --- rendering -------------------------------------------------------------------

@frozen
class Renderer:
    """A program that reads DOT on stdin and writes ``-T<format>`` output on stdout."""

    name: str
    executable: str

    def run(self, source: str, fmt: str) -> bytes:
        """The rendered bytes; raises :class:`RenderError` saying why this renderer failed."""
        try:
            done = subprocess.run([self.executable, f"-T{fmt}"], input=source.encode("utf-8"),
                                  capture_output=True, timeout=RENDER_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RenderError(f"{self.name} ({self.executable}) could not run: {e}") from e
        if done.returncode != 0 or not done.stdout:
            why = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
            raise RenderError(f"{self.name} ({self.executable}) failed: {why[0]}")
        return done.stdout


def renderers(choice: str = "auto") -> tuple[Renderer, ...]:
    """Renderers to try, in order: system ``dot`` first, then ``graphviz-pure``.

    ``choice`` is ``"auto"`` (both, where found), ``"dot"`` or ``"graphviz-pure"``.
    """
    found = []
    if choice in ("auto", "dot") and (path := shutil.which("dot")):
        found.append(Renderer("dot", path))
    if choice in ("auto", "graphviz-pure") and (path := graphviz_pure()):
        found.append(Renderer("graphviz-pure", path))
    return tuple(found)


def graphviz_pure() -> str | None:
    """The ``graphviz-pure`` executable: on PATH, else beside this Python (an unactivated venv)."""
    on_path = shutil.which("graphviz-pure")
    if on_path:
        return on_path
    exe = "graphviz-pure.exe" if os.name == "nt" else "graphviz-pure"
    for folder in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        candidate = folder / exe
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def render(source: str, fmt: str, choice: str = "auto") -> tuple[bytes, Renderer]:
    """DOT ``source`` rendered to ``fmt`` (``svg`` or ``png``) by the first renderer that works."""
    tried = []
    for renderer in renderers(choice):
        try:
            return renderer.run(source, fmt), renderer
        except RenderError as e:
            tried.append(str(e))
    if not tried:
        tried.append(_none_found(choice))
    raise RenderError(NO_RENDERER.format(fmt=fmt.upper(), tried="; ".join(tried)))


def _none_found(choice: str) -> str:
    if choice == "dot":
        return "no `dot` on PATH"
    if choice == "graphviz-pure":
        return "no `graphviz-pure` executable on PATH or beside this Python"
    return "neither `dot` nor `graphviz-pure` was found on PATH or beside this Python"
