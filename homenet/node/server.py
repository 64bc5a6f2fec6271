"""The node's one port: accept, tell the planes apart, serve each connection.

A :class:`Node` is composed of an :class:`Acceptor` (the listening socket and admission), a
plane table (the first bytes of a connection pick its handler: the data plane, or gRPC spliced
to the in-process control server), a :class:`Router` (a request's hop -> a target) and a
:class:`SessionTable` (live sessions and counters). It never imports gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from ipaddress import ip_address

import h11

from homenet.node.acceptor import Acceptor
from homenet.node.address import MAX_HOPS, AddressError, Endpoint, parse_hop
from homenet.node.connection import Handshake
from homenet.node.dialer import connect, recv_some, wait_readable
from homenet.node.errors import Code, HomeNetError, RouteError
from homenet.node.fleet import FWD
from homenet.node.gateway import HttpPlane
from homenet.node.handoff import HandedOff
from homenet.node.httproute import raw_refusal
from homenet.node.limits import Descriptors, SourceLimiter, client_source, source_of
from homenet.node.log import fields
from homenet.node.policy import normalise
from homenet.node.preamble import (
    MAGIC,
    NEED_DATA,
    Plane,
    ProtocolError,
    Request,
    RequestParser,
    Verb,
    detect_plane,
    encode_reply,
    request_depth,
    stamp_depth,
)
from homenet.node.router import Router
from homenet.node.sessions import SessionInfo, SessionTable, Target
from homenet.node.settings import Settings
from homenet.node.splice import CarrierPool, Splices
from homenet.node.stats import Histogram, bump
from homenet.node.tls import ALPN_GRPC, TLSError, accept_tls, server_context
from homenet.node.wstunnel import serve_tunnel

log = logging.getLogger("homenet.node")

_RECV = 65536
#: Hops repeat (a home's LAN targets, listenIds): parse each spelling once.
_parse_hop = functools.lru_cache(maxsize=4096)(parse_hop)

#: Serves a request with another verb than CONNECT (TICKET, POOL); True when it took the socket.
VerbHandler = Callable[[Handshake], Awaitable[bool]]
#: Reads what a plane needs before it is served (the data plane's request), within the
#: handshake deadline; None: nothing (the gRPC plane).
PlanePreamble = Callable[[Handshake, bytes], Awaitable[None]] | None
#: Serves a connection once its first bytes named its plane; True when it took the socket.
PlaneHandler = Callable[[Handshake, bytes], Awaitable[bool]]


class GrpcPlane:
    """gRPC connections of the one port, spliced to the in-process control server.

    The control server listens on a private loopback port; the plane remembers which real
    client each spliced connection carries, for auth penalties and operator views.
    """

    def __init__(
        self, pool: CarrierPool, dial_timeout: float, max_per_source: int = 32, descriptors: Descriptors | None = None
    ) -> None:
        self.dial_timeout = dial_timeout
        #: gRPC connections one source may hold at once, for their whole life (an HTTP/2
        #: connection that sent its preface and then idles must still count).
        self.max_per_source = max_per_source
        self.descriptors = descriptors or Descriptors()
        #: Where the control server listens (set once it started).
        self.endpoint: tuple[str, int] | None = None
        self._peers: dict[int, str] = {}
        #: Local ports of connections that came on a worker's private port (siblings only).
        self._private: set[int] = set()
        self._per_source: dict[str, int] = {}
        self._splices = Splices(pool)

    @property
    def open_count(self) -> int:
        """gRPC connections open now."""
        return len(self._peers)

    def is_private(self, local_port: int) -> bool:
        """The connection came on a worker's private port: only its siblings may call there."""
        return local_port in self._private

    def peer_of(self, local_port: int) -> str | None:
        """The real client of a gRPC connection, by the port it reaches the control server from."""
        return self._peers.get(local_port)

    async def serve(self, hs: Handshake, first: bytes, private: bool = False) -> bool:
        if self.endpoint is None:
            raise ProtocolError(Code.NOT_FOUND, "this node serves no control plane")
        source = source_of(hs.peer)
        if self._per_source.get(source, 0) >= self.max_per_source:
            raise RouteError(Code.TOO_MANY, f"more than {self.max_per_source} gRPC connections from one source")
        if self.descriptors.grpc_full(hs.sock.fileno()):
            raise RouteError(Code.TOO_MANY, "node near its descriptor limit; retry later")
        host, port = self.endpoint
        target = await connect(ip_address(host), port, self.dial_timeout)
        local_port = int(target.getsockname()[1])
        self._peers[local_port] = hs.peer
        if private:
            self._private.add(local_port)
        self._per_source[source] = self._per_source.get(source, 0) + 1
        try:
            await self._splices.start(
                hs.sock, target, to_b=first, on_close=lambda sp, exc: self._forget(local_port, source)
            )
        except OSError:
            self._forget(local_port, source)
            raise
        return True

    def _forget(self, local_port: int, source: str) -> None:
        self._peers.pop(local_port, None)
        self._private.discard(local_port)
        n = self._per_source.get(source, 0) - 1
        if n > 0:
            self._per_source[source] = n
        else:
            self._per_source.pop(source, None)

    def close(self) -> None:
        self._splices.abort_all("node closed")


