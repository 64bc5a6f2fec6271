"""The HTTP gateway plane: browsers and HTTP-only programs reach a home's web servers.

A connection whose first bytes are an HTTP/1.x request line comes here (the data plane's
``HN/1`` and gRPC's preface go elsewhere). Each request names a route
(:mod:`homenet.node.httproute`); the gateway opens it the way a client opens a route (the
first hop through this node's router, so the node's policy and auth apply exactly as on the
data plane; the further hops as pipelined, signed requests) and proxies the request and its
response with h11 on both sides: keep-alive (the route's connection is reused while the
route stays the same), chunked bodies streamed with backpressure, ``Upgrade`` (WebSocket)
passed through to the target and spliced, ``X-Forwarded-For/Proto/Host``. A refusal is one
HTML page (or one text line for programs) with the HomeNet code.

``GET /.hn/tunnel`` with ``Upgrade: websocket`` is not forwarded: it is the WebSocket
transport of the data plane, handed to :data:`TunnelHandler`.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import ipaddress
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import parse_qs, quote

import h11

from homenet.node.auth import Credentials
from homenet.node.connection import Handshake
from homenet.node.dialer import send_now, send_rest
from homenet.node.errors import Code, HomeNetError
from homenet.node.httproute import (
    LOGIN_PATH,
    LOGOUT_PATH,
    OWN_PREFIX,
    Named,
    RouteRefused,
    backward_headers,
    header,
    http_status,
    key_of,
    name_route,
    onward_headers,
    refusal_page,
    wants_html,
    wants_upgrade,
)
from homenet.node.keys import Secret
from homenet.node.log import fields
from homenet.node.preamble import NEED_DATA, ProtocolError, Reply, ReplyParser, Request, Verb
from homenet.node.sessions import SessionInfo, Target
from homenet.node.splice import Splice, Splices
from homenet.node.stats import bump

log = logging.getLogger("homenet.gateway")

#: Bytes of one request or response head at most.
MAX_HEAD = 32 * 1024
#: Seconds an idle keep-alive connection waits for its next request.
IDLE_TIMEOUT = 60.0
#: Seconds a body may stall, and a target may take to start its response.
STALL_TIMEOUT = 120.0
_CHUNK = 64 * 1024
#: Bytes of a login form at most.
_MAX_FORM = 4096
TUNNEL_PATH = b"/.hn/tunnel"
_IN_CLEAR = "a HomeNet key must not cross the network in clear: use https://"

#: Opens the first hop of a route for a request (the node's router), as a Handshake would.
RouteFirst = Callable[[Handshake, Request], Awaitable[Target]]
#: Serves a WebSocket tunnel request: (the client's socket, its address, the request, bytes
#: read after its head); the socket is the handler's from then on.
TunnelHandler = Callable[[socket.socket, str, h11.Request, bytes], Awaitable[None]]


@dataclass
class Upstream:
    """The connection a route is open on, its HTTP state, and what it moved."""

    route: str
    key_id: str
    sock: socket.socket
    conn: h11.Connection
    target: Target
    info: SessionInfo

    def close(self) -> None:
        """Close it and tell its owner (a listener's session ends: its count goes back)."""
        self.target.abandon(self.info)


class HttpPlane:
    """The gateway's state for one node: open connections, counters, settings."""

    def __init__(
        self,
        route_first: RouteFirst,
        domain: str | None,
        dial_timeout: float,
        tunnel: TunnelHandler | None = None,
    ) -> None:
        self.route_first = route_first
        self.domain = domain.lower().strip(".") if domain else None
        self.dial_timeout = dial_timeout
        self.tunnel = tunnel
        #: Responses sent, by HTTP status (for metrics).
        self.responses: dict[str, int] = {}
        self.splices = Splices()
        self._pending: dict[Handshake, tuple[h11.Connection, h11.Request]] = {}
        self._sessions: set[GatewaySession] = set()
        self.draining = False

    @property
    def open_count(self) -> int:
        """Gateway connections open, upgraded ones (spliced WebSockets) included."""
        return len(self._sessions) + len(self.splices)

    async def preamble(self, hs: Handshake, buf: bytes) -> None:
        """Read the first request's head (the caller holds the handshake deadline)."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        conn.receive_data(buf)
        try:
            event = await next_event(conn, hs.sock, None)
        except h11.RemoteProtocolError as exc:
            raise head_error(exc) from None
        if not isinstance(event, h11.Request):
            raise ConnectionResetError("closed before a request")
        if head_size(event) > MAX_HEAD:
            raise HeadRefused(431, _TOO_BIG)
        self._pending[hs] = (conn, event)

    async def serve(self, hs: Handshake, buf: bytes) -> bool:
        """Serve the connection until it closes (the socket is ours, closed here)."""
        conn, request = self._pending.pop(hs)
        session = GatewaySession(self, hs, conn)
        self._sessions.add(session)
        try:
            await session.run(request)
        finally:
            self._sessions.discard(session)
            session.close()
        return True

    def forget(self, hs: Handshake) -> None:
        """``hs`` failed before :meth:`serve` (drop what :meth:`preamble` kept)."""
        self._pending.pop(hs, None)

    def drain(self) -> None:
        """Close idle keep-alive connections now; busy ones close after their response."""
        self.draining = True
        for s in list(self._sessions):
            s.wake_if_idle()

    def close(self) -> None:
        self.draining = True
        for s in list(self._sessions):
            s.close()
        self.splices.abort_all("node closed")


class HeadRefused(ProtocolError):
    """A request head refused before it is served, with the HTTP status it gets."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(Code.TOO_LARGE if status == 431 else Code.BAD_REQUEST, reason)
        self.http_status = status


_TOO_BIG = f"request head over {MAX_HEAD // 1024} KiB"


def head_error(exc: h11.RemoteProtocolError) -> HeadRefused:
    """What an h11 parse error is sent as (h11 names the status: 431 for an overlong head)."""
    if exc.error_status_hint == 431:
        return HeadRefused(431, _TOO_BIG)
    return HeadRefused(400, "malformed HTTP request (request line or headers)")


def head_size(req: h11.Request) -> int:
    """About the bytes of a parsed request head (h11 bounds only a head still incomplete)."""
    return len(req.method) + len(req.target) + 12 + sum(len(k) + len(v) + 4 for k, v in req.headers)


async def next_event(conn: h11.Connection, sock: socket.socket, timeout: float | None) -> object:
    """The next h11 event of ``conn``, reading ``sock`` as needed (``timeout`` per wait). A read
    is tried at once first: the bytes are usually there, and then no deadline is armed."""
    loop = asyncio.get_running_loop()
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        try:
            data = sock.recv(_CHUNK)
        except (BlockingIOError, InterruptedError):
            if timeout is None:
                data = await loop.sock_recv(sock, _CHUNK)
            else:
                async with asyncio.timeout(timeout):
                    data = await loop.sock_recv(sock, _CHUNK)
        conn.receive_data(data)


async def send_all(sock: socket.socket, data: bytes) -> None:
    """Send ``data``: one plain send nearly always takes it; the rest waits, with a deadline."""
    sent = send_now(sock, data)
    if sent < len(data):
        async with asyncio.timeout(STALL_TIMEOUT):
            await send_rest(sock, data, sent)


class GatewaySession:
    """One client connection of the gateway, from its first request to its close."""

    def __init__(self, plane: HttpPlane, hs: Handshake, conn: h11.Connection) -> None:
        self.plane = plane
        self.hs = hs
        self.conn = conn
        self.sock = hs.sock
        self.peer_ip = hs.peer.rsplit(":", 1)[0].strip("[]")
        self.up: Upstream | None = None
        #: True while waiting for the next request (a drain may close it then).
        self.idle = False
        self._task = asyncio.current_task()
        #: The socket went to a splice or a tunnel: not ours to close.
        self.handed = False

    # -- the connection's life -------------------------------------------------------------------
    async def run(self, first: h11.Request) -> None:
        request: h11.Request | None = first
        while request is not None:
            try:
                keep = await self.one(request)
            except h11.RemoteProtocolError as exc:
                refused = head_error(exc)
                await self._try_refuse(refused.code, refused.reason, request, refused.http_status)
                return
            except ProtocolError as exc:
                await self._try_refuse(exc.code, exc.reason, request)
                return
            if not keep or self.plane.draining:
                return
            request = await self._next_request()

    async def _next_request(self) -> h11.Request | None:
        if self.conn.our_state is not h11.DONE or self.conn.their_state is not h11.DONE:
            return None
        self.conn.start_next_cycle()
        self.idle = True
        try:
            event = await next_event(self.conn, self.sock, IDLE_TIMEOUT)
        except h11.RemoteProtocolError as exc:
            refused = head_error(exc)
            await self._try_refuse(refused.code, refused.reason, None, refused.http_status)
            return None
        except (TimeoutError, asyncio.CancelledError, OSError):
            if self.plane.draining and (t := asyncio.current_task()) is not None:
                t.uncancel()
            return None
        finally:
            self.idle = False
        if isinstance(event, h11.Request) and head_size(event) > MAX_HEAD:
            await self._try_refuse(Code.TOO_LARGE, _TOO_BIG, event, 431)
            return None
        return event if isinstance(event, h11.Request) else None

    def wake_if_idle(self) -> None:
        if self.idle and self._task is not None:
            self._task.cancel()

    def close(self) -> None:
        if self.up is not None:
            self._drop_upstream()
        if not self.handed:
            with contextlib.suppress(OSError):  # unread input would make close() reset the answer away
                self.sock.shutdown(socket.SHUT_WR)
                self.sock.recv(_CHUNK)
            self.sock.close()

    # -- one request -----------------------------------------------------------------------------
    async def one(self, request: h11.Request) -> bool:
        """Answer ``request``; True to keep the connection for another one."""
        path = request.target.split(b"?", 1)[0]
        if path == TUNNEL_PATH and self.plane.tunnel is not None:  # the tunnel says what is wrong with it
            self.handed = True
            await self.plane.tunnel(self.sock, self.hs.peer, request, bytes(self.conn.trailing_data[0]))
            return False
        if path.startswith(OWN_PREFIX):
            return await self._own_page(request, path)
        try:
            named = name_route(request.target, list(request.headers), self.plane.domain)
            creds = self._creds(request)
            up = await self._upstream(named, creds)
        except RouteRefused as exc:
            return await self._refuse(exc.code, exc.reason, request)
        except HomeNetError as exc:
            return await self._refuse(exc.code, exc.reason, request)
        except (OSError, TimeoutError) as exc:
            self._drop_upstream()
            return await self._refuse(Code.BAD_GATEWAY, f"route {named.text}: {exc}", request)
        return await self._proxy(request, named, up)

    def _creds(self, request: h11.Request) -> Credentials | None:
        found = key_of(list(request.headers))
        if found is None:
            return None
        if not self.hs.tls and not _loopback(self.peer_ip):
            raise RouteRefused(Code.FORBIDDEN, _IN_CLEAR)
        return Credentials(found[0], Secret(found[1]))

    async def _upstream(self, named: Named, creds: Credentials | None) -> Upstream:
        key_id = creds.key_id if creds is not None else ""
        if self.up is not None and (self.up.route, self.up.key_id) == (named.text, key_id):
            return self.up
        self._drop_upstream()
        self.up = await self._open(named, creds)
        return self.up

    async def _open(self, named: Named, creds: Credentials | None) -> Upstream:
        """Open ``named``'s route: its first hop through the node's router, the others as
        pipelined requests signed with ``creds``, their replies read."""
        first, rest = named.hops[0], named.hops[1:]
        target = await self.plane.route_first(self.hs, _request(str(first), creds))
        sock = target.sock
        info = SessionInfo(0, self.hs.peer, named.text, target.dialed, time.time())
        try:
            lines = target.greeting + b"".join(_request(str(h), creds).encode() for h in rest)
            async with asyncio.timeout(self.plane.dial_timeout + 5.0):
                if lines:
                    await asyncio.get_running_loop().sock_sendall(sock, lines)
                parser = ReplyParser()
                if target.to_client:  # b"" would mean EOF
                    parser.receive_data(target.to_client)
                for hop in rest:
                    reply = await _reply(sock, parser)
                    if not reply.ok:
                        raise RouteRefused(reply.code, f"{hop}: {reply.reason or reply.code.slug}")
        except BaseException:
            target.abandon(info)  # a later hop refused: the listener's session ends too
            raise
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        if early := parser.trailing():  # b"" would mean EOF
            conn.receive_data(early)
        return Upstream(named.text, creds.key_id if creds else "", sock, conn, target, info)

    def _drop_upstream(self) -> None:
        if self.up is not None:
            self.up.close()
            self.up = None

    # -- proxying ----------------------------------------------------------------------------------
    async def _proxy(self, request: h11.Request, named: Named, up: Upstream) -> bool:
        upgrade = wants_upgrade(list(request.headers))
        onward = onward_headers(list(request.headers), self.peer_ip, self.hs.tls, upgrade=upgrade)
        try:
            await self._relay(h11.Request(method=request.method, target=named.target, headers=onward), up, True)
            response = await self._response_head(up)
        except (h11.ProtocolError, OSError, TimeoutError, ConnectionError) as exc:
            self._drop_upstream()
            return await self._refuse(Code.BAD_GATEWAY, f"{named.text} did not answer properly: {exc}", request)
        if response.status_code == 101:
            return await self._switch(response, up)
        extra = [(b"set-cookie", _route_cookie(named))] if named.by == "path" else []
        head = h11.Response(
            status_code=response.status_code, headers=backward_headers(response.headers) + extra,
            reason=response.reason,
        )  # fmt: skip
        try:
            await self._relay(head, up, False)
        except (h11.ProtocolError, OSError, TimeoutError, ConnectionError) as exc:
            log.debug("gateway.response_cut", extra=fields(peer=self.hs.peer, error=str(exc)))
            self._drop_upstream()
            return False
        bump(self.plane.responses, str(response.status_code))
        if up.conn.our_state is h11.DONE and up.conn.their_state is h11.DONE:
            up.conn.start_next_cycle()
        else:
            self._drop_upstream()
        return True

    async def _response_head(self, up: Upstream) -> h11.Response | h11.InformationalResponse:
        """The target's response head (1xx other than 101 are passed on to the client)."""
        while True:
            event = await next_event(up.conn, up.sock, STALL_TIMEOUT)
            if isinstance(event, h11.InformationalResponse) and event.status_code != 101:
                await self._send_client(h11.InformationalResponse(status_code=event.status_code, headers=[]))
                continue
            if isinstance(event, (h11.Response, h11.InformationalResponse)):
                return event
            raise ConnectionResetError("the target closed before its response")

    async def _relay(self, head: h11.Request | h11.Response, up: Upstream, to_upstream: bool) -> None:
        """Send ``head``, then stream its body from the other side, coalesced: what is in hand
        goes out in one write (a small message: head, body and end together), and nothing
        pending waits while more is read."""
        src_conn, src_sock = (self.conn, self.sock) if to_upstream else (up.conn, up.sock)
        dst_conn, dst_sock = (up.conn, up.sock) if to_upstream else (self.conn, self.sock)
        out = bytearray(dst_conn.send(head) or b"")
        if to_upstream and self.conn.they_are_waiting_for_100_continue:
            await self._flush(dst_sock, out, up, to_upstream)
            await self._send_client(h11.InformationalResponse(status_code=100, headers=[]))
        loop = asyncio.get_running_loop()
        while True:
            event = src_conn.next_event()
            if event is h11.NEED_DATA:
                await self._flush(dst_sock, out, up, to_upstream)
                try:
                    data = src_sock.recv(_CHUNK)
                except (BlockingIOError, InterruptedError):
                    async with asyncio.timeout(STALL_TIMEOUT):
                        data = await loop.sock_recv(src_sock, _CHUNK)
                src_conn.receive_data(data)
            elif isinstance(event, h11.Data):
                out += dst_conn.send(event) or b""
                if len(out) >= _CHUNK:
                    await self._flush(dst_sock, out, up, to_upstream)
            elif isinstance(event, h11.EndOfMessage):
                out += dst_conn.send(h11.EndOfMessage()) or b""
                await self._flush(dst_sock, out, up, to_upstream)
                return
            else:
                raise ConnectionResetError("the message was cut short")

    @staticmethod
    async def _flush(sock: socket.socket, out: bytearray, up: Upstream, to_upstream: bool) -> None:
        if out:
            if to_upstream:
                up.info.moved_up += len(out)
            else:
                up.info.moved_down += len(out)
            await send_all(sock, bytes(out))
            out.clear()

    async def _switch(self, response: h11.Response | h11.InformationalResponse, up: Upstream) -> bool:
        """The target agreed to switch protocols: tell the client, then splice the two."""
        await self._send_client(
            h11.InformationalResponse(status_code=101, headers=backward_headers(response.headers) + _upgrade(response))
        )
        bump(self.plane.responses, "101")
        to_target = bytes(self.conn.trailing_data[0])
        to_client = bytes(up.conn.trailing_data[0])
        self.up, self.handed = None, True

        def spliced_end(sp: Splice, exc: BaseException | None) -> None:
            up.info.moved_up += sp.bytes_up
            up.info.moved_down += sp.bytes_down
            up.target.ended(up.info)

        try:
            await self.plane.splices.start(self.sock, up.sock, to_a=to_client, to_b=to_target, on_close=spliced_end)
        except BaseException:
            up.target.ended(up.info)
            raise
        return False

    async def _send_client(self, event: h11.InformationalResponse) -> None:
        """Send an interim response (100, 101) to the client."""
        data = self.conn.send(event)
        if data:
            await send_all(self.sock, data)

    # -- our own pages and refusals ----------------------------------------------------------------
    async def _own_page(self, request: h11.Request, path: bytes) -> bool:
        if path == LOGOUT_PATH:
            gone = f"hn-key=; {_cookie_flags(self.hs.tls)}; Max-Age=0".encode()
            return await self._page(303, b"", "text/plain", [(b"location", b"/"), (b"set-cookie", gone)])
        if path != LOGIN_PATH:
            return await self._refuse(Code.NOT_FOUND, "no such gateway page", request)
        if request.method == b"POST":
            return await self._login(request)
        secure = self.hs.tls or _loopback(self.peer_ip)
        query = request.target.partition(b"?")[2].decode("latin-1")
        after = safe_next((parse_qs(query).get("next") or ["/"])[0])
        return await self._page(200, _login_form(secure, after), "text/html; charset=utf-8", [])

    async def _login(self, request: h11.Request) -> bool:
        body = b""
        while True:
            event = await next_event(self.conn, self.sock, STALL_TIMEOUT)
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > _MAX_FORM:
                    return await self._refuse(Code.TOO_LARGE, "login form too large", request)
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                return False
        form = parse_qs(body.decode("utf-8", "replace"))
        key = (form.get("key") or [""])[0].strip()
        after = safe_next((form.get("next") or ["/"])[0])
        if key_of([(b"authorization", b"Bearer " + key.encode("latin-1", "replace"))]) is None:
            return await self._refuse(
                Code.BAD_REQUEST, "expected a key as ID:SECRET (the line homenet key new printed)", request
            )
        if not self.hs.tls and not _loopback(self.peer_ip):
            return await self._refuse(Code.FORBIDDEN, _IN_CLEAR, request)
        cookie = f"hn-key={key}; {_cookie_flags(self.hs.tls)}; Max-Age=86400"
        return await self._page(
            303, b"", "text/plain", [(b"location", after.encode()), (b"set-cookie", cookie.encode())]
        )

    async def _refuse(
        self, code: Code, reason: str, request: h11.Request | None, status: int | None = None, close: bool = False
    ) -> bool:
        headers = list(request.headers) if request is not None else []
        if code is Code.UNAUTHORIZED:  # the data plane's hint names an environment variable
            reason = reason.replace("(set HOMENET_KEY=ID:SECRET)", "(log in, or send Authorization: Bearer ID:SECRET)")
        after = request.target.decode("latin-1") if request is not None else "/"
        body, ctype = refusal_page(
            code, reason, as_html=wants_html(headers), login=code is Code.UNAUTHORIZED, after=after
        )
        extra = [(b"hn-error", f"{int(code)} {code.slug}".encode())]
        if code in (Code.MOVING, Code.TOO_MANY, Code.UNAVAILABLE):
            extra.append((b"retry-after", b"2"))
        log.info("gateway.refused", extra=fields(peer=self.hs.peer, code=int(code), reason=reason))
        return await self._page(status or http_status(code), body, ctype, extra, close)

    async def _try_refuse(
        self, code: Code, reason: str, request: h11.Request | None, status: int | None = None
    ) -> None:
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            with contextlib.suppress(OSError, TimeoutError, h11.ProtocolError):
                await self._refuse(code, reason, request, status, close=True)

    async def _page(
        self, status: int, body: bytes, ctype: str, extra: list[tuple[bytes, bytes]], close: bool = False
    ) -> bool:
        """Send a page of our own; True if the connection can take another request."""
        if self.conn.their_state is h11.SEND_BODY:  # a bodiless request ends at once, with no read
            with contextlib.suppress(h11.ProtocolError):
                self.conn.next_event()
        unread_body = close or self.conn.their_state not in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)
        headers = [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode()),
                   (b"cache-control", b"no-store"), *extra]  # fmt: skip
        if unread_body:
            headers.append((b"connection", b"close"))
        head = h11.Response(status_code=status, headers=headers, reason=HTTPStatus(status).phrase)
        out = (self.conn.send(head) or b"") + (self.conn.send(h11.Data(data=body)) or b"")
        await send_all(self.sock, out + (self.conn.send(h11.EndOfMessage()) or b""))  # one write
        bump(self.plane.responses, str(status))
        return not unread_body


