"""SourceLimiter: per-source admission and penalties for failed logins (values in, verdicts out)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from homenet.node import limits as limits_mod
from homenet.node.limits import SourceLimiter, source_of

BLOCKED = "source blocked after repeated failed authentication"
TOTAL = "too many connections in handshake"
PER_SOURCE = "too many connections in handshake from this source"


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


def limiter(clock: Clock | None = None, **kw: Any) -> SourceLimiter:
    return SourceLimiter(clock=clock or Clock(), **kw)


# -- what a source is ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "source"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("192.0.2.7:5555", "192.0.2.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("[2001:db8:1:2:3:4:5:6]:443", "2001:db8:1:2::/64"),
        ("[2001:db8:1:2::1]", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),  # a dual-stack socket's view of an IPv4 client
        ("[::ffff:192.0.2.7]:80", "192.0.2.7"),
        ("::1", "::/64"),
        ("local", "local"),
        ("", ""),
    ],
)
def test_source_of(peer: str, source: str) -> None:
    assert source_of(peer) == source


def test_every_address_of_one_slash64_is_one_source() -> None:
    a = source_of("2001:db8:aa:bb::1")
    assert all(source_of(f"2001:db8:aa:bb:{i:x}::{i:x}") == a for i in range(1, 500, 37))
    assert source_of("2001:db8:aa:bc::1") != a


# -- caps -----------------------------------------------------------------------------------------


def test_per_source_cap_and_release() -> None:
    lim = limiter(max_per_source=3)
    assert [lim.admit("10.0.0.1") for _ in range(3)] == [None, None, None]
    assert lim.admit("10.0.0.1") == PER_SOURCE
    assert lim.admit("10.0.0.2") is None  # others are not affected
    lim.release("10.0.0.1")
    assert lim.admit("10.0.0.1") is None
    assert lim.admit("10.0.0.1") == PER_SOURCE
    assert lim.total == 4


def test_ipv6_slash64_shares_one_cap() -> None:
    lim = limiter(max_per_source=2)
    for peer in ("2001:db8:0:1::1", "2001:db8:0:1::2"):
        assert lim.admit(source_of(peer)) is None
    assert lim.admit(source_of("2001:db8:0:1:ffff::9")) == PER_SOURCE
    assert lim.admit(source_of("2001:db8:0:2::1")) is None  # the next /64 is another subscriber


def test_total_cap() -> None:
    lim = limiter(max_total=4, max_per_source=3)
    for src in ("a", "a", "b", "c"):
        assert lim.admit(src) is None
    assert lim.admit("d") == TOTAL
    assert lim.admit("a") == TOTAL
    lim.release("c")
    assert lim.admit("d") is None


def test_refused_admissions_are_not_counted() -> None:
    lim = limiter(max_total=10, max_per_source=1)
    assert lim.admit("a") is None
    for _ in range(20):
        assert lim.admit("a") == PER_SOURCE
    assert (lim.total, lim.pending) == (1, {"a": 1})


def test_release_never_goes_negative() -> None:
    lim = limiter(max_total=10, max_per_source=2)
    lim.release("a")
    lim.release("a")
    assert (lim.total, lim.pending) == (0, {})
    assert [lim.admit("a"), lim.admit("a"), lim.admit("a")] == [None, None, PER_SOURCE]


def test_expect_raises_the_cap_of_that_source_only() -> None:
    """Dial-backs a relay asked a listener for are not held against the listener's address."""
    lim = limiter(max_per_source=2, max_total=100)
    lim.expect("listener")
    lim.expect("listener")
    assert [lim.admit("listener") for _ in range(4)] == [None] * 4
    assert lim.admit("listener") == PER_SOURCE
    assert [lim.admit("other") for _ in range(3)] == [None, None, PER_SOURCE]
    for _ in range(4):
        lim.release("listener")
    lim.unexpect("listener")
    lim.unexpect("listener")
    lim.unexpect("listener")  # one too many: no negative allowance
    assert lim.expected == {}
    assert [lim.admit("listener") for _ in range(3)] == [None, None, PER_SOURCE]


def test_expect_does_not_lift_the_total_cap() -> None:
    lim = limiter(max_per_source=1, max_total=2)
    for _ in range(5):
        lim.expect("a")
    assert [lim.admit("a"), lim.admit("a"), lim.admit("a")] == [None, None, TOTAL]


# -- penalties ----------------------------------------------------------------------------------------


