"""Every example runs at a tiny size in the suite."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_runs_and_reports_both_accuracies(capsys):
    results = load("quickstart").main(["--iterations", "20"])
    out = capsys.readouterr().out
    assert "reweight: direct gradient + adjoints seeded at classifier" in out
    assert set(results) == {"cross-entropy", "meta-weight-net"}
    assert all(0.0 <= acc <= 1.0 for acc in results.values())
