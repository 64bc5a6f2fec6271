"""The node's plain counters: histogram buckets (``le`` semantics) and the collector's names."""

from __future__ import annotations

import math

import pytest

from homenet.node.stats import Histogram, bump


def test_a_value_on_a_bound_counts_in_that_bound_s_bucket() -> None:
    h = Histogram((0.001, 0.01, 0.1))
    for v in (0.0, 0.001, 0.0011, 0.01, 0.5, 99.0):
        h.observe(v)
    assert list(h.cumulative()) == [(0.001, 2), (0.01, 4), (0.1, 4), (math.inf, 6)]
    assert h.count == 6
    assert h.sum == pytest.approx(0.0 + 0.001 + 0.0011 + 0.01 + 0.5 + 99.0)


def test_an_empty_histogram_has_every_bucket_at_zero() -> None:
    h = Histogram()
    assert [n for _, n in h.cumulative()] == [0] * (len(h.bounds) + 1)
    assert (h.count, h.sum) == (0, 0.0)


def test_bump_starts_from_zero() -> None:
    counts: dict[tuple[str, str], int] = {}
    bump(counts, ("data", "200"))
    bump(counts, ("data", "200"), 2)
    bump(counts, ("grpc", "200"))
    assert counts == {("data", "200"): 3, ("grpc", "200"): 1}
