"""Drawing the next batch ahead (mlodsl/_data.py, mlodsl/_prefetch.py).

On CUDA the stage copies the batch on a side stream; here a stage that copies
on the CPU and wraps the copy (a loss that got the wrapper would fail) stands in
for it. The batches, their order, the data positions, torch's generator, the
rollback of a failing step and checkpoints must be the same with it as without.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from mlodsl._data import Batches
from mlodsl._prefetch import stage_for
from tests.test_guard import Faults, build, fail_once, same, snapshot


class Staged:
    def __init__(self, batch):
        self.batch = batch


class CopyStage:
    """Copies the batch when the draw ahead starts; the copy is usable only after ``finish``."""

    def __init__(self) -> None:
        self.started = self.finished = 0

    def start(self, batch):
        self.started += 1
        return Staged([t.clone() for t in batch])

    def finish(self, staged):
        assert isinstance(staged, Staged), "a batch was finished twice or never started"
        self.finished += 1
        return staged.batch


def loader(n: int = 10, batch: int = 3, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 2, generator=g), torch.arange(n)), batch_size=batch, shuffle=True)


def draws(b: Batches, n: int) -> list[tuple[list[int], torch.Tensor, tuple[int, int]]]:
    """n draws: the example indices, torch's generator after the draw and the position."""
    out = []
    for _ in range(n):
        x, i = b.next()
        out.append((i.tolist(), torch.get_rng_state(), (b.epoch, b.position)))
    return out


def batches(stage=None) -> Batches:
    b = Batches("p", "here:1", loader())
    b.stage = stage
    return b


def test_draws_ahead_give_the_same_batches_positions_and_generator_across_passes():
    torch.manual_seed(0)
    plain = draws(batches(), 13)          # 4 batches a pass: 3 passes and one batch
    torch.manual_seed(0)
    stage = CopyStage()
    b = batches(stage)
    ahead = draws(b, 13)
    assert same(ahead, plain)
    # every batch but the first of each pass was drawn ahead; none across a pass's end
    assert stage.finished == 13 - 4 and stage.started == stage.finished + (b._ahead is not None)


def test_nothing_is_drawn_ahead_across_the_end_of_a_pass():
    stage = CopyStage()
    b = batches(stage)
    draws(b, 4)               # the last batch of the first pass
    assert b._ahead is None and b.position == 4
    draws(b, 1)
    assert b._ahead is not None and b.position == 1   # the batch drawn ahead is not counted


def test_a_rewind_gives_back_the_step_s_batches_before_the_one_drawn_ahead():
    torch.manual_seed(1)
    plain = draws(batches(), 9)
    torch.manual_seed(1)
    b = batches(CopyStage())
    got = draws(b, 1)
    rng = torch.get_rng_state()
    mark = b.mark()
    draws(b, 2)                # a step that draws two batches, then fails
    b.rewind(mark)
    torch.set_rng_state(rng)   # as the step's rollback does
    got += draws(b, 8)
    assert same(got, plain)


def test_a_checkpoint_taken_with_a_batch_drawn_ahead_resumes_at_the_batch_after_the_last_taken():
    torch.manual_seed(2)
    plain = draws(batches(), 10)
    torch.manual_seed(2)
    b = batches(CopyStage())
    got = draws(b, 6)
    sd, rng = b.state_dict(), torch.get_rng_state()
    assert b._ahead is not None and sd["position"] == 2
    resumed = batches(CopyStage())
    resumed.load_state_dict(sd)
    torch.set_rng_state(rng)
    got += draws(resumed, 4)
    assert same(got, plain)


def test_data_without_a_length_is_not_drawn_ahead():
    stage = CopyStage()
    b = Batches("p", "here:1", [(torch.zeros(1), torch.zeros(1))] * 3)
    b.stage = stage
    b.next()
    assert b._ahead is not None    # a list has a length
    b = Batches("p", "here:1", (x for x in [(torch.zeros(1), torch.zeros(1))] * 3))
    b.stage = stage
    b.next()
    assert b._ahead is None


def staged(program, stage):
    for st in program._runtime.state.values():
        st.batches.stage = stage
    return program


@pytest.mark.parametrize("fault", [None, "loss:low", "nan:low", "after_step:up", "lower_in_hypergrad"])
def test_a_program_with_batches_drawn_ahead_ends_bit_for_bit_where_it_ends_without(fault):
    clean = build(Faults())
    clean.run(iterations=7)
    faults, stage = Faults(), CopyStage()
    program = staged(build(faults), stage)
    program.run(iterations=3)
    if fault is not None:
        fail_once(program, faults, fault, iterations=4)
    program.run(iterations=7 - program.iteration)
    assert stage.finished > 0
    assert same(snapshot(program), snapshot(clean))


def test_only_a_cuda_device_gets_a_stage():
    assert stage_for(None, True) is None
    assert stage_for(torch.device("cpu"), True) is None
    assert stage_for(torch.device("cuda"), False) is None
