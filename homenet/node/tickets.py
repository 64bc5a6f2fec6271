"""One-time tickets a relay hands a listener for dial-back and warm-pool connections.

A ticket is 128 random bits. The relay stores only its SHA-256, so looking one up leaks
nothing through timing; each is bound to one listener session, expires in seconds, and is
consumed on first use (a second use is told apart from an unknown ticket, for the logs).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from homenet.node.errors import Code, HomeNetError

T = TypeVar("T")


class TicketError(HomeNetError):
    """A ticket that cannot be used; the message is safe to send to the peer."""

    default_code = Code.UNAUTHORIZED


class TicketUnknown(TicketError):
    """Never issued (forged or mistyped)."""


class TicketExpired(TicketError):
    """Issued, but not used in time."""


class TicketReused(TicketError):
    """Already used once."""


class TicketWrongKind(TicketError):
    """A dial-back ticket used to park, or the other way round."""


def _digest(ticket: str) -> bytes:
    return hashlib.sha256(ticket.encode("ascii", "replace")).digest()


@dataclass(slots=True)
class Ticket(Generic[T]):
    """What a ticket grants: ``kind`` ("dial" or "pool") for ``owner`` until ``expires``."""

    kind: str
    owner: T
    expires: float
    on_expire: Callable[[], None] | None = field(default=None, repr=False)


class TicketBook(Generic[T]):
    """Issues and redeems tickets; bounded (oldest tickets are dropped past ``max_tickets``)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_tickets: int = 100_000) -> None:
        self._clock = clock
        self._live: dict[bytes, Ticket[T]] = {}
        self._used: dict[bytes, float] = {}  # digest -> when it would have expired
        self._dead: dict[bytes, tuple[str, float]] = {}  # digest -> (why it is unusable, since)
        self._max = max_tickets

    def __len__(self) -> int:
        return len(self._live)

    def issue(self, kind: str, owner: T, ttl: float, on_expire: Callable[[], None] | None = None) -> str:
        """A fresh ticket for ``owner``, valid ``ttl`` seconds."""
        while len(self._live) >= self._max:  # full: the oldest ticket dies early, its hook told
            oldest = next(iter(self._live))
            dropped = self._live.pop(oldest)
            self._dead[oldest] = ("ticket expired", self._clock())
            if dropped.on_expire is not None:
                dropped.on_expire()
        ticket = secrets.token_urlsafe(16)
        self._live[_digest(ticket)] = Ticket(kind, owner, self._clock() + ttl, on_expire)
        return ticket

    def redeem(self, ticket: str, kind: str) -> Ticket[T]:
        """Consume ``ticket``; raises a :class:`TicketError` subclass if it cannot be used."""
        key = _digest(ticket)
        now = self._clock()
        entry = self._live.pop(key, None)
        if entry is None:
            dead = self._dead.get(key)
            if dead is not None:
                raise (TicketExpired if "expired" in dead[0] else TicketUnknown)(dead[0])
            if key in self._used:
                raise TicketReused("ticket already used")
            raise TicketUnknown("unknown ticket")
        self._remember_used(key, entry.expires)
        if entry.expires < now:
            if entry.on_expire is not None:
                entry.on_expire()
            raise TicketExpired("ticket expired")
        if entry.kind != kind:
            raise TicketWrongKind(f"ticket is for {entry.kind}, not {kind}")
        return entry

    def _trim(self) -> None:
        while len(self._dead) > self._max:
            self._dead.pop(next(iter(self._dead)))

    def _remember_used(self, key: bytes, expires: float) -> None:
        while len(self._used) >= self._max:
            self._used.pop(next(iter(self._used)))
        self._used[key] = expires

    def revoke(self, match: Callable[[T], bool], on_revoke: Callable[[T], None] | None = None) -> int:
        """Kill every live ticket whose owner ``match`` accepts (its session ended)."""
        dead = [k for k, t in self._live.items() if match(t.owner)]
        for key in dead:
            entry = self._live.pop(key)
            self._dead[key] = ("ticket revoked: its listener went offline", self._clock())
            self._trim()
            if on_revoke is not None:
                on_revoke(entry.owner)
        return len(dead)

    def sweep(self) -> None:
        """Drop expired tickets (running their ``on_expire``) and old used-ticket records."""
        now = self._clock()
        for key in [k for k, t in self._live.items() if t.expires < now]:
            entry = self._live.pop(key)
            self._dead[key] = ("ticket expired", now)
            self._trim()
            if entry.on_expire is not None:
                entry.on_expire()
        for key in [k for k, exp in self._used.items() if exp + 60 < now]:
            del self._used[key]
        for key in [k for k, (_, since) in self._dead.items() if since + 60 < now]:
            del self._dead[key]
