"""The pictures: parse the SVG and check nodes, edges per kind, colours and labels.

Every program file under tests/programs and examples/ that compiles is drawn and
checked against its own graph; adding an example adds it here. The diamond (the
paper's Figure 2 shape) is also checked against hand-written numbers. The
renderer choice is tested with a fake ``dot`` and with ``dot`` hidden from PATH.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests._svg import Item, parse, select
from compiler import EdgeKind, ProblemSpec, Reference, SourceLoc, compile_specs
from mlodsl import _render
from mlodsl._load import LoadError, load
from mlodsl._render import (L2U_COLOR, U2L_COLOR, ADJOINT_COLOR, RenderError, collapse, graph_figure,
                            plan_figure, render, renderers)

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = ROOT / "tests" / "programs"
# The files of tests/programs that are broken on purpose (tested in test_cli.py).
BROKEN = {"unrelated", "import_error", "no_problems", "two_programs"}
# Files of examples/ that are not programs (shared data preparation).
EXAMPLE_HELPERS = {"digits.py"}


def program_files() -> list[Path]:
    """Every program to draw: tests/programs (but the broken ones) and all of examples/."""
    own = [p for p in sorted(PROGRAMS.glob("*.py")) if p.stem not in BROKEN]
    examples = [p for p in sorted((ROOT / "examples").glob("*.py"))
                if not p.name.startswith("_") and p.name not in EXAMPLE_HELPERS]
    return own + examples


def svg_of(figure, renderer: str = "auto") -> list[Item]:
    data, _ = render(figure.source, "svg", renderer)
    return parse(data)


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


# --- every program: the SVG shows exactly its graph ----------------------------------

@pytest.fixture(scope="module", params=program_files(), ids=_id)
def drawn(request):
    """(program, parsed SVG of its graph) for each program file.

    Every example must be drawable: a Program at module level, or a zero-argument
    ``-> Program`` function such as ``demo()``; a failure to load fails the test.
    """
    program = load(str(request.param))
    return program, svg_of(graph_figure(program.graph))


def test_one_node_per_problem(drawn):
    program, items = drawn
    nodes = select(items, "node", "problem")
    assert sorted(n.title for n in nodes) == sorted(program.graph.names)


@pytest.mark.parametrize("kind", [EdgeKind.U2L, EdgeKind.L2U], ids=["u2l", "l2u"])
def test_edges_of_each_kind(drawn, kind):
    program, items = drawn
    css = "u2l" if kind is EdgeKind.U2L else "l2u"
    edges = select(items, "edge", css)
    expected = sorted(f"{e.src}->{e.dst}" for e in program.graph.edges_of(kind))
    assert sorted(e.title for e in edges) == expected
    assert len(select(items, "edge")) == len(program.graph.edges)  # no other visible edges


def test_edge_colours_styles_and_labels(drawn):
    _, items = drawn
    for e in select(items, "edge", "u2l"):
        src = e.title.split("->")[0]
        assert e.strokes == (U2L_COLOR,) and not e.dashed and e.texts == (f"θ_{src}",)
    for e in select(items, "edge", "l2u"):
        src = e.title.split("->")[0]
        assert e.strokes == (L2U_COLOR,) and e.dashed and e.texts == (f"θ*_{src}",)


def test_legend_shows_both_kinds(drawn):
    _, items = drawn
    legend = [i for i in items if {"edge", "legend"} <= i.classes]
    assert [e.strokes for e in legend] == [(U2L_COLOR,), (L2U_COLOR,)]
    assert [e.texts for e in legend] == [("upper-to-lower (θ)",), ("lower-to-upper (θ*)",)]


def test_levels_ranked_uppermost_on_top(drawn):
    program, items = drawn
    y = {n.title: n.y for n in select(items, "node", "problem")}
    for node in program.graph.nodes:
        for upper in node.above:
            assert y[upper] < y[node.name], f"{upper} is drawn below {node.name}"
    for a in program.graph.nodes:  # one row per level
        assert all(y[a.name] == y[b.name] for b in program.graph.nodes if b.level == a.level)


def test_nodes_show_what_the_problem_is(drawn):
    program, items = drawn
    for n in select(items, "node", "problem"):
        node, info = program.graph.node(n.title), dict(program.graph.node(n.title).spec.info)
        assert n.texts[0] == node.name
        assert f"{info['module']} · {int(info['params']):,} params" in n.texts
        assert info["optimizer"] in n.texts
        assert f"level {node.level} · steps={node.steps}" in n.texts
        method = f"hypergrad: {node.spec.method_repr}" if node.above else "hypergrad: unused (uppermost)"
        assert method in n.texts


# --- the four-problem diamond, by hand ------------------------------------------------

@pytest.fixture(scope="module")
def diamond():
    return load(str(PROGRAMS / "diamond.py"))


def test_diamond_graph_by_hand(diamond):
    items = svg_of(graph_figure(diamond.graph))
    assert len(select(items, "node", "problem")) == 4
    assert {e.title for e in select(items, "edge", "u2l")} == {
        "top->left", "top->right", "top->bottom", "left->bottom", "right->bottom"}
    assert {e.title for e in select(items, "edge", "l2u")} == {
        "left->top", "right->top", "bottom->left", "bottom->right"}
    bottom = next(n for n in items if n.title == "bottom")
    assert bottom.texts == ("bottom", "Linear · 6 params", "SGD(lr=0.1)", "level 1 · steps=3",
                            "hypergrad: FiniteDifference(eps=0.01)")


def test_diamond_plan_by_hand(diamond):
    items = svg_of(plan_figure(diamond.plan))
    assert len(select(items, "node", "problem")) == 4
    assert len(select(items, "edge", "u2l")) == 5 and len(select(items, "edge", "l2u")) == 4
    schedule = select(items, "node", "schedule")[0]
    assert schedule.texts == ("schedule, one period (repeats)", "iter 1-2", "bottom", "iter 3",
                              "bottom → left → right → top")
    clusters = select(items, "cluster", "hypergrad")
    assert [c.text for c in clusters] == ["hypergradient of top", "hypergradient of left",
                                          "hypergradient of right"]
    visits = [v.texts for v in select(items, "node", "visit")]
    assert visits == [("1. left", "Neumann(iterations=3, alpha=None)"),
                      ("2. right", "CG(iterations=10, damping=0.0)"),
                      ("3. bottom", "FiniteDifference(eps=0.01)"),
                      ("1. bottom", "FiniteDifference(eps=0.01)"),
                      ("1. bottom", "FiniteDifference(eps=0.01)")]
    adjoints = select(items, "edge", "adjoint")
    # top: 2 seeds, left and right pass on to bottom, 3 visits reach θ_top; left, right: 1 + 1
    assert len(adjoints) == 7 + 2 + 2
    assert all(a.strokes == (ADJOINT_COLOR,) and a.dashed for a in adjoints)
    assert sorted(a.text for a in adjoints if a.text) == sorted(
        ["v_left", "v_right", "v_bottom", "v_bottom", "v_bottom", "v_bottom"])
    assert [n.text for n in select(items, "node", "theta")] == [
        "dC_top / dθ_top", "dC_left / dθ_left", "dC_right / dθ_right"]


def test_plan_with_a_prologue_and_no_hypergradient():
    specs = [ProblemSpec("solo", SourceLoc("f.py", 1))]
    items = svg_of(plan_figure(compile_specs(specs)))
    assert select(items, "cluster", "hypergrad") == [] and select(items, "edge", "adjoint") == []
    assert select(items, "node", "schedule")[0].texts == (
        "schedule, one period (repeats)", "iter 1", "solo")


def test_names_that_are_not_identifiers_and_bare_specs():
    """A name with ':' would be a DOT port; a spec without info draws without those rows."""
    specs = [ProblemSpec("outer:a", SourceLoc("f.py", 1)),
             ProblemSpec("inner", SourceLoc("f.py", 5), upper=("outer:a",),
                         references=(Reference("outer:a", SourceLoc("f.py", 6)),))]
    items = svg_of(graph_figure(compile_specs(specs).graph))
    nodes = select(items, "node", "problem")
    assert [n.texts[0] for n in nodes] == ["outer:a", "inner"]
    assert nodes[0].texts[1:] == ("level 2 · steps=1", "hypergrad: unused (uppermost)")
    assert [e.texts for e in select(items, "edge", "u2l")] == [("θ_outer:a",)]


def test_collapse_runs_of_equal_iterations(diamond):
    runs = collapse(diamond.plan.schedule.period)
    assert [(a, b, str(it)) for a, b, it in runs] == [(0, 1, "bottom"),
                                                      (2, 2, "bottom, left, right, top")]


# --- choosing the renderer -------------------------------------------------------------

def _fake_dot(folder: Path, script: str) -> Path:
    folder.mkdir(exist_ok=True)
    exe = folder / "dot"
    exe.write_text(f"#!/bin/sh\n{script}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


def test_system_dot_comes_first(tmp_path, monkeypatch):
    fake = _fake_dot(tmp_path / "bin", "cat >/dev/null; echo '<svg>fake dot</svg>'")
    monkeypatch.setenv("PATH", str(fake.parent))
    assert [r.name for r in renderers()] == ["dot", "graphviz-pure"]
    data, used = render("digraph { a }", "svg")
    assert used.name == "dot" and data == b"<svg>fake dot</svg>\n"


def test_graphviz_pure_when_dot_is_hidden(tmp_path, monkeypatch, diamond):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert [r.name for r in renderers()] == ["graphviz-pure"]
    data, used = render(graph_figure(diamond.graph).source, "svg")
    assert used.name == "graphviz-pure" and b"graphviz-pure" in data
    assert len(select(parse(data), "node", "problem")) == 4
    png, _ = render(graph_figure(diamond.graph).source, "png")
    assert png.startswith(b"\x89PNG\r\n\x1a\n")


def test_a_broken_dot_falls_back(tmp_path, monkeypatch):
    fake = _fake_dot(tmp_path / "bin", "echo 'Format: \"svg\" not recognized' >&2; exit 1")
    monkeypatch.setenv("PATH", str(fake.parent))
    data, used = render("digraph { a }", "svg")
    assert used.name == "graphviz-pure" and b"<svg" in data


def test_no_renderer_says_what_to_install(tmp_path, monkeypatch):
    fake = _fake_dot(tmp_path / "bin", "exit 2")
    monkeypatch.setenv("PATH", str(fake.parent))
    monkeypatch.setattr(_render, "graphviz_pure", lambda: None)
    with pytest.raises(RenderError) as e:
        render("digraph { a }", "png")
    text = str(e.value)
    assert "could not render PNG: dot" in text and "failed" in text
    assert "pip install graphviz-pure" in text and "apt install graphviz" in text
    assert "--format dot" in text


def test_no_renderer_at_all(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(_render, "graphviz_pure", lambda: None)
    with pytest.raises(RenderError, match="neither `dot` nor `graphviz-pure` was found"):
        render("digraph { a }", "svg")
    with pytest.raises(RenderError, match="no `dot` on PATH"):
        render("digraph { a }", "svg", "dot")


@pytest.mark.skipif(not any(os.access(Path(d) / "dot", os.X_OK)
                            for d in os.environ.get("PATH", "").split(os.pathsep)),
                    reason="no system Graphviz `dot` installed")
def test_system_dot_draws_the_same_picture(diamond):
    """With Graphviz installed, its SVG carries the same nodes, edges, colours and labels."""
    by_dot = svg_of(graph_figure(diamond.graph), "dot")
    by_pure = svg_of(graph_figure(diamond.graph), "graphviz-pure")
    key = lambda items: sorted((tuple(sorted(i.classes)), i.title, i.texts, i.strokes, i.dashed)
                               for i in items if "cluster" not in i.classes)
    assert key(by_dot) == key(by_pure)


@pytest.mark.parametrize("name,plan", [("diamond.svg", False), ("diamond-plan.svg", True)])
def test_the_pictures_in_docs_are_current(diamond, name, plan):
    """docs/ shows what the CLI draws today; regenerate with the commands in README.md."""
    figure = plan_figure(diamond.plan) if plan else graph_figure(diamond.graph)
    key = lambda items: [(i.classes, i.title, i.texts, i.strokes, i.dashed) for i in items]
    now = svg_of(figure, "graphviz-pure")
    assert key(parse((ROOT / "docs" / name).read_bytes())) == key(now), \
        f"docs/{name} is stale: run the command in README.md (the mlodsl command section)"
