"""The warm pool: connections a listener parks at the relay ahead of its clients.

The relay grants each listener up to its pool size of one-time pool tickets (``PoolGrant``);
the listener connects and sends ``HN/1 POOL <ticket>``; the connection stays parked, silent,
until a client takes it (then the relay activates it, as a dial-back) or it ages out. A parked
connection that turns readable was closed (or misbehaves) and is dropped. Every grant
outstanding raises the listener's source cap by one.
"""

from __future__ import annotations

import asyncio
import socket
import time

from homenet.node.connection import Handshake
from homenet.node.dialback import POOL, TicketOwner, split_ticket, wire_ticket
from homenet.node.errors import Code, RouteError
from homenet.node.limits import SourceLimiter, source_of
from homenet.node.listeners import Listener, PoolGrant
from homenet.node.tickets import TicketBook, TicketError


class ParkedPool:
    """Parked connections of every listener of one relay, and their grants."""

    def __init__(
        self,
        tickets: TicketBook[TicketOwner],
        limiter: SourceLimiter,
        ttl: float,
        max_age: float,
        endpoint: str,
        prefix: str = "",
    ) -> None:
        self.tickets = tickets
        self.prefix = prefix
        self.limiter = limiter
        self.ttl = ttl
        self.max_age = max_age
        self.endpoint = endpoint
        self._parked_at: dict[int, float] = {}
        #: Clients served from a parked connection, and clients that found none (for metrics).
        self.hits = 0
        self.misses = 0

    def park(self, hs: Handshake) -> bool:
        """``HN/1 POOL <ticket>``: a listener parks a warm connection."""
        assert hs.request is not None
        try:
            owner = self.tickets.redeem(split_ticket(hs.request.arg)[1], POOL).owner
        except TicketError as exc:  # a guessed or stale ticket is a failed login, like a bad key
            self.limiter.failed(hs.source or source_of(hs.peer))
            raise RouteError(Code.UNAUTHORIZED, str(exc)) from None
        assert isinstance(owner, Listener)  # a pool ticket is only ever issued for one
        lst = owner
        self.limiter.unexpect(source_of(lst.peer))
        if hs.trailing:
            raise RouteError(Code.BAD_REQUEST, "unexpected bytes after POOL")
        lst.grants_out = max(0, lst.grants_out - 1)
        if not lst.online or len(lst.pool) >= lst.pool_size:
            raise RouteError(Code.TOO_MANY, "pool is full or its listener is gone")
        sock = hs.sock
        lst.pool.append(sock)
        self._parked_at[sock.fileno()] = time.monotonic()
        # A parked connection must stay silent: readable means closed (or misbehaving).
        asyncio.get_running_loop().add_reader(sock.fileno(), self._died, lst, sock)
        return True

    def take(self, lst: Listener) -> socket.socket | None:
        """A live parked connection of ``lst`` (None: the pool is empty); grants a new one."""
        while lst.pool:
            sock = lst.pool.popleft()
            self._unwatch(sock)
            self.refill(lst)
            try:
                if sock.recv(1, socket.MSG_PEEK) == b"":  # closed while parked
                    sock.close()
                    continue
            except BlockingIOError:
                self.hits += 1
                return sock  # alive and silent: good
            except OSError:
                sock.close()
                continue
            sock.close()  # it sent bytes unasked
        self.misses += 1
        return None

    def refill(self, lst: Listener) -> None:
        """Grant pool tickets until parked + granted reaches the pool size."""
        session = lst.session
        if session is None or session.closed:
            return
        source = source_of(lst.peer)
        while len(lst.pool) + lst.grants_out < lst.pool_size:
            lst.grants_out += 1

            def expired(lst: Listener = lst) -> None:
                lst.grants_out = max(0, lst.grants_out - 1)
                self.limiter.unexpect(source)

            self.limiter.expect(source)
            ticket = self.tickets.issue(POOL, lst, self.ttl, on_expire=expired)
            session.send(PoolGrant(wire_ticket(self.prefix, ticket), self.ttl, self.endpoint))

    def recycle(self, lst: Listener, now: float) -> None:
        """Close connections parked longer than ``max_age`` (NAT mappings of old idle flows
        go stale) and grant their replacements."""
        for sock in [s for s in lst.pool if now - self._parked_at.get(s.fileno(), now) > self.max_age]:
            self._died(lst, sock)
        self.refill(lst)

    def drop(self, lst: Listener) -> None:
        """Close every parked connection of ``lst`` (it went offline)."""
        while lst.pool:
            sock = lst.pool.popleft()
            self._unwatch(sock)
            sock.close()
        lst.grants_out = 0

    def grant_died(self, lst: Listener) -> None:
        """A grant of ``lst`` was revoked with its session: its source cap goes back down."""
        self.limiter.unexpect(source_of(lst.peer))

    def _died(self, lst: Listener, sock: socket.socket) -> None:
        if sock in lst.pool:
            lst.pool.remove(sock)
            self._unwatch(sock)
            sock.close()
            self.refill(lst)

    def _unwatch(self, sock: socket.socket) -> None:
        asyncio.get_running_loop().remove_reader(sock.fileno())
        self._parked_at.pop(sock.fileno(), None)