def test_penalty_after_threshold_and_others_unaffected() -> None:
    clock = Clock()
    lim = limiter(clock, threshold=5, penalty=30)
    assert [lim.failed("bad") for _ in range(4)] == [False] * 4
    assert not lim.blocked("bad")
    assert lim.admit("bad") is None  # four failures: still served
    lim.release("bad")
    assert lim.failed("bad") is True
    assert lim.blocked("bad")
    assert lim.admit("bad") == BLOCKED
    assert lim.admit("good") is None
    assert not lim.blocked("good")
    clock.now += 29.9
    assert lim.admit("bad") == BLOCKED
    clock.now += 0.2
    assert not lim.blocked("bad")
    assert lim.admit("bad") is None


def test_a_blocked_source_keeps_no_pending_slot() -> None:
    lim = limiter(threshold=1, max_per_source=1)
    lim.failed("x")
    for _ in range(10):
        assert lim.admit("x") == BLOCKED
    assert (lim.total, lim.pending) == (0, {})


def test_penalty_doubles_on_each_strike_up_to_the_cap() -> None:
    clock = Clock()
    lim = limiter(clock, threshold=2, penalty=10, max_penalty=70, window=1000)
    durations = []
    for _ in range(5):
        lim.failed("x")
        assert lim.failed("x") is True
        start = clock.now
        while lim.blocked("x"):
            clock.now += 1
        durations.append(clock.now - start)
    assert durations == [10, 20, 40, 70, 70]


def test_failures_outside_the_window_do_not_add_up() -> None:
    clock = Clock()
    lim = limiter(clock, threshold=3, window=60)
    for _ in range(10):
        lim.failed("slow")
        lim.failed("slow")
        clock.now += 61
    assert not lim.blocked("slow")
    lim.failed("slow")
    lim.failed("slow")
    assert lim.failed("slow") is True


def test_ipv6_penalty_covers_the_whole_slash64() -> None:
    lim = limiter(threshold=3)
    for i in range(3):
        lim.failed(source_of(f"2001:db8:5:6::{i + 1}"))
    assert lim.admit(source_of("2001:db8:5:6:dead:beef::1")) == BLOCKED
    assert lim.admit(source_of("2001:db8:5:7::1")) is None


def test_tracked_sources_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits_mod, "MAX_TRACKED", 8)
    lim = limiter(threshold=100)
    for i in range(50):
        lim.failed(f"10.0.0.{i}")
    assert len(lim._records) == 8


# -- property: caps always hold ---------------------------------------------------------------------

_OPS = st.lists(
    st.tuples(st.sampled_from(["admit", "release", "failed", "expect", "unexpect", "tick"]), st.integers(0, 5)),
    max_size=60,
)


@settings(max_examples=600, deadline=None)
@given(ops=_OPS)
def test_caps_hold_whatever_happens(ops: list[tuple[str, int]]) -> None:
    clock = Clock()
    lim = SourceLimiter(max_total=6, max_per_source=2, threshold=3, penalty=5, clock=clock)
    held: dict[str, int] = {}
    for op, n in ops:
        src = f"s{n}"
        if op == "admit":
            why = lim.admit(src)
            if why is None:
                held[src] = held.get(src, 0) + 1
                assert not lim.blocked(src)
                assert held[src] <= lim.max_per_source + lim.expected.get(src, 0)
            else:
                assert why in (BLOCKED, TOTAL, PER_SOURCE)
        elif op == "release" and held.get(src):
            held[src] -= 1
            lim.release(src)
        elif op == "failed":
            lim.failed(src)
        elif op == "expect":
            lim.expect(src)
        elif op == "unexpect":
            lim.unexpect(src)
        elif op == "tick":
            clock.now += n * 2
        assert lim.total == sum(held.values()) <= lim.max_total
        for s, count in held.items():
            assert lim.pending.get(s, 0) == count
        assert all(v > 0 for v in lim.expected.values())


def test_refusal_is_the_source_s_own_verdict_and_full_is_the_global_one() -> None:
    lim = limiter(max_total=2, max_per_source=1)
    assert lim.refusal("a") is None
    assert not lim.full
    assert lim.admit("a") is None
    assert lim.refusal("a") == PER_SOURCE  # its own cap, whatever the total
    assert lim.admit("b") is None
    assert lim.full
    assert lim.refusal("c") is None  # "c" itself may come in: the node makes room for it
    assert lim.admit("c") == TOTAL  # ...but admit() alone never goes past the cap
    lim.release("a")
    assert not lim.full
    assert lim.admit("c") is None


def test_connections_asked_for_raise_the_cap_only_so_far() -> None:
    """Pool grants a listener leaves unused must not lift its source's cap without bound."""
    lim = SourceLimiter(max_total=10_000, max_per_source=2)
    for _ in range(1000):
        lim.expect("10.0.0.1")
    admitted = 0
    while lim.admit("10.0.0.1") is None:
        admitted += 1
        assert admitted <= 100, "the cap grew without bound"
    assert admitted == 2 + 4 * 2
