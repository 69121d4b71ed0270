"""Whole iterations captured and replayed (mlodsl._graphs), on the CPU with the emulated backend.

:class:`mlodsl._graphs.Emulated` has a CUDA graph's semantics: a replay runs the recorded
operations again on the tensors they read and wrote at capture, so anything that should have
been an input of the graph but was baked in gives a wrong result here as it would on a GPU.
Every test compares a program run with graphs against the same program run step by step.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mlodsl import MlodslWarning, Program, ProblemError, UsageError, problem
from mlodsl import _graphs
from mlodsl.hypergrad import CG, FiniteDifference, Neumann, Unrolled
from tests.quadratic import build as build_quadratic
from tests.quadratic import diamond
from tests.test_host_syncs import syncs  # noqa: F401 (the fixture: host reads made by mlodsl's code)

DT = torch.float64
METHODS = {"neumann": lambda: Neumann(iterations=2), "cg": lambda: CG(iterations=3),
           "fd": FiniteDifference, "itd": Unrolled}


def reweighting(method, steps: int = 1, *, n: int = 70, item: bool = False, dropout: str = "",
                lr_scheduler: bool = False, accumulate: int = 1, **program) -> Program:
    """Meta-Weight-Net in miniature: a classifier whose per-example losses a weight net reweights.
    70 examples in batches of 16: every pass ends with a batch of 6 (another shape)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=gen, dtype=DT)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2)).to(DT)
    wnet = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    train = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    meta = DataLoader(TensorDataset(x[:20].clone(), y[:20]), batch_size=10, shuffle=True)

    @problem(module=wnet, optimizer=torch.optim.Adam(wnet.parameters(), lr=1e-2), data=meta)
    def reweight(batch):
        xb, yb = batch
        logits = classifier(xb)
        if dropout == "upper":
            logits = F.dropout(logits, 0.2)
        return F.cross_entropy(logits, yb)

    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 5) if lr_scheduler else None

    @problem(module=net, optimizer=optimizer, scheduler=scheduler, data=train, upper=[reweight],
             hypergrad=method, steps=steps, grad_accumulation=accumulate)
    def classifier(batch):
        xb, yb = batch
        if dropout == "lower":
            xb = F.dropout(xb, 0.2)
        losses = F.cross_entropy(classifier(xb), yb, reduction="none")
        if item and losses.mean().item() > 1e9:
            return losses.sum()
        w = torch.sigmoid(reweight(losses.detach().unsqueeze(1))).squeeze(1)
        return (w * losses).mean()

    return Program([reweight, classifier], seed=0, **{"checks": "log", **program})


def emulate(program: Program) -> Program:
    _graphs.attach(program._runtime, _graphs.Emulated(), {})
    return program


def trained(program: Program, blocks: int = 6, per_block: int = 7) -> list[torch.Tensor]:
    for _ in range(blocks):
        program.run(per_block)
    return [t.detach().clone() for p in program.problems for t in p.module.parameters()]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("method", list(METHODS))
def test_replayed_iterations_give_the_eager_parameters_exactly(method, steps):
    eager = reweighting(METHODS[method](), steps)
    expected = trained(eager)
    graphed = emulate(reweighting(METHODS[method](), steps))
    with warnings.catch_warnings():
        warnings.simplefilter("error", MlodslWarning)  # graphs stay on
        got = trained(graphed)
    assert_same(got, expected)
    info = graphed.cuda_graphs
    assert info["off"] is None and info["captured"] == list(range(steps))
    # 42 iterations: one warm period, then replays, except each pass's last (6-example) batch
    # and the rest of its period, and each position's probe and first (checked) replay
    assert info["replays"] >= 10
    assert graphed.stats == eager.stats and graphed.iteration == eager.iteration == 42


