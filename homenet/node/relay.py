"""The relay role: listeners register over the control plane, clients reach them by listenId.

A client's ``CONNECT <listenId>`` is served from the listener's warm pool of parked
connections when one is there, else by asking the listener (an :class:`Incoming` event with
a one-time ticket) to dial back with ``TICKET <ticket>``. Either way the relay activates the
listener's connection with ``HN/1 200 ok hop=N`` (N = hops the connection has gone
through), then the node splices it to the client like any target.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from dataclasses import dataclass

from homenet.node.address import MAX_HOPS, ListenId
from homenet.node.errors import Code
from homenet.node.keys import Key
from homenet.node.limits import source_of
from homenet.node.listeners import (
    Incoming,
    Listener,
    ListenerError,
    ListenerForbidden,
    ListenerLoop,
    ListenerNotFound,
    ListenerOffline,
    ListenerRegistry,
    ListenerSession,
    Ping,
    PoolGrant,
    QueryEvent,
)
from homenet.node.log import fields
from homenet.node.preamble import Verb, encode_reply
from homenet.node.query import Query, QueryAnswer, QueryError
from homenet.node.server import Handshake, Node, RouteError, SessionInfo, Target
from homenet.node.tickets import TicketBook, TicketError

log = logging.getLogger("homenet.relay")


@dataclass(frozen=True, slots=True)
class RelaySettings:
    """Knobs of the relay role (defaults suit a public relay)."""

    #: Seconds a dial-back ticket is valid and a client waits for its listener.
    dialback_timeout: float = 5.0
    #: Seconds a pool grant is valid.
    pool_ticket_ttl: float = 30.0
    #: Most parked connections one listener may keep.
    max_pool: int = 16
    #: Seconds between pings on a listener stream (3 missed = dead).
    ping_interval: float = 2.0
    #: Seconds an offline listenId stays reserved for its owner.
    offline_hold: float = 60.0
    #: Seconds a parked connection may wait before the relay recycles it.
    pool_max_age: float = 300.0
    #: ``required``: a listen key claims its own id; ``open``: anonymous ids too.
    rl_auth: str = "required"
    #: Sessions one listener may have at once.
    max_listener_sessions: int = 1000


@dataclass(frozen=True, slots=True)
class Registration:
    """What a listener asks for when it registers."""

    listen_id: str
    resume_secret: str
    name: str
    version: str
    pool_size: int
    node_id: str


@dataclass(frozen=True, slots=True)
class _DialWaiter:
    """A client waiting for its listener to dial back (from ``source``)."""

    session: ListenerSession
    fut: asyncio.Future[socket.socket]
    source: str


def _waiter(owner: object) -> _DialWaiter:
    assert isinstance(owner, _DialWaiter)
    return owner


class Relay:
    """Relay role of one :class:`Node`: listener registry, tickets, pool, dial-back."""

    def __init__(self, node: Node, settings: RelaySettings | None = None) -> None:
        self.node = node
        self.settings = settings or RelaySettings()
        self.registry = ListenerRegistry(self.settings.offline_hold)
        self.tickets: TicketBook[object] = TicketBook()
        self._parked_at: dict[int, float] = {}
        self._queries: dict[int, tuple[ListenerSession, asyncio.Future[QueryAnswer]]] = {}
        self._query_ids = 0
        self._seq = 0
        self._ticker: asyncio.Task[None] | None = None
        node.listener_route = self.route_listener
        node.verbs[Verb.TICKET] = self.on_ticket
        node.verbs[Verb.POOL] = self.on_pool
        node.listener_count = self.registry.online_count

    def start(self) -> None:
        self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        for lst in self.registry.all():
            if lst.session is not None:
                lst.session.close("relay shutting down")
            self._drop_pool(lst)

    # -- registration (called by the control plane) ------------------------------------------
    def register(self, reg: Registration, peer: str, key: Key | None = None) -> tuple[Listener, ListenerSession, str]:
        """Admit a listener; returns its record, its session and the secret to hand back.

        ``key`` is the verified key of the caller (None: anonymous). With a key, the caller
        claims the listenId equal to the key id, or one in its namespace (``KEYID-suffix``,
        unless that is another key's id); an admin key may claim any. Anonymous callers
        (``rl_auth=open`` only) get a random id or claim one no key reserves.
        """
        if reg.node_id and reg.node_id == self.node.node_id:
            raise ListenerLoop("this relay is the registering node itself: the --rl route loops back")
        claim = reg.listen_id
        if key is not None:
            claim = claim or key.id
            own = claim == key.id or (
                claim.startswith(f"{key.id}-") and claim not in self.node.keys.reserved_listen_ids()
            )
            if not own and "admin" not in key.roles:
                raise ListenerForbidden(
                    f"key {key.id} may claim only the listenId {key.id} or {key.id}-SUFFIX, not {claim[:64]}"
                )
        elif self.settings.rl_auth != "open":
            raise ListenerForbidden("this relay needs a listen key (set HOMENET_KEY=ID:SECRET)")
        elif claim and claim in self.node.keys.reserved_listen_ids():
            raise ListenerForbidden(f"listenId {claim} is reserved for key {claim}")
        lst, secret, replaced = self.registry.claim(claim, reg.resume_secret)
        if replaced is not None and replaced.session is not None:
            replaced.session.close("replaced by a newer registration of the same owner")
            self._offline(replaced)
        session = ListenerSession(peer)
        lst.session = session
        lst.name, lst.version, lst.peer = reg.name, reg.version, peer
        lst.pool_size = min(max(reg.pool_size, 0), self.settings.max_pool)
        log.info(
            "listener.registered",
            extra=fields(
                listen_id=lst.listen_id, peer=peer, name=reg.name, pool=lst.pool_size, takeover=bool(replaced)
            ),
        )
        self._refill(lst)
        return lst, session, secret

    def unregister(self, lst: Listener, session: ListenerSession, reason: str) -> None:
        """The stream of ``session`` ended: the listener goes offline (if still current)."""
        session.close(reason)
        if lst.session is session:
            self._offline(lst)
            self.registry.went_offline(lst)
            log.info("listener.offline", extra=fields(listen_id=lst.listen_id, reason=reason))

    def kick(self, listen_id: str) -> bool:
        """End a listener's stream and forget its id; False if there is no such listener."""
        lst = self.registry.remove(listen_id)
        if lst is None:
            return False
        if lst.session is not None:
            lst.session.close("kicked by the operator")
        self._offline(lst)
        log.info("listener.kicked", extra=fields(listen_id=listen_id))
        return True

    def pong(self, session: ListenerSession) -> None:
        session.heard()

    def dial_failed(self, session: ListenerSession, ticket: str, reason: str) -> None:
        """The listener reports it cannot dial back: fail the waiting client now."""
        try:
            entry = self.tickets.redeem(ticket, "dial")
        except TicketError:
            return
        waiter = _waiter(entry.owner)
        self.node.limiter.unexpect(waiter.source)
        if waiter.session is session and not waiter.fut.done():
            waiter.fut.set_exception(RouteError(Code.BAD_GATEWAY, f"listener could not dial back: {reason[:200]}"))

    # -- discovery queries ------------------------------------------------------------------
    async def forward_query(self, listen_id: str, query: Query) -> QueryAnswer:
        """Ask listener ``listen_id`` (and, through it, the rest of ``query.path``)."""
        try:
            lst = self.registry.get(listen_id)
        except ListenerNotFound as exc:
            raise QueryError("not_found", str(exc)) from None
        except ListenerOffline as exc:
            raise QueryError("unavailable", str(exc)) from None
        session = lst.session
        assert session is not None
        self._query_ids += 1
        qid = self._query_ids
        fut: asyncio.Future[QueryAnswer] = asyncio.get_running_loop().create_future()
        self._queries[qid] = (session, fut)
        session.send(QueryEvent(qid, query))
        try:
            async with asyncio.timeout(query.timeout + 0.1):
                return await fut
        except TimeoutError:
            raise QueryError("deadline", f"listener {listen_id} did not answer within {query.timeout:g}s") from None
        finally:
            self._queries.pop(qid, None)

    def query_answered(self, session: ListenerSession, qid: int, answer: QueryAnswer | QueryError) -> None:
        """A listener's answer to query ``qid`` (ignored unless it came from the asked session)."""
        pending = self._queries.get(qid)
        if pending is None or pending[0] is not session or pending[1].done():
            return
        if isinstance(answer, QueryError):
            pending[1].set_exception(answer)
        else:
            pending[1].set_result(answer)

    def _ticket_died(self, owner: object) -> None:
        """A ticket was revoked with its listener's session: a waiting client hears it now."""
        if isinstance(owner, _DialWaiter):
            self.node.limiter.unexpect(owner.source)
            if not owner.fut.done():
                owner.fut.set_exception(RouteError(Code.UNAVAILABLE, "listener went offline before dialing back"))
        elif isinstance(owner, Listener):
            self.node.limiter.unexpect(source_of(owner.peer))

    def _fail_queries(self, session: ListenerSession) -> None:
        for s, fut in list(self._queries.values()):
            if s is session and not fut.done():
                fut.set_exception(QueryError("unavailable", "listener went offline while answering"))

    def _offline(self, lst: Listener) -> None:
        if lst.session is not None:
            session = lst.session
            self.tickets.revoke(
                lambda owner: owner is lst or (isinstance(owner, _DialWaiter) and owner.session is session),
                on_revoke=self._ticket_died,
            )
            self._fail_queries(session)
            lst.session.close(lst.session.close_reason or "offline")
        self._drop_pool(lst)
        lst.grants_out = 0
        lst.session = None

    # -- data plane ----------------------------------------------------------------------------
    async def route_listener(self, hs: Handshake, hop: ListenId) -> Target:
        """Reach listener ``hop`` for a client: from the pool, else by dial-back."""
        try:
            lst = self.registry.get(hop.value)
        except ListenerNotFound as exc:
            raise RouteError(Code.NOT_FOUND, str(exc)) from None
        except ListenerOffline as exc:
            raise RouteError(Code.UNAVAILABLE, str(exc)) from None
        depth = hs.depth + 1
        if depth > MAX_HOPS:
            raise RouteError(Code.HOP_LIMIT, f"route longer than {MAX_HOPS} hops")
        if self.node.settings.connect_auth == "all":
            self.node.authorize(hs, "connect")
        if lst.active >= self.settings.max_listener_sessions:
            raise RouteError(Code.TOO_MANY, f"listener {lst.listen_id} at its limit of {lst.active} sessions")
        session = lst.session
        assert session is not None
        sock = self._take_parked(lst)
        if sock is None:
            sock = await self._dial_back(lst, session, hs.peer)
        lst.active += 1
        lst.total += 1

        def done(info: SessionInfo) -> None:
            lst.active -= 1
            lst.bytes_up += info.bytes_up
            lst.bytes_down += info.bytes_down

        # the activation line goes out with the client's first bytes, in one send
        return Target(
            sock, f"listener {lst.listen_id}", done, greeting=encode_reply(Code.OK, fields={"hop": str(depth)})
        )

    async def _dial_back(self, lst: Listener, session: ListenerSession, client: str) -> socket.socket:
        fut: asyncio.Future[socket.socket] = asyncio.get_running_loop().create_future()
        ttl = self.settings.dialback_timeout
        source = source_of(session.peer)
        self.node.limiter.expect(source)
        ticket = self.tickets.issue(
            "dial", _DialWaiter(session, fut, source), ttl, on_expire=lambda: self.node.limiter.unexpect(source)
        )
        session.send(Incoming(ticket, client, ttl))
        try:
            async with asyncio.timeout(ttl):
                return await fut
        except TimeoutError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                fut.result().close()  # arrived at the last moment: nobody will use it
            raise RouteError(
                Code.GATEWAY_TIMEOUT, f"listener {lst.listen_id} did not dial back within {ttl:g}s"
            ) from None
        finally:
            if not fut.done():
                fut.cancel()

    async def on_ticket(self, hs: Handshake) -> bool:
        """``HN/1 TICKET <ticket>``: a listener dialing back for a waiting client."""
        assert hs.request is not None
        try:
            entry = self.tickets.redeem(hs.request.arg, "dial")
        except TicketError as exc:
            raise RouteError(Code.UNAUTHORIZED, str(exc)) from None
        waiter = _waiter(entry.owner)
        self.node.limiter.unexpect(waiter.source)
        self.node.release_admission(hs)
        if hs.trailing:
            raise RouteError(Code.BAD_REQUEST, "unexpected bytes after TICKET")
        if waiter.fut.done() or waiter.session.closed:
            raise RouteError(Code.TIMEOUT, "the client stopped waiting")
        waiter.fut.set_result(hs.sock)
        return True

    async def on_pool(self, hs: Handshake) -> bool:
        """``HN/1 POOL <ticket>``: a listener parks a warm connection."""
        assert hs.request is not None
        try:
            entry = self.tickets.redeem(hs.request.arg, "pool")
        except TicketError as exc:
            raise RouteError(Code.UNAUTHORIZED, str(exc)) from None
        lst = entry.owner
        assert isinstance(lst, Listener)
        self.node.limiter.unexpect(source_of(lst.peer))
        self.node.release_admission(hs)
        if hs.trailing:
            raise RouteError(Code.BAD_REQUEST, "unexpected bytes after POOL")
        lst.grants_out = max(0, lst.grants_out - 1)
        if not lst.online or len(lst.pool) >= lst.pool_size:
            raise RouteError(Code.TOO_MANY, "pool is full or its listener is gone")
        sock = hs.sock
        lst.pool.append(sock)
        self._parked_at[sock.fileno()] = time.monotonic()
        # A parked connection must stay silent: readable means closed (or misbehaving).
        asyncio.get_running_loop().add_reader(sock.fileno(), self._parked_died, lst, sock)
        return True

    def _take_parked(self, lst: Listener) -> socket.socket | None:
        loop = asyncio.get_running_loop()
        while lst.pool:
            sock = lst.pool.popleft()
            loop.remove_reader(sock.fileno())
            self._parked_at.pop(sock.fileno(), None)
            self._refill(lst)
            try:
                if sock.recv(1, socket.MSG_PEEK) == b"":  # closed while parked
                    sock.close()
                    continue
            except BlockingIOError:
                return sock  # alive and silent: good
            except OSError:
                sock.close()
                continue
            sock.close()  # it sent bytes unasked
        return None

    def _parked_died(self, lst: Listener, sock: socket.socket) -> None:
        if sock in lst.pool:
            lst.pool.remove(sock)
            asyncio.get_running_loop().remove_reader(sock.fileno())
            self._parked_at.pop(sock.fileno(), None)
            sock.close()
            self._refill(lst)

    def _drop_pool(self, lst: Listener) -> None:
        loop = asyncio.get_running_loop()
        while lst.pool:
            sock = lst.pool.popleft()
            loop.remove_reader(sock.fileno())
            self._parked_at.pop(sock.fileno(), None)
            sock.close()

    def _refill(self, lst: Listener) -> None:
        """Grant pool tickets until parked + granted reaches the pool size."""
        session = lst.session
        if session is None or session.closed:
            return
        ttl = self.settings.pool_ticket_ttl
        while len(lst.pool) + lst.grants_out < lst.pool_size:
            lst.grants_out += 1

            def expired(lst: Listener = lst) -> None:
                lst.grants_out = max(0, lst.grants_out - 1)
                self.node.limiter.unexpect(source_of(lst.peer))

            self.node.limiter.expect(source_of(lst.peer))
            session.send(PoolGrant(self.tickets.issue("pool", lst, ttl, on_expire=expired), ttl))

    # -- housekeeping ------------------------------------------------------------------------
    async def _tick(self) -> None:
        interval = self.settings.ping_interval
        while True:
            await asyncio.sleep(interval)
            try:
                self._housekeeping()
            except Exception:  # never let housekeeping die silently
                log.exception("relay.housekeeping_failed")

    def _housekeeping(self) -> None:
        now = time.monotonic()
        self.tickets.sweep()
        self.registry.expire()
        self._seq += 1
        dead_after = 3 * self.settings.ping_interval
        for lst in self.registry.all():
            session = lst.session
            if session is None:
                continue
            if now - session.last_heard > dead_after:
                self.unregister(lst, session, f"no pong for {dead_after:g}s")
                continue
            session.send(Ping(self._seq))
            for sock in [
                s for s in lst.pool if now - self._parked_at.get(s.fileno(), now) > self.settings.pool_max_age
            ]:
                self._parked_died(lst, sock)  # recycle: NAT mappings of old idle flows go stale
            self._refill(lst)


__all__ = ["ListenerError", "Registration", "Relay", "RelaySettings"]
