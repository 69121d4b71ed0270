"""The training runtime: checkpoints, resume, logging, validation, early stopping, options."""

from __future__ import annotations

import csv
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mlodsl import CheckpointError, EarlyStopping, ProblemError, Program, SolverWarning, loggers, problem
from mlodsl import _checkpoint
from mlodsl.hypergrad import CG, Neumann, Unrolled

DT = torch.float64


def program_under_test(seed: int = 0, method=None, low_steps: int = 2, **low_options) -> Program:
    """A float64 bilevel program with everything that carries state: shuffled DataLoaders,
    momentum and Adam, a scheduler, an Unrolled window, dropout (the RNG)."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(48, 4, generator=g, dtype=DT), torch.randn(48, generator=g, dtype=DT)
    xv, yv = torch.randn(16, 4, generator=g, dtype=DT), torch.randn(16, generator=g, dtype=DT)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.1), nn.Linear(8, 1)).to(DT)
    hyper = nn.Linear(4, 1).to(DT)
    h_opt = torch.optim.Adam(hyper.parameters(), lr=0.01)
    n_opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)

    @problem(module=hyper, optimizer=h_opt, data=DataLoader(TensorDataset(xv, yv), batch_size=8, shuffle=True))
    def outer(batch):
        xb, yb = batch
        return F.mse_loss(inner(xb).squeeze(1), yb)

    @problem(module=net, optimizer=n_opt, data=DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True),
             upper=[outer], hypergrad=method or Unrolled(), steps=low_steps,
             scheduler=torch.optim.lr_scheduler.StepLR(n_opt, step_size=3, gamma=0.5), **low_options)
    def inner(batch):
        xb, yb = batch
        return F.mse_loss(inner(xb).squeeze(1), yb + outer(xb).squeeze(1))

    return Program([outer, inner])


def flat(program: Program) -> torch.Tensor:
    return torch.cat([t.detach().flatten() for p in program.problems for t in p.module.parameters()])


@pytest.mark.parametrize("split", [5, 3])
def test_ten_iterations_equal_five_save_load_five_bit_for_bit(tmp_path, split):
    straight = program_under_test()
    straight.run(iterations=10, progress=False)
    first = program_under_test()
    first.run(iterations=split, progress=False)
    first.save(tmp_path / "ckpt.pt")
    torch.manual_seed(1234)  # the RNG must come from the checkpoint, not from here
    resumed = program_under_test()  # freshly built: new modules, optimizers, loaders
    resumed.load(tmp_path / "ckpt.pt")
    assert resumed.iteration == split
    resumed.run(iterations=10 - split, progress=False)
    assert torch.equal(flat(straight), flat(resumed))
    assert resumed["inner"].optimizer.param_groups[0]["lr"] == straight["inner"].optimizer.param_groups[0]["lr"]


def test_a_checkpoint_cut_short_by_a_crash_is_never_loaded(tmp_path, monkeypatch):
    program = program_under_test()
    program.run(iterations=2, progress=False)
    program.save(tmp_path / "last.pt")
    good = flat(program)
    program.run(iterations=2, progress=False)

    def crash(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk died mid-write")

    monkeypatch.setattr(_checkpoint.torch, "save", crash)
    with pytest.raises(OSError, match="mid-write"):
        program.save(tmp_path / "last.pt")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["last.pt"]  # no temp file left behind
    fresh = program_under_test()
    fresh.load(tmp_path / "last.pt")
    assert torch.equal(flat(fresh), good) and fresh.iteration == 2


def test_a_truncated_or_foreign_file_gives_a_clear_error(tmp_path):
    program = program_under_test()
    program.save(tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cannot load the checkpoint .*cut.pt.*\n.*\nFix:"):
        program.load(tmp_path / "cut.pt")
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="it is not an mlodsl checkpoint"):
        program.load(tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="there is no such file"):
        program.load(tmp_path / "missing.pt")


def test_early_stopping_stops_at_the_right_iteration_and_keeps_the_best(tmp_path):
    scores = iter([0.5, 0.7, 0.6, 0.65, 0.9, 0.1])
    program = program_under_test()
    history = program.run(iterations=100, progress=False, validate=lambda prog: {"acc": next(scores)},
                          validate_every=2, early_stopping=EarlyStopping("acc", patience=2, mode="max"),
                          checkpoint_dir=tmp_path)
    # validations at 2, 4, 6, 8: best 0.7 at 4, then two without improvement -> stop at 8
    assert history.stopped_early and program.iteration == 8
    assert history.best == {"iteration": 4, "acc": 0.7}
    best = program_under_test()
    best.load(tmp_path / "best.pt")
    assert best.iteration == 4
    last = program_under_test()
    last.load(tmp_path / "last.pt")
    assert last.iteration == 8


def test_logging_to_console_csv_and_tensorboard(tmp_path, capsys):
    program = program_under_test(method=CG(iterations=3))
    program._runtime.solver_policy = "off"  # this net's Hessian is indefinite: not what is tested here
    tb_dir = tmp_path / "tb"
    history = program.run(iterations=4, progress=False, log_every=2,
                          loggers=[loggers.Console(), loggers.CSV(tmp_path / "log.csv"), loggers.TensorBoard(tb_dir)])
    out = capsys.readouterr().out
    assert "iter 2: outer: loss=" in out and "iter 4:" in out
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    names = {r["metric"] for r in rows}
    assert {"outer/loss", "outer/grad_norm", "outer/lr", "inner/loss", "inner/cg_residual_norm",
            "inner/cg_relative_residual"} <= names
    assert {r["iteration"] for r in rows} == {"2", "4"}
    assert [h["iteration"] for h in history.logs] == [2, 4]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tb_dir))


def test_diagnostics_of_each_method_are_logged():
    for method, key in [(Neumann(iterations=2), "inner/neumann_last_term_norm"),
                        ("fd", "inner/fd_epsilon")]:
        program = program_under_test(method=method)
        history = program.run(iterations=2, progress=False, log_every=2, loggers=[])
        assert key in history.logs[0]


def test_progress_bar_shows_each_problem_loss(capsys):
    program = program_under_test()
    program.run(iterations=3, progress=True)
    err = capsys.readouterr().err
    assert "3/3" in err and "outer=" in err and "inner=" in err


def test_a_diverging_neumann_series_warns_with_the_fix():
    program = program_under_test(method=Neumann(iterations=5, alpha=50.0))
    with pytest.warns(SolverWarning, match=r"Neumann series of 'inner' .* diverges(.|\n)*Fix: lower alpha"):
        program.run(iterations=2, progress=False)


def quadratic_bilevel(method, eigenvalues) -> Program:
    """Lower: ½θᵀAθ − θᵀφ (A = diag(eigenvalues)); upper: ½‖θ* − 1‖²."""
    n = len(eigenvalues)
    A = torch.diag(torch.tensor(eigenvalues, dtype=DT))
    phi = nn.Linear(n, 1, bias=False).to(DT)
    theta = nn.Linear(n, 1, bias=False).to(DT)

    @problem(module=phi, optimizer=torch.optim.SGD(phi.parameters(), lr=0.1))
    def upper():
        return 0.5 * ((lower.module.weight[0] - 1) ** 2).sum() + 0 * upper.module.weight.sum()

    @problem(module=theta, optimizer=torch.optim.SGD(theta.parameters(), lr=0.01), upper=[upper],
             hypergrad=method)
    def lower():
        t = lower.module.weight[0]
        return 0.5 * t @ A @ t - t @ upper.module.weight[0]

    return Program([upper, lower])


ILL = [10.0 ** (k / 3) for k in range(-6, 4)]  # eigenvalues from 0.01 to 10


def test_a_cg_given_too_few_iterations_warns_or_fails_when_strict():
    with pytest.warns(SolverWarning, match=r"conjugate-gradient solve of 'lower' .* has not reduced(.|\n)*raise iterations"):
        quadratic_bilevel(CG(iterations=2), ILL).run(iterations=1, progress=False)
    strict = quadratic_bilevel(CG(iterations=2), ILL)
    strict._runtime.solver_policy = "raise"
    with pytest.raises(ProblemError, match="has not reduced its residual"):
        strict.run(iterations=1, progress=False)


def test_cg_on_an_indefinite_hessian_says_add_damping():
    with pytest.warns(SolverWarning, match=r"Hessian of 'lower' .* is not positive definite(.|\n)*add damping"):
        quadratic_bilevel(CG(iterations=3), [1.0, -2.0, 3.0]).run(iterations=1, progress=False)


def test_healthy_solvers_do_not_warn(recwarn):
    quadratic_bilevel(CG(iterations=10), ILL).run(iterations=4, progress=False, log_every=2, loggers=[])
    quadratic_bilevel(Neumann(iterations=20), ILL).run(iterations=4, progress=False, log_every=2, loggers=[])
    assert not [w for w in recwarn if issubclass(w.category, SolverWarning)]


def test_ctrl_c_finishes_the_step_writes_a_checkpoint_and_resumes_exactly(tmp_path):
    straight = program_under_test()
    straight.run(iterations=6, progress=False)
    program = program_under_test()
    fired = []

    @program["inner"].after_step
    def interrupt(module):
        if program.iteration == 3 and not fired:
            fired.append(True)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        program.run(iterations=6, progress=False, checkpoint_dir=tmp_path)
    assert (tmp_path / "last.pt").exists()
    resumed = program_under_test()
    resumed.load(tmp_path / "last.pt")
    resumed.run(iterations=6 - resumed.iteration, progress=False)
    assert torch.equal(flat(straight), flat(resumed))


# -- per-problem options ---------------------------------------------------------
def test_clip_grad_norm_bounds_every_step():
    program = program_under_test(method="fd", low_steps=1, clip_grad_norm=1e-3)
    before = [t.detach().clone() for t in program["inner"].params]
    program["inner"].optimizer.param_groups[0]["momentum"] = 0.0
    program.run(iterations=1, progress=False)
    moved = torch.cat([(a - b.detach()).flatten() for a, b in zip(before, program["inner"].params)])
    assert float(moved.norm()) == pytest.approx(0.05 * 1e-3, rel=1e-4)  # lr × clipped norm (torch adds 1e-6)


def test_grad_accumulation_averages_batches():
    program = program_under_test(method="first_order", low_steps=1, grad_accumulation=3)
    program.run(iterations=2, progress=False)
    assert program.stats["steps/inner"] == 2
    assert program._runtime.state["inner"].batches.position == 6  # 3 batches per step


def test_warmup_delays_the_upper_problem():
    torch.manual_seed(0)
    m_up, m_low = nn.Linear(1, 1), nn.Linear(1, 1)

    @problem(module=m_up, optimizer=torch.optim.SGD(m_up.parameters(), lr=0.1), warmup=3)
    def up():
        return low(torch.ones(1, 1)).pow(2).sum()

    @problem(module=m_low, optimizer=torch.optim.SGD(m_low.parameters(), lr=0.1), upper=[up])
    def low():
        return (low(torch.ones(1, 1)) - up(torch.ones(1, 1))).pow(2).sum()

    program = Program([up, low])
    program.run(iterations=5, progress=False)
    assert program.stats["steps/low"] == 5 and program.stats["steps/up"] == 2
    assert program.stats["warmup/up"] == 3


def test_roll_back_restores_the_lower_problem_after_the_upper_step():
    program = program_under_test(method=Neumann(iterations=1), low_steps=2, roll_back=True)
    start = [t.detach().clone() for t in program["inner"].params]
    program.run(iterations=2, progress=False)  # two inner steps, then outer steps, then inner rolls back
    assert program.stats["steps/outer"] == 1
    assert all(torch.equal(a, b) for a, b in zip(start, program["inner"].params))


def test_scheduler_steps_with_the_optimizer():
    program = program_under_test(method="fd")
    program.run(iterations=6, progress=False)
    assert program["inner"].optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.25)


def test_seed_and_bf16_precision():
    def build_and_run(precision):
        torch.manual_seed(5)
        net = nn.Linear(4, 1)
        loader = DataLoader(TensorDataset(torch.randn(32, 4), torch.randn(32)), batch_size=8, shuffle=True)

        @problem(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), data=loader)
        def fit(batch):
            xb, yb = batch
            return F.mse_loss(fit(xb).squeeze(1).float(), yb)

        program = Program([fit], seed=3, precision=precision)
        program.run(iterations=6, progress=False)
        return net.weight.detach().clone()

    assert torch.equal(build_and_run("fp32"), build_and_run("fp32"))
    bf16 = build_and_run("bf16")
    assert not torch.equal(bf16, build_and_run("fp32"))
    assert torch.allclose(bf16, build_and_run("fp32"), atol=0.05)


def test_a_retry_after_a_failure_at_a_new_data_pass_replays_the_loader_seeds():
    """The first draw of a pass takes a DataLoader's seeds from torch's RNG; a rolled-back step
    gives the batch back and must replay that use, or dropout masks after it differ."""
    straight = program_under_test()
    straight.run(iterations=3, progress=False)
    program = program_under_test()
    inner = program["inner"].fn
    fail = [True]

    def fails_once(batch):
        if fail:
            fail.clear()
            raise RuntimeError("transient")
        return inner(batch)

    program["inner"].fn = fails_once
    with pytest.raises(ProblemError, match="transient"):
        program.run(iterations=3, progress=False)
    program.run(iterations=3 - program.iteration, progress=False)
    assert torch.equal(flat(straight), flat(program))


def test_fp16_scales_the_loss_and_backs_off_on_overflow():
    torch.manual_seed(0)
    m_up, m_low = nn.Linear(3, 1), nn.Linear(3, 1)
    x = 10 * torch.ones(4, 3)

    @problem(module=m_up, optimizer=torch.optim.SGD(m_up.parameters(), lr=1e-4))
    def up():
        return low(x).pow(2).mean()

    @problem(module=m_low, optimizer=torch.optim.SGD(m_low.parameters(), lr=1e-4), upper=[up],
             hypergrad=Neumann(iterations=1))
    def low():
        return (low(x) - up(x)).pow(2).mean() + 10.0

    program = Program([up, low], precision="fp16")
    scaler = program._runtime.scaler
    scaler.scale = 2.0 ** 127  # a float32 loss >= 2 times this is inf: every scaled gradient overflows
    program.run(iterations=3, progress=False)
    assert program.stats["fp16_overflow/low"] >= 1 and scaler.scale < 2.0 ** 127
    assert all(torch.isfinite(t).all() for p in program.problems for t in p.module.parameters())
    from mlodsl._runtime import LossScaler
    grow = LossScaler(scale=4.0, growth_interval=2)
    ok = torch.tensor(1.0)
    grads = [torch.ones(2), torch.ones(3)]
    assert grow.update(ok, grads) and grow.update(ok, grads) and grow.scale == 8.0
    assert not grow.update(ok, [torch.ones(2), torch.tensor([1.0, float("inf")])]) and grow.scale == 4.0


def test_fp16_unscales_exactly():
    """With a power-of-two scale that does not overflow, the update equals the unscaled one."""
    a = program_under_test(method=CG(iterations=2))
    a.run(iterations=4, progress=False)
    b = program_under_test(method=CG(iterations=2))
    from mlodsl._runtime import LossScaler
    b._runtime.scaler = LossScaler(scale=2.0 ** 10)
    b.run(iterations=4, progress=False)
    assert torch.allclose(flat(a), flat(b), rtol=1e-12, atol=1e-14)


def test_wandb_logger_initialises_once_logs_each_step_and_finishes(monkeypatch):
    """W&B is optional: a stand-in module records what the logger asks of it."""
    import sys
    import types

    calls = []

    class Run:
        def log(self, metrics, step):
            calls.append(("log", step, sorted(metrics)))

        def finish(self):
            calls.append(("finish",))

    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or Run())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    program = program_under_test(method="fd")
    program.run(iterations=4, progress=False, log_every=2, loggers=[loggers.WandB(project="mlodsl-test")])
    assert calls[0] == ("init", {"project": "mlodsl-test"})
    assert [c[1] for c in calls if c[0] == "log"] == [2, 4]
    assert "inner/loss" in calls[1][2] and calls[-1] == ("finish",)


def test_wandb_without_the_package_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)
    from mlodsl import UsageError
    with pytest.raises(UsageError, match="pip install wandb"):
        loggers.WandB()
