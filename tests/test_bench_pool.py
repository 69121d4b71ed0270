"""bench/run.py pools the rounds of several fresh processes: ratios stay paired within a round."""

from __future__ import annotations

import statistics

import pytest

from bench.run import pool


def run(hand: list[float], side: list[float], block: int = 3) -> dict[str, dict]:
    return {"hand": {"block": block, "cpu": hand, "wall": [2 * h for h in hand]},
            "mlodsl": {"block": block, "cpu": side, "wall": [2 * x for x in side]}}


def test_ratios_are_paired_within_rounds_and_pooled_over_processes():
    # process 1 runs everything twice as slow as process 2: the side is 1.1x hand in both
    slow = run([2.0, 2.2, 2.0], [2.2, 2.42, 2.2])
    fast = run([1.0, 1.0, 1.1], [1.1, 1.1, 1.21])
    t = pool([slow, fast])["mlodsl"]
    assert t.ratio == pytest.approx(1.1)
    assert t.per_process == pytest.approx((1.1, 1.1))
    assert t.rounds == (2.2, 2.42, 2.2, 1.1, 1.1, 1.21)  # in process order, for pairing with Betty's
    assert t.cpu_ms == pytest.approx(statistics.median([2.2, 2.42, 2.2, 1.1, 1.1, 1.21]))
    assert t.wall_ms == pytest.approx(2 * t.cpu_ms)


def test_one_unlucky_process_does_not_set_the_ratio():
    even = [run([1.0] * 5, [1.0] * 5) for _ in range(4)]
    unlucky = run([1.0] * 5, [1.3] * 5)  # a side that landed badly in one process
    t = pool([*even, unlucky])["mlodsl"]
    assert t.per_process == pytest.approx((1.0, 1.0, 1.0, 1.0, 1.3))
    assert t.ratio == pytest.approx(1.0)
    assert pool([*even, unlucky])["hand"].ratio == 1.0
