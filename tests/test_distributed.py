"""Data parallelism: 2 Gloo ranks on the CPU compute what one process computes on the combined batch.

One spawn of two ranks runs every case (the start of a process dominates the time); the
single-process runs happen here, on batches that are the concatenation of the two ranks'
shards. A DataLoader over a dataset, without shuffling, with batch B on each rank is sharded
by a DistributedSampler: rank r takes examples r, r+2, r+4, ..., so its k-th batch is the odd
or even half of examples [2Bk, 2Bk + 2B), which is the k-th batch of one process with batch 2B.
A list of batches is sharded by batch: rank r takes batches r, r+2, ..., so one process gets the
concatenation of consecutive pairs. All in float64; every parameter is compared to 1e-10 after
5 steps of the uppermost problem.
"""

from __future__ import annotations

import os
import socket
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from mlodsl import Program, ProblemError, UsageError, problem
from mlodsl._distributed import PARAMETERS_DIFFER, shard, shard_optimizer_of
from mlodsl.hypergrad import CG, FiniteDifference, Neumann, Unrolled

DT = torch.float64
WORLD = 2
N, DIM, HIDDEN, B = 48, 4, 3, 8   # examples per data set, features, hidden units, batch per rank
ITERATIONS = 10                   # the lowermost problem steps twice per upper step: 5 upper steps
METHODS = {"fd": lambda: FiniteDifference(eps=0.01), "neumann": lambda: Neumann(iterations=3),
           "cg": lambda: CG(iterations=4, damping=1.0), "itd": lambda: Unrolled()}


