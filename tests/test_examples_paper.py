"""The paper's benchmarks and the HPO and MAML examples run at a tiny size.

Each example's ``main([...])`` runs in a few seconds here; the tests check the
compiled programs' graphs, that accuracies are numbers in [0, 1], that the
tables have one row per method, and a few invariants of the data and the
methods that could break (long-tail counts, disjoint splits, DARTS'
derivation, the MAML gradient against a hand-written one).
"""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

digits = importlib.import_module("digits")


def load(name: str):
    return importlib.import_module(name)


def edges(program) -> set[tuple[str, str, str]]:
    return {(e.src, e.dst, e.kind.value) for e in program.graph.edges}


def table_rows(text: str) -> list[str]:
    """The first cell of each body row of a markdown table."""
    return [line.split("|")[1].strip() for line in text.splitlines()[2:]]


def check_accuracies(values) -> None:
    values = list(values)
    assert values and all(isinstance(a, float) and 0.0 <= a <= 1.0 for a in values)


# -- digits.py -----------------------------------------------------------------------------
def test_split_is_disjoint_and_balanced():
    s = digits.split(3)
    x = torch.cat([s.train[0], s.meta[0], s.test[0]])
    assert len(x) == 1797
    assert digits.class_counts(s.meta) == [10] * 10 and digits.class_counts(s.test) == [50] * 10
    assert len(torch.unique(x, dim=0)) == len(torch.unique(digits.load()[0], dim=0))


@pytest.mark.parametrize("factor", [10, 50, 100])
def test_long_tail_interpolates_geometrically(factor):
    counts = digits.class_counts(digits.long_tail(digits.split(0).train, factor, 0))
    assert counts == sorted(counts, reverse=True)
    assert counts[0] / counts[-1] == pytest.approx(factor, rel=0.15)
    assert counts[5] == round(counts[0] * factor ** (-5 / 9))


def test_label_noise_resamples_about_the_rate():
    train = digits.split(0).train
    _, noisy = digits.label_noise(train, 0.4, 0)
    changed = float((noisy != train[1]).float().mean())
    assert 0.3 < changed < 0.42          # 40% resampled, a tenth of them to the same label


def test_shifts_are_deterministic_and_change_the_images():
    x = digits.split(0).test[0][:20]
    for kind in digits.SHIFTS:
        assert torch.equal(digits.shift(x, kind), digits.shift(x, kind))
        assert kind == "none" or not torch.equal(digits.shift(x, kind), x)
    assert torch.equal(digits.shift(x, "rot90", "rot270"), x)


def test_measure_sees_tensor_memory():
    m = digits.measure(lambda: torch.ones(8_000_000).sum())
    assert m.peak_mib > 20 and m.seconds >= 0 and float(m.value) == 8_000_000


# -- data_reweighting.py -----------------------------------------------------------------------
def test_data_reweighting_tiny_table():
    dr = load("data_reweighting")
    methods = ["ce", "cb", "ce+meta", "mwn-fd-1", "mwn-cg-1", "cmwn-neumann-5"]
    out = dr.main(["--settings", "lt100", "noise20", "--methods", *methods, "--iterations", "5", "--table"])
    assert len(out["results"]) == 2 * len(methods)
    check_accuracies(r.accuracy for r in out["results"])
    assert table_rows(out["table"]) == methods
    assert out["table"].splitlines()[0].startswith("| method | lt100 | noise20 |")


def test_data_reweighting_program_and_weights():
    dr = load("data_reweighting")
    cfg = dr.Config(iterations=10)
    program = dr.build(dr.data("lt10", 0), "itd", 5, 0, cfg)
    assert edges(program) == {("classifier", "reweight", "lower-to-upper"),
                              ("reweight", "classifier", "upper-to-lower")}
    program.run(iterations=10)
    assert program.stats["steps/reweight"] == 2 and program.stats["steps/classifier"] == 10
    w = dr.class_balanced(dr.data("lt100", 0).train)
    assert w[-1] > w[0] and float(w.mean()) == pytest.approx(1.0)


def test_data_reweighting_rejects_unknown_methods():
    with pytest.raises(ValueError, match="unknown method"):
        load("data_reweighting").main(["--methods", "mwn-adam-1", "--iterations", "1"])


# -- architecture_search.py ------------------------------------------------------------------
def test_architecture_search_tiny_table():
    nas = load("architecture_search")
    methods = ["first_order-1", "fd-3", "random"]
    out = nas.main(["--methods", *methods, "--search-iterations", "3", "--train-iterations", "3",
                    "--random-candidates", "2", "--table"])
    check_accuracies(r.accuracy for r in out["results"])
    assert table_rows(out["table"]) == methods
    for r in out["results"]:
        assert len(r.genotype) == 5 and r.params > 0 and r.search_seconds > 0


