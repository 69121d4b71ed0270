"""The benchmark's hand-written loops run exactly mlodsl's algorithm: after a few outer
iterations both give the same parameters (float64, tiny sizes), and the same numbers of
forward, backward and second-order calls. Betty's side is checked to run and to make the
same number of method calls per path as its algorithm says (one per path and problem)."""

from __future__ import annotations

import warnings

import pytest
import torch

from bench.common import METHODS, NotExpressible, counting
from bench.programs import darts, ladder, mwn, trilevel

F64 = torch.float64
ITERATIONS = 3
TINY = {
    "mwn": (mwn, {"sizes": mwn.Sizes(hidden=8, batch=8, meta=10)}),
    "darts": (darts, {"sizes": darts.Sizes(channels=4, batch=8)}),
    "trilevel": (trilevel, {"sizes": trilevel.Sizes(hidden=8, batch=8)}),
    "ladder": (ladder, {"depth": 3}),
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny programs: one intra-op thread (several spin and wait on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def params(runner) -> dict[str, torch.Tensor]:
    return {f"{name}.{n}": p.detach().clone() for name, m in sorted(runner.modules.items())
            for n, p in m.named_parameters()}


def build(program: str, side: str, method: str):
    module, kwargs = TINY[program]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return module.build(side, method, dtype=F64, **kwargs)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("program", sorted(TINY))
def test_hand_written_loop_matches_mlodsl(program: str, method: str) -> None:
    sides = {s: build(program, s, method) for s in ("hand", "mlodsl")}
    start = params(sides["hand"])
    assert all(torch.equal(start[k], v) for k, v in params(sides["mlodsl"]).items())   # same initialisation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for runner in sides.values():
            runner.run(ITERATIONS)
    a, b = params(sides["hand"]), params(sides["mlodsl"])
    moved = max(float((a[k] - start[k]).abs().max()) for k in a)
    assert moved > 1e-6, "the programs did not train"
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-12, msg=lambda m: f"{program}/{method} {k}: {m}")
    counts = {}
    for s, runner in sides.items():
        with warnings.catch_warnings(), counting(runner.modules) as c:
            warnings.simplefilter("ignore")
            runner.run(1)
        counts[s] = dict(c)
    assert counts["hand"] == counts["mlodsl"]


BETTY = "Betty is a benchmark-only dependency: pip install 'numpy<2.3'; " \
        "pip install --no-deps --ignore-requires-python betty-ml==0.2.1 (CI installs it)"


@pytest.mark.parametrize("program", ["mwn", "ladder"])
def test_betty_side_runs_and_walks_every_path(program: str) -> None:
    pytest.importorskip("betty", reason=BETTY)
    """Betty calls a problem's method once per path through it: on the ladder of depth 3,
    8 paths of 3 lower problems each, 24 Neumann calls of 3 HVPs and 1 mixed product."""
    runner = build(program, "betty", "neumann")
    runner.run(2)
    with counting(runner.modules) as c:
        runner.run(1)
    if program == "ladder":
        assert c["hvp"] == 8 * 3 * (3 + 1)
    else:
        assert c["hvp"] == 3 + 1
    assert all(torch.isfinite(p).all() for p in params(runner).values())


def test_betty_cannot_express_unrolled() -> None:
    pytest.importorskip("betty", reason=BETTY)
    with pytest.raises(NotExpressible):
        build("mwn", "betty", "itd")
