"""TicketBook: one-time dial-back and pool tickets (values in, verdicts out)."""

from __future__ import annotations

import functools
import hashlib
import operator
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from homenet.node.tickets import (
    Ticket,
    TicketBook,
    TicketError,
    TicketExpired,
    TicketReused,
    TicketUnknown,
    TicketWrongKind,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def book(clock: Clock | None = None, max_tickets: int = 100_000) -> TicketBook[str]:
    return TicketBook(clock=clock or Clock(), max_tickets=max_tickets)


def refused(b: TicketBook[str], ticket: str, kind: str = "dial") -> TicketError:
    with pytest.raises(TicketError) as info:
        b.redeem(ticket, kind)
    assert "\n" not in str(info.value)
    return info.value


def test_ticket_is_long_random_and_url_safe() -> None:
    b = book()
    tickets = {b.issue("dial", "owner", 5) for _ in range(2000)}
    assert len(tickets) == 2000
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{22}", t) for t in tickets)  # 128 bits
    assert len(b) == 2000


def test_only_the_digest_is_stored() -> None:
    b = book()
    ticket = b.issue("dial", "owner", 5)
    stored = list(b._live)
    assert stored == [hashlib.sha256(ticket.encode()).digest()]
    assert ticket not in repr(b._live)


def test_single_use() -> None:
    b = book()
    ticket = b.issue("dial", "alice", 5)
    entry = b.redeem(ticket, "dial")
    assert isinstance(entry, Ticket)
    assert (entry.kind, entry.owner) == ("dial", "alice")
    assert len(b) == 0
    err = refused(b, ticket)
    assert isinstance(err, TicketReused)
    assert str(err) == "ticket already used"
    assert isinstance(refused(b, ticket), TicketReused)  # and stays used


def test_unknown() -> None:
    b = book()
    b.issue("dial", "alice", 5)
    for forged in ("", "x", "A" * 22, "é" * 22, "\x00" * 22, "A" * 100_000):
        err = refused(b, forged)
        assert isinstance(err, TicketUnknown)
        assert str(err) == "unknown ticket"
    assert len(b) == 1


def test_expired_on_redeem_runs_its_hook_once() -> None:
    clock = Clock()
    b = book(clock)
    hooks: list[str] = []
    ticket = b.issue("dial", "alice", 5, on_expire=lambda: hooks.append("expired"))
    clock.now += 5.01
    err = refused(b, ticket)
    assert isinstance(err, TicketExpired)
    assert str(err) == "ticket expired"
    assert hooks == ["expired"]
    refused(b, ticket)  # a second try is refused too
    b.sweep()
    assert hooks == ["expired"]


def test_valid_until_its_last_moment() -> None:
    clock = Clock()
    b = book(clock)
    ticket = b.issue("pool", "alice", 30)
    clock.now += 30
    assert b.redeem(ticket, "pool").owner == "alice"


def test_sweep_expires_and_the_reason_stays() -> None:
    clock = Clock()
    b = book(clock)
    hooks: list[str] = []
    old = b.issue("pool", "alice", 1, on_expire=lambda: hooks.append("old"))
    fresh = b.issue("pool", "bob", 60, on_expire=lambda: hooks.append("fresh"))
    clock.now += 2
    b.sweep()
    assert hooks == ["old"]
    assert len(b) == 1
    assert isinstance(refused(b, old, "pool"), TicketExpired)
    assert b.redeem(fresh, "pool").owner == "bob"


def test_sweep_forgets_dead_tickets_after_a_minute() -> None:
    clock = Clock()
    b = book(clock)
    old = b.issue("pool", "alice", 1)
    clock.now += 2
    b.sweep()
    clock.now += 61
    b.sweep()
    assert isinstance(refused(b, old, "pool"), TicketUnknown)  # forgotten: unknown, still refused


def test_revoked() -> None:
    b = book()
    hooks: list[str] = []
    mine = [b.issue("dial", "alice", 5) for _ in range(3)]
    theirs = b.issue("dial", "bob", 5)
    assert b.revoke(lambda owner: owner == "alice", on_revoke=hooks.append) == 3
    assert hooks == ["alice"] * 3
    for t in mine:
        err = refused(b, t)
        assert isinstance(err, TicketUnknown)
        assert str(err) == "ticket revoked: its listener went offline"
    assert b.redeem(theirs, "dial").owner == "bob"


def test_four_refusals_are_told_apart() -> None:
    """Reused, expired, unknown and revoked each say so (for the logs), and none is usable."""
    clock = Clock()
    b = book(clock)
    reused = b.issue("dial", "a", 5)
    b.redeem(reused, "dial")
    expired = b.issue("dial", "a", 1)
    revoked = b.issue("dial", "r", 5)
    b.revoke(lambda owner: owner == "r")
    clock.now += 2
    b.sweep()
    messages = {str(refused(b, t)) for t in (reused, expired, "never-issued-ticket", revoked)}
    assert messages == {
        "ticket already used",
        "ticket expired",
        "unknown ticket",
        "ticket revoked: its listener went offline",
    }


def test_wrong_kind_is_refused_and_burns_the_ticket() -> None:
    b = book()
    dial = b.issue("dial", "alice", 5)
    pool = b.issue("pool", "alice", 5)
    err = refused(b, dial, "pool")
    assert isinstance(err, TicketWrongKind)
    assert str(err) == "ticket is for dial, not pool"
    assert isinstance(refused(b, pool, "dial"), TicketWrongKind)
    # a probe with the wrong kind cannot be followed by the right one
    assert isinstance(refused(b, dial, "dial"), TicketReused)
    assert isinstance(refused(b, pool, "pool"), TicketReused)


def test_bounded_size_drops_the_oldest() -> None:
    b = book(max_tickets=3)
    tickets = [b.issue("dial", f"o{i}", 5) for i in range(5)]
    assert len(b) == 3
    for t in tickets[:2]:
        assert isinstance(refused(b, t), TicketExpired)
    assert [b.redeem(t, "dial").owner for t in tickets[2:]] == ["o2", "o3", "o4"]


def test_used_and_dead_records_are_bounded() -> None:
    clock = Clock()
    b = book(clock, max_tickets=4)
    for _ in range(20):
        b.redeem(b.issue("dial", "x", 5), "dial")
    b.revoke(lambda owner: True)
    for _ in range(20):
        b.issue("dial", "y", 5)
        b.revoke(lambda owner: True)
    assert len(b._used) <= 4
    assert len(b._dead) <= 4


def test_a_ticket_dropped_for_room_runs_its_hook() -> None:
    b = book(max_tickets=2)
    hooks: list[int] = []
    for i in range(4):
        b.issue("dial", "x", 5, on_expire=functools.partial(hooks.append, i))
    assert hooks == [0, 1]


@settings(max_examples=500, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["issue", "redeem", "replay", "tick", "sweep", "revoke"]), st.integers(0, 7)),
        max_size=40,
    )
)
def test_a_ticket_is_redeemed_at_most_once(ops: list[tuple[str, int]]) -> None:
    clock = Clock()
    b: TicketBook[int] = TicketBook(clock=clock, max_tickets=6)
    issued: list[tuple[str, str, float, int]] = []
    used: set[str] = set()
    revoked: set[str] = set()
    for op, n in ops:
        if op == "issue":
            kind = "dial" if n % 2 else "pool"
            issued.append((b.issue(kind, n, n + 1), kind, clock.now + n + 1, n))
        elif op in ("redeem", "replay") and issued:
            ticket, kind, expires, _ = issued[n % len(issued)] if op == "redeem" else issued[0]
            try:
                entry = b.redeem(ticket, kind)
            except TicketError:
                continue
            assert ticket not in used, "a ticket was redeemed twice"
            assert ticket not in revoked, "a revoked ticket was accepted"
            assert clock.now <= expires, "an expired ticket was accepted"
            assert entry.kind == kind
            used.add(ticket)
        elif op == "tick":
            clock.now += n
        elif op == "sweep":
            b.sweep()
        elif op == "revoke":
            b.revoke(functools.partial(operator.eq, n))
            revoked |= {t for t, _, _, owner in issued if owner == n}
        assert len(b) <= 6
