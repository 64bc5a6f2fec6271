"""The node's one port: accept, tell the planes apart, route data-plane requests, splice.

One :class:`Node` owns the listening socket and every connection's life:
preamble -> route -> dial -> reply -> splice -> counters. gRPC connections (HTTP/2 preface)
are spliced to the in-process control server at ``control_endpoint``; the node itself never
imports gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import secrets
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from ipaddress import ip_address

from homenet.node.address import AddressError, Endpoint, ListenId, parse_hop
from homenet.node.auth import AuthError, Verifier
from homenet.node.dialer import (
    Dialed,
    Dialer,
    DialError,
    connect,
    listen_socket,
    recv_some,
    send_all,
    tune,
    wait_readable,
)
from homenet.node.errors import Code, HomeNetError
from homenet.node.keys import Key, KeyStore
from homenet.node.limits import SourceLimiter, source_of
from homenet.node.log import fields
from homenet.node.policy import TargetPolicy, local_addresses, normalise
from homenet.node.preamble import (
    NEED_DATA,
    Plane,
    ProtocolError,
    Request,
    RequestParser,
    Verb,
    detect_plane,
    encode_reply,
)
from homenet.node.settings import Settings
from homenet.node.splice import CarrierPool, Splice, is_disconnect
from homenet.node.tls import ALPN_GRPC, TLSError, accept_tls, server_context

log = logging.getLogger("homenet.node")

_RECV = 65536
_ACCEPT_BURST = 128
_OK = encode_reply(Code.OK)
#: Hops repeat (a home's LAN targets, listenIds): parse each spelling once.
_parse_hop = functools.lru_cache(maxsize=4096)(parse_hop)
#: Seconds to stop accepting after the process ran out of descriptors (or memory).
_ACCEPT_PAUSE = 0.5
#: A handshake still without its preamble after this long may be dropped for any newcomer.
_DROP_AGE = 1.0
#: Accepted connections that may wait for a handshake slot (what the listen backlog held).
_WAITING_MAX = 4096

#: Resolves a listenId hop to a connected target (Remote Listen plugs in here).
ListenerRoute = Callable[["Handshake", ListenId], Awaitable["Target"]]
#: Serves a request with another verb (TICKET, POOL); True when it took the socket.
VerbHandler = Callable[["Handshake"], Awaitable[bool]]


class RouteError(HomeNetError):
    """A request the node answers with an error reply (``code``, one-line ``reason``)."""

    def __init__(self, code: Code, reason: str) -> None:
        super().__init__(reason, code)


@dataclass(slots=True, eq=False)
class Handshake:
    """What the node knows of a connection before it is spliced (hashed by identity)."""

    sock: socket.socket
    peer: str
    #: Bytes already read from the connection (by whoever handed it to the node).
    buf: bytes = b""
    #: Hops this connection already went through (0 for a client that dialed us).
    depth: int = 0
    request: Request | None = None
    trailing: bytes = b""
    #: Admission unit (IPv4 address or IPv6 /64) when admitted by the source limiter.
    source: str | None = None
    #: ALPN protocol the client chose, when the connection came over TLS.
    alpn: str = ""
    #: The task serving this handshake (cancelled when the node drops it to make room).
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    #: Loop time it was accepted at.
    since: float = 0.0


@dataclass(slots=True)
class Target:
    """A connected target for a session, its name for operators, and a hook run at its end."""

    sock: socket.socket
    dialed: str
    on_close: Callable[[SessionInfo], None] | None = None
    #: Bytes for the target before the client's (a listener's activation line): one send.
    greeting: bytes = b""


@dataclass(slots=True)
class SessionInfo:
    """A spliced data-plane session, as the operator sees it."""

    id: int
    client: str
    target: str
    dialed: str
    since: float
    splice: Splice | None = field(default=None, repr=False)

    @property
    def bytes_up(self) -> int:
        return self.splice.bytes_up if self.splice else 0

    @property
    def bytes_down(self) -> int:
        return self.splice.bytes_down if self.splice else 0


@dataclass(slots=True)
class Counters:
    """Totals of sessions that already ended, plus refusals."""

    sessions: int = 0
    refused: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


def _peer_str(addr: tuple[object, ...] | str) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr) or "local"


class Node:
    """One HomeNet node listening on one TCP port for both planes."""

    def __init__(
        self,
        settings: Settings,
        *,
        control_endpoint: tuple[str, int] | None = None,
        dialer: Dialer | None = None,
        pool: CarrierPool | None = None,
    ) -> None:
        self.settings = settings
        self.control_endpoint = control_endpoint
        self.policy = TargetPolicy.from_specs(settings.allow)
        self.dialer = dialer or Dialer(self.policy, timeout=settings.dial_timeout)
        self.tls = (
            server_context(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
            if settings.tls_cert and settings.tls_key
            else None
        )
        self.keys = KeyStore(settings.keys_path)
        self.verifier = Verifier(self.keys)
        self.limiter = SourceLimiter(
            max_total=settings.max_handshakes,
            max_per_source=settings.max_per_source,
            threshold=settings.penalty_threshold,
            penalty=settings.penalty_seconds,
        )
        self.pool = pool or CarrierPool()
        self.listener_route: ListenerRoute | None = None
        self.listener_count: Callable[[], int] = lambda: 0
        #: Random id of this node process; relays refuse a registration from themselves.
        self.node_id = secrets.token_hex(8)
        self.verbs: dict[Verb, VerbHandler] = {}
        self.counters = Counters()
        self.sessions: dict[int, SessionInfo] = {}
        self.started = time.time()
        self.state = "starting"
        self._ids = itertools.count(1)
        self._lsock: socket.socket | None = None
        self._address: Endpoint | None = None
        self._accept_paused = False
        self._handshakes: set[asyncio.Task[None]] = set()
        #: Admitted handshakes still reading their preamble, by source, oldest first: the
        #: ones the node may drop when the global cap is full (see :meth:`_make_room`).
        self._droppable: dict[str, dict[Handshake, None]] = {}
        #: Accepted connections waiting for a handshake slot: (socket, peer, source, accepted at).
        self._waiting: deque[tuple[socket.socket, str, str, float]] = deque()
        self.dropped = 0
        self._control: set[Splice] = set()
        self._control_peers: dict[int, str] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Bind and start accepting; :attr:`address` is known when this returns."""
        self._loop = asyncio.get_running_loop()
        lsock = await listen_socket(self.settings.bind, self.settings.port, 4096)
        self._lsock = lsock
        host, port = lsock.getsockname()[:2]
        self._address = Endpoint(str(host), int(port))
        if self.dialer.policy is self.policy:  # never dial our own listener, by any of its addresses
            own = normalise(ip_address(host))
            self.policy = self.policy.with_own(own, port)
            if own.is_unspecified:
                for addr in local_addresses():
                    self.policy = self.policy.with_own(addr, port)
            self.dialer.policy = self.policy
        self._loop.add_reader(lsock.fileno(), self._on_accept)
        self.started = time.time()
        self.state = "serving"
        log.info("node.listening", extra=fields(address=self.url, name=self.settings.name))

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
        if self._lsock is not None and self._loop is not None:
            if not self._accept_paused:
                self._loop.remove_reader(self._lsock.fileno())
            self._lsock.close()
            self._lsock = None
        while self._waiting:
            sock, _, source, _ = self._waiting.popleft()
            self.limiter.unqueue(source)
            self._refuse_at_accept(sock, Code.UNAVAILABLE, "node is shutting down; retry on another node")
        self.state = "draining"

    async def drain(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for data-plane sessions to end, then close the rest."""
        try:
            async with asyncio.timeout(grace):
                while self._handshakes:
                    await asyncio.wait(set(self._handshakes))
                await self._idle.wait()
        except TimeoutError:
            log.warning("node.drain_timeout", extra=fields(open_sessions=len(self.sessions)))
        for task in list(self._handshakes):
            task.cancel()
        self.abort_sessions()

    def abort_sessions(self, reason: str = "node shutting down") -> None:
        """Close every data-plane session now."""
        for info in list(self.sessions.values()):
            if info.splice is not None:
                info.splice.abort(reason)

    async def close(self) -> None:
        """Close everything now (control connections included) and free the carriers."""
        if self.state != "draining":
            self.stop_accepting()
        for task in list(self._handshakes):
            task.cancel()
        if self._handshakes:
            await asyncio.wait(set(self._handshakes), timeout=1.0)
        self.abort_sessions("node closed")
        for sp in list(self._control):
            sp.abort("node closed")
        self.pool.close()
        self.state = "stopped"

    # -- accounting --------------------------------------------------------------------------
    @property
    def totals(self) -> Counters:
        """Counters including the sessions still open."""
        live = list(self.sessions.values())
        return Counters(
            sessions=self.counters.sessions + len(live),
            refused=self.counters.refused,
            bytes_up=self.counters.bytes_up + sum(s.bytes_up for s in live),
            bytes_down=self.counters.bytes_down + sum(s.bytes_down for s in live),
        )

    def control_peer(self, local_port: int) -> str | None:
        """The real client of a gRPC connection, by the port it reaches the control server from."""
        return self._control_peers.get(local_port)

    # -- accept ------------------------------------------------------------------------------
    def _on_accept(self) -> None:
        assert self._lsock is not None
        assert self._loop is not None
        for _ in range(_ACCEPT_BURST):
            try:
                sock, addr = self._lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: pause instead of spinning on a readable socket
                log.warning("node.accept_paused", extra=fields(error=str(exc), seconds=_ACCEPT_PAUSE))
                self._pause_accepting(_ACCEPT_PAUSE)
                return
            source = source_of(str(addr[0]))
            why = self.limiter.refusal(source)
            if why is None and self.limiter.full and not self._make_room(source):
                if len(self._waiting) < _WAITING_MAX:
                    tune(sock)
                    self.limiter.queue(source)
                    self._waiting.append((sock, _peer_str(addr), source, self._loop.time()))
                    continue
                why = "too many connections in handshake"
            if why is None:
                why = self.limiter.admit(source)
            if why is not None:
                self._refuse_at_accept(sock, Code.TOO_MANY, why)
                continue
            tune(sock)
            self.serve_accepted(sock, _peer_str(addr), source=source)

    def _refuse_at_accept(self, sock: socket.socket, code: Code, why: str) -> None:
        self.counters.refused += 1
        with contextlib.suppress(OSError):
            sock.send(encode_reply(code, why))
        sock.close()

    def _slot_freed(self) -> None:
        """A handshake slot is free: give it to the longest-waiting connection still in time."""
        assert self._loop is not None
        while self._waiting and not self.limiter.full:
            sock, peer, source, since = self._waiting.popleft()
            self.limiter.unqueue(source)
            if self._loop.time() - since >= self.settings.handshake_timeout:
                self._refuse_at_accept(sock, Code.TIMEOUT, "waited too long for a handshake slot")
                continue
            why = self.limiter.admit(source)
            if why is not None:
                self._refuse_at_accept(sock, Code.TOO_MANY, why)
                continue
            self.serve_accepted(sock, peer, source=source, since=since)

    def _make_room(self, newcomer: str) -> bool:
        """The handshake cap is full: drop one handshake still in its preamble, so a client
        is not stalled behind slow sockets (OpenSSH MaxStartups-style early drop).

        The victim is the oldest handshake of the source that holds the most of them, if
        that source holds at least two more than the newcomer's (a flood from many sources
        pays for itself; a client with one connection gets in at once). Otherwise, among
        handshakes older than ``_DROP_AGE`` (a burst of real clients sends its preambles
        within that), the oldest of the busiest source. False when there is no such victim:
        the newcomer then waits for a slot (see :meth:`_slot_freed`).
        """
        assert self._loop is not None
        if not self._droppable:
            return False
        src = max(self._droppable, key=lambda s: len(self._droppable[s]))
        if len(self._droppable[src]) <= len(self._droppable.get(newcomer, ())) + 1:
            old_enough = self._loop.time() - _DROP_AGE
            stale = [s for s, b in self._droppable.items() if next(iter(b)).since <= old_enough]
            if not stale:
                return False
            src = max(stale, key=lambda s: len(self._droppable[s]))
        victim = next(iter(self._droppable[src]))
        self._settle(victim)
        assert victim.source is not None
        self.limiter.release(victim.source)
        victim.source = None
        self.dropped += 1
        self.counters.refused += 1
        if self.tls is None:  # a plaintext client learns why (best effort, never waits)
            with contextlib.suppress(OSError):
                victim.sock.send(encode_reply(Code.TOO_MANY, "dropped to make room: node at its handshake cap"))
        if victim.task is not None:
            victim.task.cancel()  # its finally closes the socket
        return True

    def _settle(self, hs: Handshake) -> None:
        """``hs`` is past its preamble (or gone): it may no longer be dropped to make room."""
        if hs.source is None:
            return
        bucket = self._droppable.get(hs.source)
        if bucket is not None:
            bucket.pop(hs, None)
            if not bucket:
                del self._droppable[hs.source]

    def _pause_accepting(self, seconds: float) -> None:
        """Stop watching the listening socket for ``seconds`` (out of descriptors)."""
        if self._lsock is None or self._loop is None or self._accept_paused:
            return
        self._accept_paused = True
        self._loop.remove_reader(self._lsock.fileno())
        self._loop.call_later(seconds, self._resume_accepting)

    def _resume_accepting(self) -> None:
        if self._accept_paused and self._lsock is not None and self._loop is not None:
            self._accept_paused = False
            self._loop.add_reader(self._lsock.fileno(), self._on_accept)

    def serve_accepted(
        self,
        sock: socket.socket,
        peer: str,
        buf: bytes = b"",
        depth: int = 0,
        source: str | None = None,
        since: float | None = None,
    ) -> None:
        """Handle a connection as if accepted on the port (dial-back and pool connections come here).

        ``source`` is set when the connection was admitted by the source limiter (released at
        the end of the handshake); ``since`` is when it was accepted (default: now).
        """
        assert self._loop is not None
        hs = Handshake(sock, peer, buf, depth, source=source, since=self._loop.time() if since is None else since)
        hs.task = task = self._loop.create_task(self._handshake(hs))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)
        if source is not None:
            self._droppable.setdefault(source, {})[hs] = None

    async def _handshake(self, hs: Handshake) -> None:
        spliced = False
        try:
            async with asyncio.timeout_at(hs.since + self.settings.handshake_timeout):  # time waited counts
                if self.tls is not None and hs.source is not None:
                    await self._start_tls(hs)
                buf = hs.buf
                while (plane := detect_plane(buf)) is None:
                    chunk = await recv_some(hs.sock, _RECV)
                    if not chunk:
                        return
                    buf += chunk
                if hs.alpn and (plane is Plane.GRPC) != (hs.alpn == ALPN_GRPC):
                    raise ProtocolError(Code.BAD_REQUEST, f"ALPN {hs.alpn} does not match what was sent")
                if plane is Plane.GRPC:
                    spliced = await self._to_control(hs, buf)
                    return
                if plane is Plane.UNKNOWN:
                    raise ProtocolError(Code.BAD_REQUEST, "not a HomeNet client (expected HN/1 or gRPC)")
                parser = RequestParser()
                parser.receive_data(buf)
                while (event := parser.next_event()) is NEED_DATA:
                    parser.receive_data(await recv_some(hs.sock, _RECV))
                assert isinstance(event, Request)
                hs.request, hs.trailing = event, parser.trailing()
                self._settle(hs)
            spliced = await self._route(hs)
        except ProtocolError as exc:
            self._refuse(hs, exc.code, exc.reason)
        except RouteError as exc:
            self._refuse(hs, exc.code, exc.reason)
        except TimeoutError:
            self._refuse(hs, Code.TIMEOUT, f"no complete preamble within {self.settings.handshake_timeout:g}s")
        except TLSError as exc:
            self.counters.refused += 1
            log.info("session.refused", extra=fields(peer=hs.peer, reason=str(exc)))
        except OSError as exc:
            log.debug("handshake.io_error", extra=fields(peer=hs.peer, error=str(exc)))
        except Exception:  # a bug must cost one connection, never the node
            log.exception("handshake.bug", extra=fields(peer=hs.peer))
        finally:
            if hs.source is not None:
                self._settle(hs)
                self.limiter.release(hs.source)
                self._slot_freed()
            if not spliced:
                hs.sock.close()

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

    def _refuse(self, hs: Handshake, code: Code, reason: str) -> None:
        self.counters.refused += 1
        log.info("session.refused", extra=fields(peer=hs.peer, code=int(code), reason=reason))
        with contextlib.suppress(OSError):
            hs.sock.send(encode_reply(code, reason))  # one line, best effort: never wait on it
            # unread input makes close() send a reset, which can destroy the line in flight
            hs.sock.shutdown(socket.SHUT_WR)
            hs.sock.recv(65536)

    # -- routing -----------------------------------------------------------------------------
    async def _route(self, hs: Handshake) -> bool:
        """Serve one request; True when the socket now belongs to a splice."""
        req = hs.request
        assert req is not None
        if self.state != "serving":
            raise RouteError(Code.UNAVAILABLE, "node is shutting down; retry on another node")
        if req.verb is not Verb.CONNECT:
            handler = self.verbs.get(req.verb)
            if handler is None:
                raise RouteError(Code.BAD_REQUEST, f"{req.verb.value} is not accepted here")
            return await handler(hs)
        if len(self.sessions) >= self.settings.max_sessions:
            raise RouteError(Code.TOO_MANY, f"node at its limit of {self.settings.max_sessions} sessions")
        try:
            hop = _parse_hop(req.arg)
        except AddressError as exc:
            raise RouteError(Code.BAD_REQUEST, str(exc)) from None
        if isinstance(hop, ListenId):
            if self.listener_route is None:
                raise RouteError(Code.NOT_FOUND, f"no listener {hop} on this node")
            target = await self.listener_route(hs, hop)
        else:
            if self.settings.connect_auth != "none":
                self.authorize(hs, "connect")
            try:
                d: Dialed = await self.dialer.dial(hop)
            except DialError as exc:
                raise RouteError(exc.code, exc.reason) from None
            target = Target(d.sock, str(d))
        return await self.splice_session(hs, target, req.arg)

    def release_admission(self, hs: Handshake) -> None:
        """A connection proved it is a listener's own (a good ticket): it no longer counts
        against its source's handshake cap (a burst of dial-backs is not an attack)."""
        if hs.source is not None:
            self._settle(hs)
            self.limiter.release(hs.source)
            hs.source = None
            self._slot_freed()

    def authorize(self, hs: Handshake, role: str) -> Key:
        """The key that signed this request, if it holds ``role``; else an error reply.

        A failed login counts against the client's source (see :class:`SourceLimiter`).
        """
        req = hs.request
        assert req is not None
        try:
            return self.verifier.verify(f"HN/1 {req.verb.value} {req.arg}", req.fields, role)
        except AuthError as exc:
            if not exc.forbidden:
                src = hs.source or source_of(hs.peer)
                if self.limiter.failed(src):
                    log.warning("auth.source_blocked", extra=fields(source=src))
            raise RouteError(Code.FORBIDDEN if exc.forbidden else Code.UNAUTHORIZED, exc.reason) from None

    async def splice_session(self, hs: Handshake, target: Target, name: str) -> bool:
        """Reply OK, hand over the client's pipelined bytes, and splice client <-> target."""
        info = SessionInfo(next(self._ids), hs.peer, name, target.dialed, time.time())
        try:
            await send_all(hs.sock, _OK)
            if target.greeting or hs.trailing:
                await send_all(target.sock, target.greeting + hs.trailing)
        except BaseException:
            target.sock.close()
            if target.on_close is not None:
                target.on_close(info)
            raise

        def closed(_: Splice, exc: BaseException | None) -> None:
            self._session_closed(info, exc)
            if target.on_close is not None:
                target.on_close(info)

        sp = Splice(hs.sock, target.sock, self.pool, idle_timeout=self.settings.idle_timeout or None, on_close=closed)
        sp.up.bytes = len(hs.trailing)  # pipelined payload already delivered above
        info.splice = sp
        self.sessions[info.id] = info
        self._idle.clear()
        sp.start()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("session.open", extra=fields(id=info.id, client=hs.peer, target=name, dialed=target.dialed))
        return True

    def _session_closed(self, info: SessionInfo, exc: BaseException | None) -> None:
        self.sessions.pop(info.id, None)
        c = self.counters
        c.sessions += 1
        c.bytes_up += info.bytes_up
        c.bytes_down += info.bytes_down
        if not self.sessions:
            self._idle.set()
        level = logging.DEBUG if exc is None or is_disconnect(exc) else logging.INFO
        if not log.isEnabledFor(level):
            return
        log.log(
            level,
            "session.close",
            extra=fields(
                id=info.id,
                target=info.target,
                up=info.bytes_up,
                down=info.bytes_down,
                seconds=round(time.time() - info.since, 3),
                error=str(exc) if exc else None,
            ),
        )

    # -- control plane -----------------------------------------------------------------------
    async def _to_control(self, hs: Handshake, first: bytes) -> bool:
        if self.control_endpoint is None:
            raise ProtocolError(Code.NOT_FOUND, "this node serves no control plane")
        host, port = self.control_endpoint
        target = await connect(ip_address(host), port, self.settings.dial_timeout)
        local_port = int(target.getsockname()[1])
        self._control_peers[local_port] = hs.peer
        try:
            await asyncio.get_running_loop().sock_sendall(target, first)
        except OSError:
            target.close()
            self._control_peers.pop(local_port, None)
            raise

        def closed(sp: Splice, exc: BaseException | None) -> None:
            self._control.discard(sp)
            self._control_peers.pop(local_port, None)

        sp = Splice(hs.sock, target, self.pool, on_close=closed)
        self._control.add(sp)
        sp.start()
        return True