def test_a_four_problem_diamond_in_float64_matches_its_eager_run():
    def run(graphs: bool) -> list[torch.Tensor]:
        quad = build_quadratic(diamond(Neumann(iterations=3), steps=2), seed=3)
        quad.program._runtime.checks = "log"
        if graphs:
            emulate(quad.program)
        got = trained(quad.program, blocks=5, per_block=8)  # a period of 8: warm, probed, checked, replayed
        assert not graphs or (quad.program.cuda_graphs["off"] is None and quad.program.cuda_graphs["replays"] >= 8)
        return got

    assert_same(run(True), run(False))


def test_the_emulator_catches_a_graph_that_bakes_in_its_batches(monkeypatch):
    """A graph that does not receive each new batch replays the captured one. With the first
    replay's check disabled the results are wrong; with it, graphs turn themselves off."""
    expected = trained(reweighting(Neumann(iterations=2)))
    monkeypatch.setattr(_graphs._Slot, "load", lambda self, batches: None)
    checked = emulate(reweighting(Neumann(iterations=2)))
    with pytest.warns(MlodslWarning, match="did not match the eager one"):
        assert_same(trained(checked), expected)
    assert checked.cuda_graphs["off"].startswith("a replayed iteration did not match")

    def trusted(self, slot, batches, marks):  # the first replay, as every later one: unchecked
        slot.checked = True
        for st, _ in marks.values():
            st.batches.commit()
        self._play(slot, batches)
        return True

    monkeypatch.setattr(_graphs.Graphs, "_check", trusted)
    unchecked = emulate(reweighting(Neumann(iterations=2)))
    got = trained(unchecked)
    assert unchecked.cuda_graphs["off"] is None
    assert max(float((a - b).abs().max()) for a, b in zip(got, expected)) > 1e-3


def test_a_nan_in_a_replayed_iteration_is_reported_at_its_step():
    """The deferred verdicts are tensors updated in place, so replays accumulate them."""
    messages = []
    for graphs in (False, True):
        program = reweighting(Neumann(iterations=2))
        if graphs:
            emulate(program)
        program.run(20)
        program["classifier"].data.dataset.tensors[0][3] = float("nan")  # drawn in the next pass
        with pytest.raises(ProblemError, match="NaN or Inf") as caught:
            for _ in range(5):
                program.run(2)
        messages.append(str(caught.value).splitlines()[0])
        if graphs:
            assert program.cuda_graphs["replays"] > 0 and program.cuda_graphs["off"] is None
    assert messages[0] == messages[1]


def test_a_value_read_on_the_host_turns_graphs_off_and_says_where():
    program = emulate(reweighting(Neumann(iterations=2), item=True))
    with pytest.warns(MlodslWarning, match=r"a value is read on the host .* at tests/test_graphs.py:\d+"):
        program.run(6)
    assert program.cuda_graphs["off"] is not None and program.cuda_graphs["captured"] == []


def test_random_numbers_in_a_forked_evaluation_turn_graphs_off():
    program = emulate(reweighting(Neumann(iterations=2), dropout="lower"))
    with pytest.warns(MlodslWarning, match="random numbers are drawn .*fork of the generator"):
        program.run(6)
    assert program.cuda_graphs["off"] is not None


def test_random_numbers_in_the_stepping_loss_are_replayed():
    expected = trained(reweighting(Neumann(iterations=2), dropout="upper"))
    graphed = emulate(reweighting(Neumann(iterations=2), dropout="upper"))
    assert_same(trained(graphed), expected)
    assert graphed.cuda_graphs["off"] is None and graphed.cuda_graphs["replays"] > 0


@pytest.mark.parametrize("case, reason", [
    (dict(lr_scheduler=True), "has a scheduler"),
    (dict(checks="step"), "checks='step'"),
    (dict(precision="fp16"), "fp16"),
])
def test_what_graphs_cannot_hold_is_named_when_the_program_is_built(case, reason):
    expected = trained(reweighting(Neumann(iterations=2), **case), blocks=1)
    program = reweighting(Neumann(iterations=2), **case)
    with pytest.warns(MlodslWarning, match=reason):
        emulate(program)
    assert_same(trained(program, blocks=1), expected)  # and it runs as without graphs
    assert program.cuda_graphs["off"] is not None and program.cuda_graphs["replays"] == 0