class Node:
    """One HomeNet node listening on one TCP port for both planes."""

    def __init__(
        self,
        settings: Settings,
        limiter: SourceLimiter,
        router: Router,
        *,
        verbs: Mapping[Verb, VerbHandler] | None = None,
        grpc: GrpcPlane | None = None,
        pool: CarrierPool | None = None,
    ) -> None:
        self.settings = settings
        self.router = router
        self.verbs: Mapping[Verb, VerbHandler] = verbs or {}
        self.pool = pool or CarrierPool()
        self.descriptors = Descriptors()
        self.grpc = grpc or GrpcPlane(self.pool, settings.dial_timeout, settings.max_grpc_per_source, self.descriptors)
        self.tls = (
            server_context(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
            if settings.tls_cert and settings.tls_key
            else None
        )
        self.sessions = SessionTable(self.pool, settings.idle_timeout or None)
        self.acceptor = Acceptor(
            limiter, settings.handshake_timeout, self._serve_admitted, self._refused_at_accept, self.tls is None,
            self.descriptors,
        )  # fmt: skip
        self.http = HttpPlane(self._route_first, settings.http_domain, settings.dial_timeout, self._tunnel)
        self.planes: dict[Plane, tuple[PlanePreamble, PlaneHandler]] = {
            Plane.DATA: (self._read_request, self._serve_request),
            Plane.GRPC: (None, self._serve_grpc),
        }
        if settings.http_gateway:
            self.planes[Plane.HTTP] = (self.http.preamble, self._serve_http)
        self.started = time.time()
        self.state = "starting"
        self._address: Endpoint | None = None
        #: A worker's private loopback port (None for a single-process node).
        self.private_address: Endpoint | None = None
        self._handshakes: set[asyncio.Task[None]] = set()
        #: Handshakes that came on a plaintext private port (a worker's, for its siblings).
        self._plain: set[Handshake] = set()
        #: Connections that ended their handshake, by (plane, outcome): the plane is data,
        #: listener (a listener's dial-back or pool connection), grpc or unknown; the outcome a
        #: reply code ("200": served), "tls" (TLS failed), "closed" (gone before its first
        #: bytes), "io".
        self.outcomes: dict[tuple[str, str], int] = {}
        #: Accept -> plane known and its preamble read; accept -> a CONNECT spliced to its target.
        self.handshake_seconds = Histogram()
        self.setup_seconds = Histogram()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self, public: socket.socket | None = None, private: socket.socket | None = None) -> None:
        """Bind (or take ``public``, a listening socket made by a supervisor) and start
        accepting; :attr:`address` is known when this returns. ``private``: a worker's own
        plaintext loopback port, for its siblings (fleet watches, forwarded hops)."""
        if public is not None:
            self._address = self.acceptor.adopt(public)
        else:
            self._address = await self.acceptor.listen(self.settings.bind, self.settings.port)
        self.add_own(self._address)
        if private is not None:
            self.private_address = self.acceptor.adopt(private, plain=True)
            self.add_own(self.private_address)
        self.started = time.time()
        self.state = "serving"
        self._loop = asyncio.get_running_loop()
        log.info("node.listening", extra=fields(address=self.url, name=self.settings.name))

    def add_own(self, ep: Endpoint) -> None:
        """Never dial our own listener, by any of its addresses."""
        own = normalise(ip_address(ep.host))
        dialer = self.router.dialer
        dialer.policy = dialer.policy.with_own(own, ep.port)  # a wildcard: any address the host has at dial time

    @property
    def address(self) -> Endpoint:
        """Where the node listens (known once :meth:`start` returned)."""
        assert self._address is not None, "node not started"
        return self._address

    @property
    def url(self) -> str:
        return f"hn://{self.address}"

    def stop_accepting(self) -> None:
        """Close the listening socket; handshakes in progress still finish."""
        self.acceptor.close()
        self.state = "draining"
        self.http.drain()

    async def drain(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for data-plane sessions to end, then close the rest."""
        try:
            async with asyncio.timeout(grace):
                while self._handshakes:
                    await asyncio.wait(set(self._handshakes))
                await self.sessions.wait_idle()
        except TimeoutError:
            log.warning("node.drain_timeout", extra=fields(open_sessions=len(self.sessions)))
        for task in list(self._handshakes):
            task.cancel()
        self.abort_sessions()

    def abort_sessions(self, reason: str = "node shutting down") -> None:
        """Close every data-plane session now."""
        self.sessions.abort_all(reason)

    async def close(self) -> None:
        """Close everything now (control connections included) and free the carriers."""
        if self.state != "draining":
            self.stop_accepting()
        for task in list(self._handshakes):
            task.cancel()
        if self._handshakes:
            await asyncio.wait(set(self._handshakes), timeout=1.0)
        self.abort_sessions("node closed")
        self.http.close()
        self.grpc.close()
        self.pool.close()
        self.state = "stopped"

    # -- connections ---------------------------------------------------------------------------
    def serve_accepted(self, sock: socket.socket, peer: str, buf: bytes = b"", depth: int = 0) -> None:
        """Serve a connection as if accepted on the port, outside admission (a listener's
        activated dial-back and pool connections come here, ``buf`` already read)."""
        self._start(Handshake(sock, peer, buf, depth, since=asyncio.get_running_loop().time()))

    def _refused_at_accept(self, code: Code) -> None:
        """The acceptor refused a connection (caps, a blocked source) or dropped one to make room."""
        self.sessions.refused()
        bump(self.outcomes, ("unknown", str(int(code))))

    def _serve_admitted(self, sock: socket.socket, peer: str, source: str, since: float, plain: bool) -> Handshake:
        hs = Handshake(sock, peer, source=source, since=since)
        if plain:
            self._plain.add(hs)
        return self._start(hs)

    def _start(self, hs: Handshake) -> Handshake:
        hs.task = task = asyncio.get_running_loop().create_task(self._handshake(hs))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)
        return hs

    async def _handshake(self, hs: Handshake) -> None:
        spliced = False
        plane: Plane | None = None
        outcome = "closed"
        try:
            async with asyncio.timeout_at(self._deadline(hs)):
                if self.tls is not None and hs.source is not None and hs not in self._plain:
                    await self._start_tls(hs)
                    hs.tls = True
                buf = hs.buf
                while (plane := detect_plane(buf)) is None:
                    chunk = await recv_some(hs.sock, _RECV)
                    if not chunk:
                        return
                    buf += chunk
                if hs.alpn and (plane is Plane.GRPC) != (hs.alpn == ALPN_GRPC):
                    raise ProtocolError(Code.BAD_REQUEST, f"ALPN {hs.alpn} does not match what was sent")
                found = self.planes.get(plane)
                if found is None:
                    raise ProtocolError(Code.BAD_REQUEST, "not a HomeNet client (expected HN/1 or gRPC)")
                preamble, serve = found
                if preamble is not None:
                    await preamble(hs, buf)
            self.handshake_seconds.observe(self._now() - hs.since)
            spliced = await serve(hs, buf)
            outcome = "200"
        except TLSError as exc:
            outcome = "tls"
            self.sessions.refused()
            log.info("session.refused", extra=fields(peer=hs.peer, reason=str(exc)))
        except HomeNetError as exc:
            outcome = str(int(exc.code))
            self._refuse(hs, exc.code, exc.reason, plane, getattr(exc, "http_status", None))
        except TimeoutError:
            outcome = str(int(Code.TIMEOUT))
            self._refuse(hs, Code.TIMEOUT, f"no complete preamble within {self.settings.handshake_timeout:g}s", plane)
        except OSError as exc:
            outcome = "io"
            log.debug("handshake.io_error", extra=fields(peer=hs.peer, error=str(exc)))
        except Exception:  # a bug must cost one connection, never the node
            outcome = str(int(Code.INTERNAL))
            log.exception("handshake.bug", extra=fields(peer=hs.peer))
        except asyncio.CancelledError:  # dropped to make room (counted then) or the node closing
            outcome = ""
            raise
        finally:
            if outcome:
                bump(self.outcomes, (_plane_label(plane, hs), outcome))
            if plane is Plane.HTTP:
                self.http.forget(hs)
            self.acceptor.release(hs)
            self._plain.discard(hs)
            if not spliced:
                hs.sock.close()

    def _deadline(self, hs: Handshake) -> float:
        """When ``hs`` must have sent its preamble (time waiting for a slot counts)."""
        return hs.since + self.settings.handshake_timeout

    async def _start_tls(self, hs: Handshake) -> None:
        """Terminate TLS (a plaintext client gets one clear line); hs.sock becomes the plain side."""
        assert self.tls is not None
        await wait_readable(hs.sock)
        first = hs.sock.recv(1, socket.MSG_PEEK)
        if first != b"\x16":  # not a TLS handshake record
            if not first:
                raise ConnectionResetError("closed before TLS")
            with contextlib.suppress(OSError):  # read what it sent, or closing would reset the line away
                hs.sock.recv(65536)
            raise ProtocolError(Code.BAD_REQUEST, "this node speaks TLS only: use hns:// (or a TLS client)")
        raw = hs.sock
        hs.sock, hs.alpn = await accept_tls(raw, self.tls, self.settings.handshake_timeout)

    def _refuse(
        self, hs: Handshake, code: Code, reason: str, plane: Plane | None = None, status: int | None = None
    ) -> None:
        self.sessions.refused()
        log.info("session.refused", extra=fields(peer=hs.peer, code=int(code), reason=reason))
        line = raw_refusal(code, reason, status) if plane is Plane.HTTP else encode_reply(code, reason)
        with contextlib.suppress(OSError):
            hs.sock.send(line)  # one line, best effort: never wait on it
            # unread input makes close() send a reset, which can destroy the line in flight
            hs.sock.shutdown(socket.SHUT_WR)
            hs.sock.recv(65536)

    # -- the data plane --------------------------------------------------------------------------
    async def _read_request(self, hs: Handshake, buf: bytes) -> None:
        """The data plane's request line (the caller holds the handshake deadline)."""
        parser = RequestParser()
        parser.receive_data(buf)
        while (event := parser.next_event()) is NEED_DATA:
            parser.receive_data(await recv_some(hs.sock, _RECV))
        assert isinstance(event, Request)
        hs.request, hs.trailing = event, parser.trailing()
        hs.depth = max(hs.depth, request_depth(event))
        self.acceptor.settle(hs)
        if hs.depth > MAX_HOPS:
            raise RouteError(Code.HOP_LIMIT, f"route longer than {MAX_HOPS} hops")

    async def _serve_request(self, hs: Handshake, buf: bytes) -> bool:
        """Serve the data-plane request read by :meth:`_read_request`."""
        event = hs.request
        assert event is not None
        if self.state != "serving":
            raise RouteError(Code.UNAVAILABLE, "node is shutting down; retry on another node")
        self._sibling_only(hs)
        if event.verb is not Verb.CONNECT:
            handler = self.verbs.get(event.verb)
            if handler is None:
                raise RouteError(Code.BAD_REQUEST, f"{event.verb.value} is not accepted here")
            took = await handler(hs)
            self.acceptor.release(hs)  # a listener's own connection: it no longer counts as a handshake
            return took
        self._check_room(hs)
        try:
            hop = _parse_hop(event.arg)
        except AddressError as exc:
            raise RouteError(Code.BAD_REQUEST, str(exc)) from None
        try:
            target: Target = await self.router.route(hs, hop)
        except HandedOff:  # a sibling worker serves it
            return True
        try:
            # nearly always decided on what is in hand: no deadline, no coroutine
            early, sent = self._stamp_now(hs.trailing, hs.depth) or await self._stamped(hs)
        except BaseException:  # a listener's session ends with it
            target.abandon(SessionInfo(0, hs.peer, event.arg, target.dialed, time.time()))
            raise
        await self.sessions.splice(hs.sock, hs.peer, early, target, event.arg, sent, hs.source)
        self.setup_seconds.observe(self._now() - hs.since)
        return True

    async def _serve_grpc(self, hs: Handshake, buf: bytes) -> bool:
        return await self.grpc.serve(hs, buf, private=hs in self._plain)

    def _sibling_only(self, hs: Handshake) -> None:
        """A worker's private port takes its siblings' forwarded hops only: a local process
        must not use it to skip what the public port asks (TLS, client certificates)."""
        if hs in self._plain and not (hs.request is not None and FWD in hs.request.fields):
            raise RouteError(Code.FORBIDDEN, "this is a worker's private port: connect to the node's port")

    # -- the HTTP gateway ------------------------------------------------------------------------
    async def _serve_http(self, hs: Handshake, buf: bytes) -> bool:
        """An HTTP client: it holds no handshake slot once its first head is read (keep-alive
        connections may last), but counts against the session cap."""
        if self.state != "serving":
            raise RouteError(Code.UNAVAILABLE, "node is shutting down; retry on another node")
        self._sibling_only(hs)
        self._check_room(hs)
        self.acceptor.release(hs)
        return await self.http.serve(hs, buf)

    def _check_room(self, hs: Handshake) -> None:
        """A new session fits: under the node's cap, its source's cap, and the descriptor
        headroom (kept for the control plane)."""
        s = self.settings
        if len(self.sessions) + self.http.open_count >= s.max_sessions:
            raise RouteError(Code.TOO_MANY, f"node at its limit of {s.max_sessions} sessions")
        if self.sessions.count_for(hs.source or client_source(hs.peer)) >= s.max_sessions_per_source:
            raise RouteError(Code.TOO_MANY, f"more than {s.max_sessions_per_source} sessions from one source")
        if self.descriptors.data_full(hs.sock.fileno()):
            raise RouteError(Code.TOO_MANY, "node near its descriptor limit; retry later")

    async def _tunnel(self, sock: socket.socket, peer: str, request: h11.Request, leftover: bytes) -> None:
        """The WebSocket transport: what the tunnel carries is served as a connection accepted
        on the port (data plane or gRPC), with the client's own address."""
        await serve_tunnel(
            sock, peer, request, leftover, self._serve_inner, idle_timeout=self.settings.idle_timeout or None
        )

    def _serve_inner(self, sock: socket.socket, peer: str) -> None:
        self.serve_accepted(sock, peer)

    async def _route_first(self, hs: Handshake, request: Request) -> Target:
        """The first hop of a gateway route, through the router as a CONNECT would go."""
        try:
            hop = _parse_hop(request.arg)
        except AddressError as exc:
            raise RouteError(Code.BAD_REQUEST, str(exc)) from None
        sub = Handshake(hs.sock, hs.peer, depth=hs.depth, request=request, tls=hs.tls, gateway=True)
        return await self.router.route(sub, hop)

    @staticmethod
    def _stamp_now(early: bytes, depth: int) -> tuple[bytes, int] | None:
        """:meth:`_stamped` on the bytes in hand; None when more must be read first."""
        if early.startswith(MAGIC):
            stamped = stamp_depth(early, depth + 1)
            return None if stamped is None else (stamped, len(early))
        if not early or not MAGIC.startswith(early):
            return early, len(early)  # a payload, not a request line
        return None

    async def _stamped(self, hs: Handshake) -> tuple[bytes, int]:
        """The client's pipelined bytes, the next request line stamped with the hop count.
        A line that came cut (even after its first byte) is read to its end first, within the
        handshake deadline: a client must not dodge the count by splitting its lines. Returns
        the bytes to send on and how many of them the client sent."""
        early = hs.trailing
        async with asyncio.timeout(self.settings.handshake_timeout):
            while (done := self._stamp_now(early, hs.depth)) is None:
                chunk = await recv_some(hs.sock, _RECV)
                if not chunk:
                    return early, len(early)
                early += chunk
        return done

    def _now(self) -> float:
        loop = self._loop
        return loop.time() if loop is not None else asyncio.get_running_loop().time()


def _plane_label(plane: Plane | None, hs: Handshake) -> str:
    """The plane a connection is counted in: a listener's own connections (TICKET, POOL)
    apart from the clients' CONNECTs."""
    if plane is None:
        return "unknown"
    if plane is Plane.DATA and hs.request is not None and hs.request.verb is not Verb.CONNECT:
        return "listener"
    return plane.value
