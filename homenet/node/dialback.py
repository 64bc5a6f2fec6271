"""Dial-back: a client waits while its listener dials the relay back with a one-time ticket.

The relay sends the listener an :class:`Incoming` event with a ticket; the listener connects
to the relay's data plane and sends ``HN/1 TICKET <ticket>``; the relay hands that connection
to the waiting client. A waiting client raises its listener's source cap by one (the
dial-back is expected, not an attack) until the ticket is used or dies.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

from homenet.node.connection import Handshake
from homenet.node.errors import Code, RouteError
from homenet.node.limits import SourceLimiter, source_of
from homenet.node.listeners import Incoming, Listener, ListenerSession
from homenet.node.stats import bump
from homenet.node.tickets import TicketBook, TicketError

#: Ticket kinds in the relay's one ticket book.
DIAL, POOL = "dial", "pool"


def wire_ticket(prefix: str, ticket: str) -> str:
    """A ticket as listeners see it: the issuing relay's prefix (in a fleet), a dot, the ticket."""
    return f"{prefix}.{ticket}" if prefix else ticket


def split_ticket(wire: str) -> tuple[str, str]:
    """(prefix, ticket) of a ticket as a listener sent it."""
    prefix, dot, rest = wire.partition(".")
    return (prefix, rest) if dot else ("", wire)


@dataclass(frozen=True, slots=True)
class DialWaiter:
    """A client waiting for its listener (``session``) to dial back from ``source``."""

    session: ListenerSession
    fut: asyncio.Future[socket.socket]
    source: str


#: Who a ticket is for: a waiting client (dial) or a listener's pool (pool).
TicketOwner = DialWaiter | Listener


class DialBacks:
    """Clients waiting for dial-backs, by ticket."""

    def __init__(
        self, tickets: TicketBook[TicketOwner], limiter: SourceLimiter, ttl: float, endpoint: str, prefix: str = ""
    ) -> None:
        self.tickets = tickets
        self.prefix = prefix
        self.limiter = limiter
        self.ttl = ttl
        #: Where listeners dial back to (this relay's own address behind a load balancer).
        self.endpoint = endpoint
        #: Dial-backs by outcome: ok, failed (the listener could not dial), timeout (for metrics).
        self.outcomes: dict[str, int] = {}

    async def wait(self, lst: Listener, session: ListenerSession, client: str) -> socket.socket:
        """Ask ``lst`` to dial back for ``client`` and wait for the connection."""
        fut: asyncio.Future[socket.socket] = asyncio.get_running_loop().create_future()
        source = source_of(session.peer)
        self.limiter.expect(source)
        ticket = self.tickets.issue(
            DIAL, DialWaiter(session, fut, source), self.ttl, on_expire=lambda: self.limiter.unexpect(source)
        )
        session.send(Incoming(wire_ticket(self.prefix, ticket), client, self.ttl, self.endpoint))
        try:
            async with asyncio.timeout(self.ttl):
                sock = await fut
            bump(self.outcomes, "ok")
            return sock
        except RouteError:
            bump(self.outcomes, "failed")
            raise
        except TimeoutError:
            bump(self.outcomes, "timeout")
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                fut.result().close()  # arrived at the last moment: nobody will use it
            raise RouteError(
                Code.GATEWAY_TIMEOUT, f"listener {lst.listen_id} did not dial back within {self.ttl:g}s"
            ) from None
        finally:
            if not fut.done():
                fut.cancel()

    def redeem(self, hs: Handshake) -> bool:
        """``HN/1 TICKET <ticket>``: a listener dialing back; its socket goes to the client."""
        assert hs.request is not None
        try:
            waiter = self._waiter(hs.request.arg)
        except RouteError:  # a guessed or stale ticket is a failed login, like a bad key
            self.limiter.failed(hs.source or source_of(hs.peer))
            raise
        self.limiter.unexpect(waiter.source)
        if hs.trailing:
            raise RouteError(Code.BAD_REQUEST, "unexpected bytes after TICKET")
        if waiter.fut.done() or waiter.session.closed:
            raise RouteError(Code.TIMEOUT, "the client stopped waiting")
        waiter.fut.set_result(hs.sock)
        return True

    def failed(self, session: ListenerSession, ticket: str, reason: str) -> None:
        """The listener reports it cannot dial back: fail the waiting client now."""
        try:
            waiter = self._waiter(ticket)
        except RouteError:
            return
        self.limiter.unexpect(waiter.source)
        if waiter.session is session and not waiter.fut.done():
            waiter.fut.set_exception(RouteError(Code.BAD_GATEWAY, f"listener could not dial back: {reason[:200]}"))

    def died(self, waiter: DialWaiter) -> None:
        """``waiter``'s ticket was revoked with its listener's session: the client hears it now."""
        self.limiter.unexpect(waiter.source)
        if not waiter.fut.done():
            waiter.fut.set_exception(RouteError(Code.UNAVAILABLE, "listener went offline before dialing back"))

    def _waiter(self, ticket: str) -> DialWaiter:
        try:
            owner = self.tickets.redeem(split_ticket(ticket)[1], DIAL).owner
        except TicketError as exc:
            raise RouteError(Code.UNAUTHORIZED, str(exc)) from None
        assert isinstance(owner, DialWaiter)  # a dial ticket is only ever issued for one
        return owner