class Vec(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.theta = nn.Parameter(0.1 * torch.randn(n, dtype=DT))

    def forward(self) -> torch.Tensor:
        return self.theta


def _data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(N, DIM, generator=gen, dtype=DT)
    w = torch.randn(DIM, generator=gen, dtype=DT)
    return X, torch.tanh(X @ w) + 0.1 * torch.randn(N, generator=gen, dtype=DT)


def _loader(seed: int, batch: int, shuffle: bool = False) -> DataLoader:
    return DataLoader(TensorDataset(*_data(seed)), batch_size=batch, shuffle=shuffle)


def _batches(seed: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A plain list of batches (sharded by batch, not by example)."""
    X, y = _data(seed)
    return [(X[i:i + batch], y[i:i + batch]) for i in range(0, N, batch)]


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(DIM, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1)).to(DT)


def bilevel(method: str, batch: int, seed: int = 0, **kw) -> Program:
    """A penalty per input feature (upper, on a list of validation batches) for an MLP (lower)."""
    torch.manual_seed(seed)
    net, pen = _mlp(), Vec(DIM)

    @problem(module=pen, optimizer=torch.optim.Adam(pen.parameters(), lr=0.05), data=_batches(1, batch))
    def penalty(b):
        x, t = b
        return F.mse_loss(fit(x).squeeze(1), t)

    @problem(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.5),
             data=_loader(0, batch), upper=[penalty], hypergrad=METHODS[method](), steps=2)
    def fit(b):
        x, t = b
        w = fit.module[0].weight
        return F.mse_loss(fit(x).squeeze(1), t) + (penalty().exp() * w * w).sum()

    return Program([penalty, fit], **{"solvers": "off", **kw})


def trilevel(method: str, batch: int, seed: int = 0, shuffle: bool = False, **kw) -> Program:
    """Pretrain (low, penalized by top) -> finetune a residual (mid, reads θ*_low) -> top (reads θ*_mid)."""
    torch.manual_seed(seed)
    net, head, pen = _mlp(), nn.Linear(DIM, 1).to(DT), Vec(DIM)

    @problem(module=pen, optimizer=torch.optim.SGD(pen.parameters(), lr=0.1), data=_loader(2, batch, shuffle))
    def top(b):
        x, t = b
        return F.mse_loss(mid(x).squeeze(1), t)

    @problem(module=head, optimizer=torch.optim.Adam(head.parameters(), lr=0.05), data=_loader(1, batch, shuffle),
             upper=[top], hypergrad=METHODS[method]())
    def mid(b):
        x, t = b
        return F.mse_loss((mid(x) + low(x)).squeeze(1), t) + 0.01 * (mid.module.weight ** 2).sum()

    @problem(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), data=_loader(0, batch, shuffle),
             upper=[mid], hypergrad=METHODS[method](), steps=2)
    def low(b):
        x, t = b
        w = low.module[0].weight
        return F.mse_loss(low(x).squeeze(1), t) + (top().exp() * w * w).sum()

    return Program([top, mid, low], **{"solvers": "off", **kw})


BUILDERS = {"bilevel": bilevel, "trilevel": trilevel}
CASES = [(kind, method) for kind in BUILDERS for method in METHODS]


def params(program: Program) -> dict[str, torch.Tensor]:
    return {f"{p.name}.{n}": t.detach().clone() for p in program.problems for n, t in p.module.named_parameters()}


class Recorder:
    def __init__(self) -> None:
        self.rows: list[int] = []

    def log(self, iteration: int, metrics: dict) -> None:
        self.rows.append(iteration)

    def close(self) -> None:
        pass


# -- the ranks ------------------------------------------------------------------------------
def _rank(rank: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        out = {"cases": {}, "rank": rank}
        for kind, method in CASES:
            program = BUILDERS[kind](method, B)
            program.run(ITERATIONS)
            out["cases"][kind, method] = params(program)
        program = bilevel("neumann", B, distributed_hypergrad="local")
        program.run(ITERATIONS)
        out["local"] = params(program)
        out["shard"] = next(iter(program._runtime.state["fit"].batches.data))[0]
        out["mismatch"] = _mismatch(rank)
        out["checkpoint"] = _checkpoint(folder)
        out["zero"] = _zero(folder)
        torch.save(out, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _mismatch(rank: int) -> dict:
    program = bilevel("cg", B, seed=rank)  # rank-dependent initialization
    try:
        program.run(2)
        message = None
    except ProblemError as e:
        message = str(e)
    program.broadcast_parameters()
    program.run(2)
    return {"message": message, "after": params(program)}


def _checkpoint(folder: str) -> dict:
    """Run 4, save, run 4 more (with logging); a fresh program that loads and runs 4 must agree.
    Shuffled: the checkpoint falls in the middle of an epoch of the DistributedSamplers."""
    path = os.path.join(folder, "ck.pt")
    program = trilevel("cg", B, shuffle=True)
    program.run(4)
    program.save(path)
    recorder = Recorder()
    program.run(4, log_every=2, loggers=[recorder])
    resumed = trilevel("cg", B, seed=123, shuffle=True)
    resumed.load(path)
    resumed.run(4)
    return {"straight": params(program), "resumed": params(resumed), "logged": recorder.rows}


def _zero(folder: str) -> dict:
    """shard_optimizer=True: the same parameters; a checkpoint consolidates the optimizer state."""
    path = os.path.join(folder, "zero.pt")
    program = bilevel("cg", B, shard_optimizer=True)
    program.run(4)
    program.save(path)
    program.run(ITERATIONS - 4)
    resumed = bilevel("cg", B, seed=5, shard_optimizer=True)
    resumed.load(path)
    resumed.run(ITERATIONS - 4)
    resumed.save(path)  # consolidates the shards again after a load
    saved = torch.load(path, weights_only=False)["problems"]["fit"]["optimizer"]["state"]
    return {"params": params(program), "resumed": params(resumed),
            "optimizer": type(program["fit"].optimizer).__name__,
            "saved_momenta": sorted(k for k, v in saved.items() if "momentum_buffer" in v)}


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        torch.multiprocessing.spawn(_rank, args=(port, folder), nprocs=WORLD, join=True)
        files = os.listdir(folder)
        results = [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    results[0]["files"] = files
    return results


def _max_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# -- the tests ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,method", CASES)
def test_two_ranks_equal_one_process_on_the_combined_batch(ranks, kind, method):
    one = BUILDERS[kind](method, WORLD * B)
    one.run(ITERATIONS)
    expected = params(one)
    for r in ranks:
        assert _max_gap(r["cases"][kind, method], expected) < 1e-10, (r["rank"], kind, method)
    assert _max_gap(ranks[0]["cases"][kind, method], ranks[1]["cases"][kind, method]) == 0.0


def test_the_sharding_is_by_example_as_assumed(ranks):
    X, _ = _data(0)
    for r in ranks:
        assert torch.equal(r["shard"], X[r["rank"]::WORLD][:B])


def test_the_per_rank_mode_is_an_approximation(ranks):
    one = bilevel("neumann", WORLD * B)
    one.run(ITERATIONS)
    assert _max_gap(ranks[0]["local"], params(one)) > 1e-8   # the exact mode's test is not vacuous
    assert _max_gap(ranks[0]["local"], ranks[1]["local"]) == 0.0


def test_ranks_that_start_from_different_parameters_get_a_clear_error(ranks):
    for r in ranks:
        message = r["mismatch"]["message"]
        assert message is not None
        head = PARAMETERS_DIFFER.split("{")[0]
        assert message.startswith(head) and "'penalty'" in message and "rank(s) [1]" in message
        assert "program.broadcast_parameters()" in message and "torch.manual_seed" in message
    assert "rank 1: first 'theta'" in ranks[1]["mismatch"]["message"]
    assert _max_gap(ranks[0]["mismatch"]["after"], ranks[1]["mismatch"]["after"]) == 0.0


def test_checkpoints_resume_exactly_and_only_rank_0_logs_and_writes(ranks):
    for r in ranks:
        assert _max_gap(r["checkpoint"]["straight"], r["checkpoint"]["resumed"]) == 0.0
    assert ranks[0]["checkpoint"]["logged"] == [6, 8] and ranks[1]["checkpoint"]["logged"] == []
    assert "ck.pt" in ranks[0]["files"] and not any(f.endswith(".tmp") for f in ranks[0]["files"])



def test_sharded_optimizer_state_gives_the_same_parameters_and_checkpoints(ranks):
    one = bilevel("cg", WORLD * B)
    one.run(ITERATIONS)
    for r in ranks:
        assert r["zero"]["optimizer"] == "ZeroRedundancyOptimizer"
        assert _max_gap(r["zero"]["params"], params(one)) < 1e-10
        assert _max_gap(r["zero"]["params"], r["zero"]["resumed"]) == 0.0
        assert r["zero"]["saved_momenta"] == [0, 1, 2, 3]  # every parameter's, whichever rank owns it

# -- sharding, without a process group ------------------------------------------------------------
def test_a_dataloader_over_a_dataset_is_sharded_by_example_with_its_settings():
    X, y = _data(0)
    loader = DataLoader(TensorDataset(X, y), batch_size=5, shuffle=True, drop_last=True)
    mine = shard(loader, rank=1, world=WORLD, name="fit", loc="here", seed=7)
    sampler = mine.sampler
    assert isinstance(sampler, DistributedSampler) and sampler.shuffle and sampler.seed == 7
    assert (sampler.rank, sampler.num_replicas, sampler.drop_last) == (1, WORLD, True)
    assert mine.batch_size == 5 and mine.drop_last and mine.collate_fn is loader.collate_fn
    already = DataLoader(TensorDataset(X, y), sampler=DistributedSampler(TensorDataset(X, y), 2, 0))
    assert shard(already, 0, WORLD, "fit", "here") is already


def test_other_iterables_are_sharded_by_batch_and_checked():
    batches = _batches(0, B)  # 6 batches
    assert [b[0] for b in shard(batches, 1, WORLD, "fit", "here")] == [batches[i][0] for i in (1, 3, 5)]
    assert len(list(shard(batches[:5], 0, WORLD, "fit", "here"))) == 2  # the last incomplete pair is dropped
    with pytest.raises(ProblemError, match="gives the 2 ranks batches of sizes \\[8, 3\\]"):
        list(shard([batches[0], (batches[1][0][:3], batches[1][1][:3])], 0, WORLD, "fit", "here"))
    with pytest.raises(ProblemError, match="yields 1 batch\\(es\\) in a pass, fewer than the 2 ranks"):
        list(shard(batches[:1], 0, WORLD, "fit", "here"))


def test_the_distributed_example_runs_in_one_process_too():
    pytest.importorskip("sklearn")
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import data_reweighting_distributed as example

    result = example.main(["--iterations", "3", "--batch-size", "16", "--json"])
    assert result["processes"] == 1 and result["iterations"] == 3 and 0.0 <= result["accuracy"] <= 1.0


def test_distributed_true_without_torchrun_says_how_to_launch(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(UsageError, match="torchrun --nproc_per_node=N"):
        bilevel("cg", B, distributed=True)
    assert bilevel("cg", B).world_size == 1  # detected: one process


def test_sharded_optimizer_state_is_refused_where_the_whole_state_is_replayed():
    program = bilevel("itd", B)
    with pytest.raises(UsageError, match="uses hypergrad=Unrolled\\(\\), which replays its optimizer's state"):
        shard_optimizer_of(program["fit"])
    torch.manual_seed(0)
    net = _mlp()

    @problem(module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), roll_back=True)
    def lonely():
        return net[0].weight.square().sum()

    with pytest.raises(UsageError, match="has roll_back=True, which snapshots its optimizer's state"):
        shard_optimizer_of(lonely)


def test_a_shuffled_shard_reshuffles_each_epoch_and_the_ranks_cover_the_data():
    from mlodsl._data import Batches

    X, y = _data(0)
    loader = DataLoader(TensorDataset(X, y), batch_size=B, shuffle=True)
    epochs = {}
    for rank in range(WORLD):
        batches = Batches("fit", "here", shard(loader, rank, WORLD, "fit", "here", seed=3))
        drawn = [batches.next()[0] for _ in range(2 * N // (WORLD * B))]  # two passes
        half = len(drawn) // 2
        epochs[rank] = [torch.cat(drawn[:half]), torch.cat(drawn[half:])]
    for e in range(2):
        both = torch.cat([epochs[r][e] for r in range(WORLD)])
        assert sorted(map(tuple, both.tolist())) == sorted(map(tuple, X.tolist()))  # each example once
    assert not torch.equal(epochs[0][0], epochs[0][1])  # set_epoch: a new shuffle