def test_a_learning_rate_set_between_runs_is_captured_again():
    def run(graphs: bool) -> list[torch.Tensor]:
        program = reweighting(Neumann(iterations=2))
        if graphs:
            emulate(program)
        program.run(20)
        program["classifier"].optimizer.param_groups[0]["lr"] = 0.02
        program.run(20)
        assert not graphs or (program.cuda_graphs["captures"] == 2 and program.cuda_graphs["replays"] >= 20)
        return trained(program, blocks=0)

    assert_same(run(True), run(False))


def test_new_optimizer_state_or_new_parameter_memory_is_captured_again():
    def run(graphs: bool) -> list[torch.Tensor]:
        program = reweighting(CG(iterations=3))
        if graphs:
            emulate(program)
        captures = lambda: program.cuda_graphs["captures"] if graphs else 0  # noqa: E731
        program.run(10)
        saved = copy.deepcopy(program["reweight"].optimizer.state_dict())
        program.run(10)
        before = captures()
        program["reweight"].optimizer.load_state_dict(saved)  # new state tensors
        program.run(10)
        assert captures() == before + (1 if graphs else 0)
        net = program["classifier"].module[0]
        net.weight.data = net.weight.data.clone()  # the same parameter in new memory (a graph
        program.run(10)                            # reads addresses: the emulator cannot tell)
        assert captures() == before + (2 if graphs else 0)
        return trained(program, blocks=0)

    assert_same(run(True), run(False))


def test_a_checkpoint_loaded_mid_run_continues_as_without_graphs(tmp_path):
    def run(graphs: bool) -> list[torch.Tensor]:
        program = reweighting(Unrolled(), steps=3)
        if graphs:
            emulate(program)
        program.run(18)
        program.save(tmp_path / f"{graphs}.pt")
        program.run(9)
        program.load(tmp_path / f"{graphs}.pt")
        program.run(12)
        assert not graphs or (program.cuda_graphs["captures"] >= 6 and program.cuda_graphs["replays"] >= 3)
        return trained(program, blocks=0)

    assert_same(run(True), run(False))


def test_replays_make_no_host_sync(syncs):
    program = emulate(reweighting(CG(iterations=3)))
    program.run(25)  # warm, probed, captured, checked; the next 4 iterations draw full batches
    syncs.clear()
    before = program.cuda_graphs["replays"]
    program._runtime.run(4)
    assert program.cuda_graphs["replays"] == before + 4 and syncs == []


def test_on_the_cpu_compile_true_captures_nothing_and_cuda_graphs_true_is_refused():
    program = reweighting(Neumann(iterations=2), compile=dict(backend="eager"), checks=None)
    assert program.cuda_graphs is None and program._runtime.checks == "step"
    with pytest.raises(UsageError, match="cuda_graphs=True needs device='cuda'"):
        reweighting(Neumann(iterations=2), cuda_graphs=True)


def test_compiled_modules_are_captured_too():
    """Under torch.compile the probe watches the eager modules, and the compiled ones run once
    on the capture's stream before the capture."""
    expected = trained(reweighting(Neumann(iterations=2)), blocks=3)
    graphed = emulate(reweighting(Neumann(iterations=2), compile=dict(backend="aot_eager")))
    got = trained(graphed, blocks=3)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert graphed.cuda_graphs["off"] is None and graphed.cuda_graphs["replays"] > 0
    assert graphed._runtime.compiled