_PATH_CHARS = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@%/?-]*")


def safe_next(after: str) -> str:
    """Where the login page may send the browser back to: a path on this site, never another
    site (``//host``, ``/\\host``, or one a browser would make so by dropping a tab)."""
    if not _PATH_CHARS.fullmatch(after) or after.startswith("//"):
        return "/"
    return after


def _request(hop: str, creds: Credentials | None) -> Request:
    token = creds.token(f"HN/1 CONNECT {hop}") if creds is not None else {}
    return Request(Verb.CONNECT, hop, token)


async def _reply(sock: socket.socket, parser: ReplyParser) -> Reply:
    loop = asyncio.get_running_loop()
    while (event := parser.next_event()) is NEED_DATA:
        data = await loop.sock_recv(sock, _CHUNK)
        parser.receive_data(data)
    assert isinstance(event, Reply)
    return event


def _upgrade(response: h11.Response | h11.InformationalResponse) -> list[tuple[bytes, bytes]]:
    return [(b"connection", b"upgrade"), (b"upgrade", header(response.headers, b"upgrade") or b"")]


def _route_cookie(named: Named) -> bytes:
    return f"hn-route={quote(named.text, safe='')}; Path=/; HttpOnly; SameSite=Lax".encode()


def _cookie_flags(tls: bool) -> str:
    return "Path=/; HttpOnly; SameSite=Strict" + ("; Secure" if tls else "")


def _loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def _login_form(secure: bool, after: str) -> bytes:
    if not secure:
        form = "<p>This address is plain HTTP: a key typed here would cross the network in clear. Use https://.</p>"
    else:
        form = (
            '<form method="post" action="/.hn/login"><label>HomeNet key (ID:SECRET) '
            '<input name="key" type="password" autocomplete="current-password" required></label> '
            f'<input type="hidden" name="next" value="{html.escape(after)}">'
            '<button type="submit">Log in</button></form>'
        )
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>HomeNet: log in</title></head>"
        f"<body><h1>HomeNet</h1>{form}</body></html>\n"
    ).encode()
