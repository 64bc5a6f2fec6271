"""Counters the node keeps for operators, with no metrics library in the core.

Each part of the node counts what it owns (the node its connections, the pool its hits, the
limiter its penalties) in plain integers and :class:`Histogram` objects; the metrics exporter
(:mod:`homenet.control.metrics`) reads them when it is scraped. Nothing here locks: a node's
counters are touched only from its event loop.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Hashable, Iterator
from typing import TypeVar

K = TypeVar("K", bound=Hashable)

#: Upper bounds (seconds) of the latency buckets: a loopback hop takes well under a
#: millisecond, a dial-back through a home link tens of milliseconds, a timeout seconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    """Observations counted into fixed buckets (``le`` semantics: a value on a bound counts
    in that bound's bucket), with their sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> Iterator[tuple[float, int]]:
        """(bound, observations at or below it), the last bound being +inf."""
        total = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            yield bound, total


def bump(counts: dict[K, int], key: K, by: int = 1) -> None:
    """``counts[key] += by``, starting from 0."""
    counts[key] = counts.get(key, 0) + by