def test_darts_derivation_keeps_the_two_strongest_edges():
    nas = load("architecture_search")
    w = torch.full((len(nas.EDGES), len(nas.OPS)), 0.1)
    w[:, nas.OPS.index("none")] = 0.9                   # "none" never wins
    e03 = nas.EDGES.index((0, 3))
    e13, e23 = nas.EDGES.index((1, 3)), nas.EDGES.index((2, 3))
    w[e03, nas.OPS.index("conv5x5")] = 0.5
    w[e23, nas.OPS.index("max_pool3x3")] = 0.4
    w[e13, nas.OPS.index("skip")] = 0.3
    genotype = nas.derive(w)
    into3 = [(e, op) for e, op in genotype if nas.EDGES[e][1] == 3]
    assert into3 == [(e03, "conv5x5"), (e23, "max_pool3x3")]
    assert sum(1 for e, _ in genotype if nas.EDGES[e][1] == 1) == 1


def test_architecture_search_program():
    nas = load("architecture_search")
    program = nas.build(nas.data(0), "fd", 3, 0, nas.Config(search_iterations=3))
    assert edges(program) == {("classifier", "architecture", "lower-to-upper"),
                              ("architecture", "classifier", "upper-to-lower")}
    program.run(iterations=3)
    alpha = program["architecture"].module.alpha
    assert program.stats["steps/architecture"] == 1 and float(alpha.abs().sum()) > 0


# -- domain_adaptation.py --------------------------------------------------------------------
def test_domain_adaptation_tiny_table():
    da = load("domain_adaptation")
    methods = list(da.METHODS)
    out = da.main(["--methods", *methods, "--iterations", "4", "--table"])
    check_accuracies(r.accuracy for r in out["results"])
    assert table_rows(out["table"]) == methods
    by = {r.method: r for r in out["results"]}
    assert math.isnan(by["pretrain-finetune"].weight_rot90)
    assert 0.0 < by["reweight-fd"].weight_rot90 < 1.0


def test_domain_adaptation_is_trilevel():
    da = load("domain_adaptation")
    d = da.data(0)
    program = da.build(d, "neumann", 0, da.Config())
    assert edges(program) == {("finetune", "reweight", "lower-to-upper"),
                              ("pretrain", "finetune", "lower-to-upper"),
                              ("reweight", "pretrain", "upper-to-lower")}
    assert [program.graph.node(n).level for n in ("reweight", "finetune", "pretrain")] == [3, 2, 1]
    assert edges(da.build(d, None, 0, da.Config())) == {("pretrain", "finetune", "lower-to-upper")}
    assert set(d.turns.tolist()) == {0, 1, 2, 3}
    assert len(d.target_train[1]) == 50 and len(d.target_test[1]) == 500


# -- hyperparameter_optimization.py ------------------------------------------------------------
def test_hyperparameter_optimization_tiny_table():
    hpo = load("hyperparameter_optimization")
    methods = list(hpo.METHODS)
    out = hpo.main(["--methods", *methods, "--iterations", "10", "--table"])
    check_accuracies(r.accuracy for r in out["results"])
    assert table_rows(out["table"]) == methods
    by = {r.method: r for r in out["results"]}
    assert by["none"].decay == 0.0 and by["grid"].decay in hpo.GRID


def test_hyperparameter_optimization_moves_the_decays():
    hpo = load("hyperparameter_optimization")
    program = hpo.build(hpo.data(0), "cg", 0, hpo.Config())
    assert edges(program) == {("classifier", "decay", "lower-to-upper"),
                              ("decay", "classifier", "upper-to-lower")}
    logs = program["decay"].module.logs
    assert [tuple(t.shape) for t in logs] == [tuple(p.shape) for p in program["classifier"].module.parameters()]
    before = [t.detach().clone() for t in logs]
    program.run(iterations=3)
    assert any(not torch.equal(a, b) for a, b in zip(before, logs))


# -- maml.py --------------------------------------------------------------------------------------
def test_maml_tiny_table():
    maml = load("maml")
    out = maml.main(["--methods", "scratch", "fomaml", "maml", "--splits", "images", "classes",
                     "--iterations", "10", "--test-tasks", "8", "--table"])
    check_accuracies(r.accuracy for r in out["results"])
    assert table_rows(out["table"]) == ["scratch", "fomaml", "maml"]
    assert "images, 1-shot (%)" in out["table"] and "classes, 1-shot (%)" in out["table"]


def test_maml_gradient_is_the_hand_written_one():
    """Unrolled through the inner steps from δ = 0 gives exactly MAML's second-order gradient."""
    maml = load("maml")
    cfg = maml.Config(meta_lr=0.0, steps=3)                 # θ stays put, so the check is exact
    program = maml.build(maml.data(0)[0], maml.SPLITS["images"][0], "maml", 1, 0, cfg)
    assert edges(program) == {("adapt", "meta", "lower-to-upper"), ("meta", "adapt", "upper-to-lower")}
    program.run(iterations=cfg.steps)
    got = program.gradient("meta")
    task = program["adapt"].data.current.task
    theta = {n: t.detach().clone().requires_grad_() for n, t in program["meta"].module().items()}
    fast = {n: theta[n].expand(cfg.tasks_per_batch, *maml.SHAPES[n]) for n in maml.SHAPES}
    for _ in range(cfg.steps):
        loss = maml.task_loss(maml.forward(task.support[0], fast), task.support[1])
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
        fast = {n: f - cfg.inner_lr * g for (n, f), g in zip(fast.items(), grads)}
    outer = maml.task_loss(maml.forward(task.query[0], fast), task.query[1]) / cfg.tasks_per_batch
    want = torch.autograd.grad(outer, list(theta.values()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
