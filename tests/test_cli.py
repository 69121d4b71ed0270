"""The ``mlodsl`` command, called in-process: exit codes and what it prints."""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import textwrap
from pathlib import Path

import pytest

from tests._svg import parse, select
from mlodsl import _render
from mlodsl.cli import build_parser, main

PROGRAMS = Path(__file__).resolve().parent / "programs"


def prog(name: str) -> str:
    return str(PROGRAMS / name)


def write(tmp_path: Path, name: str, source: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return str(path)


# --- help on every command and option --------------------------------------------------

@pytest.mark.parametrize("argv", [["--help"], ["graph", "--help"], ["plan", "--help"],
                                  ["check", "--help"]])
def test_help(argv, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mlodsl") and "exit status:" in out


def test_every_option_has_help():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        assert sub.description, name
        for action in sub._actions:
            assert action.help, f"mlodsl {name} {action.option_strings or action.dest} has no help"
    assert all(a.help for a in parser._actions)


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("mlodsl ")


def test_usage_errors_exit_2(capsys):
    assert main([]) == 2
    assert main(["draw", prog("bilevel.py")]) == 2
    assert main(["graph", prog("bilevel.py"), "--format", "pdf"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_console_script_is_main():
    (entry,) = importlib.metadata.entry_points(group="console_scripts", name="mlodsl")
    assert entry.load() is main


# --- check and plan -----------------------------------------------------------------------

def test_check(capsys):
    assert main(["check", prog("bilevel.py")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("L2 reweight ") and "Sequential, 2 params, Adam(lr=0.001)" in lines[0]
    assert "bilevel.py:16)" in lines[0]
    assert "L1 classifier" in lines[1] and "hypergrad=Neumann(iterations=3, alpha=None)" in lines[1]
    assert lines[2] == "ok: 2 problems, 2 edges, a period of 1 iteration(s)"


def test_check_compiles_the_problems_of_a_file_without_a_program(capsys):
    assert main(["check", prog("diamond.py")]) == 0
    out = capsys.readouterr().out
    assert [line.split()[1] for line in out.splitlines()[:4]] == ["top", "left", "right", "bottom"]
    assert out.splitlines()[-1] == "ok: 4 problems, 9 edges, a period of 3 iteration(s)"


def test_plan(capsys):
    assert main(["plan", prog("trilevel.py")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Plan: 3 problems, 4 edges, period of 2 iteration(s)")
    assert "iter 2         step bottom -> mid -> top" in out
    assert "mid: CG(iterations=4, damping=0.0) -> θ_top" in out


# --- graph --------------------------------------------------------------------------------

def test_graph_svg_to_stdout(capsys):
    assert main(["graph", prog("bilevel.py")]) == 0
    items = parse(capsys.readouterr().out)
    assert {n.title for n in select(items, "node", "problem")} == {"reweight", "classifier"}
    assert [e.title for e in select(items, "edge", "u2l")] == ["reweight->classifier"]
    assert [e.title for e in select(items, "edge", "l2u")] == ["classifier->reweight"]


@pytest.mark.parametrize("name,magic", [("g.svg", b"<?xml"), ("g.png", b"\x89PNG"),
                                        ("g.dot", b"digraph mlodsl_graph"),
                                        ("g.gv", b"digraph mlodsl_graph")])
def test_graph_format_from_the_output_suffix(tmp_path, capsys, name, magic):
    out = tmp_path / name
    assert main(["graph", prog("diamond.py"), "-o", str(out)]) == 0
    assert out.read_bytes().startswith(magic)
    assert f"wrote {out}: graph of 4 problems, 9 edges" in capsys.readouterr().out


def test_format_option_wins_over_the_suffix(tmp_path):
    out = tmp_path / "graph.txt"
    assert main(["graph", prog("diamond.py"), "-o", str(out), "--format", "dot"]) == 0
    assert out.read_text().startswith("digraph mlodsl_graph")


def test_unknown_suffix_is_a_usage_error(tmp_path, capsys):
    assert main(["graph", prog("diamond.py"), "-o", str(tmp_path / "g.pdf")]) == 2
    assert "cannot tell the format from the output name" in capsys.readouterr().err


def test_graph_plan(tmp_path, capsys):
    out = tmp_path / "plan.svg"
    assert main(["graph", prog("diamond.py"), "--plan", "-o", str(out)]) == 0
    items = parse(out.read_bytes())
    assert len(select(items, "node", "problem")) == 4
    assert len(select(items, "node", "schedule")) == 1
    assert len(select(items, "cluster", "hypergrad")) == 3
    assert "plan of 4 problems" in capsys.readouterr().out


def test_png_to_a_pipe(capsysbinary):
    assert main(["graph", prog("bilevel.py"), "--format", "png"]) == 0
    assert capsysbinary.readouterr().out.startswith(b"\x89PNG")


def test_png_to_a_terminal_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["graph", prog("bilevel.py"), "--format", "png"]) == 3
    assert "-o graph.png" in capsys.readouterr().err


def test_unwritable_output_exits_3(tmp_path, capsys):
    assert main(["graph", prog("bilevel.py"), "-o", str(tmp_path / "no" / "g.svg")]) == 3
    assert "cannot write" in capsys.readouterr().err


def test_renders_with_dot_hidden_from_path(tmp_path, monkeypatch):
    """The fallback: no `dot` anywhere on PATH, graphviz-pure (beside this Python) draws."""
    monkeypatch.setenv("PATH", str(tmp_path))
    out = tmp_path / "g.svg"
    assert main(["graph", prog("diamond.py"), "-o", str(out)]) == 0
    assert b"graphviz-pure" in out.read_bytes()


def test_no_renderer_exits_3_and_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(_render, "graphviz_pure", lambda: None)
    assert main(["graph", prog("bilevel.py"), "-o", str(tmp_path / "g.svg")]) == 3
    err = capsys.readouterr().err
    assert "pip install graphviz-pure" in err and "--format dot" in err
    assert main(["graph", prog("bilevel.py"), "-o", str(tmp_path / "g.dot")]) == 0


# --- loading FILE ----------------------------------------------------------------------------

def test_main_block_does_not_run_and_sys_path_is_restored(tmp_path, capsys):
    """bilevel.py raises SystemExit in its __main__ block; here a marker file would appear."""
    marker = tmp_path / "ran"
    path = write(tmp_path, "guarded.py", f"""
        import torch
        from mlodsl import problem
        m = torch.nn.Linear(1, 1)
        @problem(module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1))
        def only():
            return only(torch.ones(1)).sum()
        assert __name__ != "__main__"
        if __name__ == "__main__":
            open({str(marker)!r}, "w").close()
        """)
    before = list(sys.path)
    assert main(["check", path]) == 0
    assert not marker.exists() and sys.path == before
    assert main(["check", prog("bilevel.py")]) == 0


def test_dotted_module_name(tmp_path, monkeypatch, capsys):
    package = tmp_path / "mlodsl_cli_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "experiment.py").write_text((PROGRAMS / "trilevel.py").read_text())
    monkeypatch.chdir(tmp_path)
    assert main(["check", "mlodsl_cli_pkg.experiment"]) == 0
    assert "ok: 3 problems" in capsys.readouterr().out


def test_pick_one_of_several_programs(capsys):
    assert main(["check", prog("two_programs.py")]) == 2
    err = capsys.readouterr().err
    assert "defines 2 Programs: first, second" in err and "two_programs.py:first" in err
    assert main(["check", prog("two_programs.py") + ":second"]) == 0
    capsys.readouterr()
    assert main(["check", prog("two_programs.py") + ":outer"]) == 1  # one problem, alone
    assert "uses problem 'inner', which is not part of this Program" in capsys.readouterr().err
    assert main(["check", prog("two_programs.py") + ":x"]) == 2
    assert "use one of: outer, inner, first, second" in capsys.readouterr().err


def test_a_function_that_builds_the_program(tmp_path, capsys):
    body = """
        import torch
        from mlodsl import Program, problem
        def build({args}) -> Program:
            m = torch.nn.Linear(1, 1)
            @problem(module=m, optimizer=torch.optim.SGD(m.parameters(), lr=lr))
            def only():
                return only(torch.ones(1)).sum()
            return Program([only])
        """
    needs = write(tmp_path, "factory.py", body.format(args="lr"))
    assert main(["check", needs]) == 2
    assert "it builds its Program inside build()" in capsys.readouterr().err
    no_args = write(tmp_path, "demo.py", body.format(args="lr=0.1"))
    assert main(["check", no_args]) == 0  # a zero-argument `-> Program` function is called
    assert "ok: 1 problems" in capsys.readouterr().out
    assert main(["check", no_args + ":build"]) == 0
    assert "ok: 1 problems" in capsys.readouterr().out


def test_problems_in_a_list_are_found(tmp_path, capsys):
    path = write(tmp_path, "loop.py", """
        import torch
        from mlodsl import problem
        def make(i, upper):
            m = torch.nn.Linear(1, 1)
            @problem(module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.1), name=f"p{i}",
                     upper=upper)
            def p():
                return m(torch.ones(1)).sum()
            return p
        levels = []
        for i in range(3):
            levels.append(make(i, levels[-1:]))
        """)
    assert main(["check", path]) == 0
    assert "ok: 3 problems" in capsys.readouterr().out


# --- errors in the user's file -----------------------------------------------------------------

def test_compile_error_exits_1_without_traceback(capsys):
    assert main(["graph", prog("unrelated.py"), "--format", "dot"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("mlodsl graph: error: the loss of 'student' (")
    assert "unrelated.py:19" in captured.err and "Fix: declare the level" in captured.err
    assert "Traceback" not in captured.err


def test_compile_error_with_traceback(capsys):
    assert main(["check", prog("unrelated.py"), "--traceback"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "CompileError" in err and "Fix: declare the level" in err


def test_compile_error_of_problems_without_a_program(tmp_path, capsys):
    path = write(tmp_path, "loose.py", """
        import torch
        from mlodsl import problem
        a_m, b_m = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
        @problem(module=a_m, optimizer=torch.optim.SGD(a_m.parameters(), lr=0.1))
        def a():
            return b(torch.ones(1)).sum()
        @problem(module=b_m, optimizer=torch.optim.SGD(b_m.parameters(), lr=0.1))
        def b():
            return b(torch.ones(1)).sum()
        """)
    assert main(["plan", path]) == 1
    err = capsys.readouterr().err
    assert "the loss of 'a' (" in err and "loose.py:7" in err and "Traceback" not in err


def test_missing_file_exits_2(capsys):
    assert main(["check", prog("nope.py")]) == 2
    err = capsys.readouterr().err
    assert "is neither a Python file nor an importable module" in err and "no file" in err


def test_missing_module_exits_2(capsys):
    assert main(["check", "no_such_module_for_mlodsl.experiment"]) == 2
    assert "no module 'no_such_module_for_mlodsl.experiment' importable" in capsys.readouterr().err


def test_import_error_exits_2_with_the_line(capsys):
    assert main(["check", prog("import_error.py")]) == 2
    err = capsys.readouterr().err
    assert "failed with KeyError: 'large'" in err
    assert "import_error.py:4" in err and 'width = SIZES["large"]' in err
    assert "Traceback" not in err


def test_import_error_with_traceback(capsys):
    assert main(["check", prog("import_error.py"), "--traceback"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "KeyError" in err and "failed with KeyError" in err


def test_syntax_error_exits_2_with_the_line(tmp_path, capsys):
    path = write(tmp_path, "typo.py", """
        import torch
        def loss(:
            pass
        """)
    assert main(["check", path]) == 2
    err = capsys.readouterr().err
    assert "failed with SyntaxError" in err and "typo.py:3" in err and "def loss(:" in err


def test_missing_dependency_exits_2(tmp_path, capsys):
    path = write(tmp_path, "needs.py", "import torch\nimport no_such_package_for_mlodsl\n")
    assert main(["check", path]) == 2
    err = capsys.readouterr().err
    assert "ModuleNotFoundError: No module named 'no_such_package_for_mlodsl'" in err
    assert "needs.py:2" in err


def test_exit_in_the_file_exits_2(tmp_path, capsys):
    path = write(tmp_path, "quits.py", "import sys\nsys.exit('needs a GPU')\n")
    assert main(["check", path]) == 2
    assert "failed with SystemExit: needs a GPU" in capsys.readouterr().err


def test_no_problems_exits_2(capsys):
    assert main(["graph", prog("no_problems.py")]) == 2
    err = capsys.readouterr().err
    assert "no_problems.py defines no problems" in err and "program = Program([...])" in err
