"""Needle sampling is honest: independent haystacks per cell, and intervals that say how sure a cell is."""

from __future__ import annotations

import pytest

from longdoc.bench.evaluate import needle_records, wilson


class Recorded:
    """A Haystacks stand-in that records the first random draw of each sample (what picks its text)."""

    def __init__(self) -> None:
        self.draws: list[float] = []

    def sample(self, rng, length, needles, depth, passkey):
        from longdoc.bench.needle import NeedleSample

        self.draws.append(rng.random())
        return NeedleSample("text", "q?", "a", "1234567", "key", (depth or 0.0,), ((0, 4),), 0)


class Echo:
    """A LongDoc stand-in answering the expected value."""

    class method:  # noqa: N801 - mirrors LongDoc.method.name
        name = "echo"

    def ask(self, context, question, max_new_tokens):
        from longdoc.api import Answer, Stats

        return Answer("1234567", [], Stats(method="echo", tokens_in=1, tokens_kept=1))


def test_every_depth_gets_its_own_haystacks():
    haystacks = Recorded()
    for depth in (0.0, 0.5, 1.0):
        needle_records(Echo(), haystacks, length=100, samples=3, depths=[depth], seed=0)
    assert len(set(haystacks.draws)) == 9  # nine samples, nine different haystacks
    again = Recorded()
    needle_records(Echo(), again, length=100, samples=3, depths=[0.0], seed=0)
    assert again.draws == haystacks.draws[:3]  # one seed fixes them all


@pytest.mark.parametrize(
    "correct, n, low, high", [(6, 6, 0.610, 1.0), (3, 6, 0.188, 0.812), (0, 30, 0.0, 0.114), (50, 100, 0.404, 0.596)]
)
def test_wilson_interval(correct, n, low, high):
    got = wilson(correct, n)
    assert got == pytest.approx((low, high), abs=1e-3)