@pytest.mark.filterwarnings("ignore:the Hessian of 'classifier'")  # CG at a random start, both runs alike
def test_a_logged_and_validated_run_replays_too():
    """Program.run with logging and validation runs iteration by iteration: each is a replay."""
    def run(graphs: bool):
        program = reweighting(CG(iterations=3), steps=2)
        if graphs:
            emulate(program)
        history = program.run(30, log_every=5, validate=lambda p: {"n": float(p.iteration)}, progress=False,
                              loggers=[])
        assert not graphs or program.cuda_graphs["replays"] >= 8
        return trained(program, blocks=0), [log["classifier/loss"] for log in history.logs]

    (got, got_logs), (expected, expected_logs) = run(True), run(False)
    assert_same(got, expected)
    assert got_logs == expected_logs and len(got_logs) == 6


@pytest.mark.parametrize("method", ["fd", "cg"])
def test_the_trilevel_benchmark_program_replays_exactly(method):
    assert_same(*(trilevel_run(method, graphs) for graphs in (True, False)))


def trilevel_run(method: str, graphs: bool, replays: int = 8) -> list[torch.Tensor]:
    from bench.programs import trilevel

    runner = trilevel.build("mlodsl", method, trilevel.Sizes(hidden=8, batch=8), dtype=DT)
    runner.program._runtime.checks = "log"
    if graphs:
        emulate(runner.program)
    runner.run(12)
    assert not graphs or runner.program.cuda_graphs["replays"] >= replays
    return trained(runner.program, blocks=0)


def test_unrolled_adam_with_step_counts_on_the_cpu_is_refused_with_the_reason():
    """Unrolled replays Adam's update, whose bias correction needs the step count: on the CPU
    (torch's default Adam state) it is read as a number, which a graph would keep."""
    with pytest.warns(MlodslWarning, match=r"value is read on the host .* at mlodsl/_hypergrad/_unroll.py:\d+"):
        got = trilevel_run("itd", True, replays=0)
    assert_same(got, trilevel_run("itd", False))


def test_the_replayed_adam_update_from_device_step_counts_is_the_one_from_numbers():
    """Where the counts are tensors on a GPU (capturable or fused Adam) the replay computes the
    bias corrections from them, as torch's capturable Adam does, reading nothing."""
    from mlodsl._hypergrad import _unroll

    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(3, 2, generator=gen, dtype=DT, requires_grad=True), torch.randn(4, generator=gen, dtype=DT)]
    gs = [torch.randn_like(p) for p in ps]
    hp = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, maximize=False)
    states = [{"step": torch.tensor(4.0, dtype=DT), "exp_avg": torch.rand_like(p), "exp_avg_sq": torch.rand_like(p)}
              for p in ps]
    expected, expected_states = _unroll._adam_all(ps, gs, states, hp)  # CPU counts: numbers
    weighted = list(torch._foreach_add(gs, torch._foreach_mul(ps, 0.1)))
    m = torch._foreach_add([s["exp_avg"] for s in states], torch._foreach_mul(torch._foreach_sub(
        weighted, [s["exp_avg"] for s in states]), 0.1))
    v = torch._foreach_add(torch._foreach_mul([s["exp_avg_sq"] for s in states], 0.99),
                           torch._foreach_mul(torch._foreach_mul(weighted, 0.01), weighted))
    got, got_states = _unroll._adam_all_device_steps(ps, states, m, v, [_unroll._safe_sqrt(x) for x in v], hp)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    assert all(float(s["step"]) == 5.0 and b["step"] == 5.0 for s, b in zip(got_states, expected_states))
    got[0].sum().backward()  # differentiable, as the float path is
    assert ps[0].grad is not None


@pytest.mark.parametrize("case", [dict(precision="bf16"), dict(accumulate=2)], ids=["bf16", "grad_accumulation"])
def test_autocast_and_accumulated_batches_replay_exactly(case):
    def run(graphs: bool) -> list[torch.Tensor]:
        program = reweighting(FiniteDifference(), **case)
        if graphs:
            emulate(program)
        got = trained(program, blocks=4)
        assert not graphs or (program.cuda_graphs["off"] is None and program.cuda_graphs["replays"] >= 6)
        return got

    assert_same(run(True), run(False))
