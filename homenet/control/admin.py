"""The admin HTTP server: ``/metrics`` for Prometheus and the read-only dashboard.

It listens on its own address (``--metrics-bind``), never on the public port. HTTP/1.1 is
parsed by h11; this module is the I/O shell around it: a connection cap, a deadline on every
read, keep-alive (Prometheus scrapes reuse their connection), GET and HEAD only, no request
body. Off loopback it needs an admin key, as ``Authorization: Bearer ID:SECRET`` or HTTP Basic
(the browser's own prompt): compared in constant time, a wrong one counts as a failed login
against its source (the node's penalties apply), and settings refuse such an address without
TLS, so the key never crosses the network in clear.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from http import HTTPStatus

import h11

from homenet.node.keys import KeyStore, Secret
from homenet.node.limits import SourceLimiter, source_of
from homenet.node.log import fields

log = logging.getLogger("homenet.admin")

#: Admin connections open at once; more are closed at accept.
MAX_CONNECTIONS = 64
#: Seconds to send a whole request; seconds an idle keep-alive connection stays open.
READ_TIMEOUT, IDLE_TIMEOUT = 10.0, 30.0
#: Bytes of request line and headers at most.
MAX_HEAD = 16 * 1024
_SECURITY_HEADERS = [
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'self'; img-src 'self';"
        b" frame-ancestors 'none'",
    ),
]


@dataclass(frozen=True)
class Page:
    """One response body and its content type."""

    body: bytes
    content_type: str
    status: int = 200


#: A path's handler: builds the page when asked.
Handler = Callable[[], Awaitable[Page]]


class AdminServer:
    """Serves ``pages`` (path -> handler) to operators and Prometheus."""

    def __init__(
        self,
        pages: Mapping[str, Handler],
        keys: KeyStore,
        limiter: SourceLimiter,
        *,
        open_access: bool,
        open_paths: Collection[str] = (),
        tls: ssl.SSLContext | None = None,
        keys_need_tls: bool = False,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.pages = pages
        self.keys = keys
        self.limiter = limiter
        #: True: no key asked anywhere (a loopback address); else only for ``open_paths``
        #: (``/metrics`` with metrics_auth none), and a key only over TLS.
        self.open_access = open_access
        self.open_paths = frozenset(open_paths)
        #: Off loopback a key is taken only over TLS (without it, only ``open_paths`` are served).
        self.keys_need_tls = keys_need_tls
        self.tls = tls
        self.max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on ``host:port`` (0: a free port); returns the address bound."""
        self._server = await asyncio.start_server(self._client, host, port, ssl=self.tls, reuse_address=True)
        sockname = self._server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    async def close(self) -> None:
        """Stop listening and close every admin connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            await asyncio.wait(set(self._conns), timeout=1.0)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = writer.get_extra_info("peername")
        source = source_of(str(peer[0])) if peer else "?"
        if len(self._conns) >= self.max_connections or self.limiter.blocked(source):
            writer.close()
            return
        self._conns.add(task)
        try:
            await self._serve(reader, writer, source)
        except (OSError, TimeoutError, h11.ProtocolError, asyncio.IncompleteReadError) as exc:
            log.debug("admin.connection_error", extra=fields(source=source, error=str(exc) or type(exc).__name__))
        finally:
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, source: str) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        try:
            await self._cycles(conn, reader, writer, source)
        except h11.RemoteProtocolError as exc:  # the client's fault: say so in one line, close
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                page = Page(f"bad request: {exc}\n".encode(), "text/plain", exc.error_status_hint)
                writer.write(_response(conn, page, [(b"connection", b"close")], head_only=False))
                async with asyncio.timeout(READ_TIMEOUT):
                    await writer.drain()
            log.debug("admin.bad_request", extra=fields(source=source, error=str(exc)))

    async def _cycles(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, source: str
    ) -> None:
        """Request, response, again while the client keeps the connection alive."""
        while True:
            request = await _next(conn, reader, IDLE_TIMEOUT if conn.their_state is h11.IDLE else READ_TIMEOUT)
            if not isinstance(request, h11.Request):
                return  # closed (or a stray event after a response): we are done
            page, extra = await self._answer(request, source)
            # a request with a body is refused, and its body never read: close after answering
            body_expected = any(k == b"content-length" and v != b"0" for k, v in request.headers) or any(
                k == b"transfer-encoding" for k, _ in request.headers
            )
            if body_expected:
                page, extra = Page(b"admin requests carry no body\n", "text/plain", 413), [(b"connection", b"close")]
            writer.write(_response(conn, page, extra, head_only=request.method == b"HEAD"))
            async with asyncio.timeout(READ_TIMEOUT):
                await writer.drain()
            if body_expected or conn.our_state is not h11.DONE:
                return
            end = await _next(conn, reader, READ_TIMEOUT)  # the request's own end (no body: at once)
            if not isinstance(end, h11.EndOfMessage) or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _answer(self, request: h11.Request, source: str) -> tuple[Page, list[tuple[bytes, bytes]]]:
        if request.method not in (b"GET", b"HEAD"):
            return Page(b"only GET and HEAD here\n", "text/plain", 405), [(b"allow", b"GET, HEAD")]
        path = request.target.split(b"?", 1)[0].decode("ascii", "replace")
        if not self.open_access and path not in self.open_paths:
            if self.keys_need_tls and self.tls is None:  # metrics_auth none off loopback, no TLS
                return Page(b"this page needs TLS on this address (an admin key must not cross in clear)\n",
                            "text/plain", 403), []  # fmt: skip
            verdict = self._check_key(request.headers, source)
            if verdict is not None:
                return Page(verdict.encode() + b"\n", "text/plain", 401), [
                    (b"www-authenticate", b'Basic realm="HomeNet admin", charset="UTF-8"')
                ]
        handler = self.pages.get(path)
        if handler is None:
            return Page(b"no such page\n", "text/plain", 404), []
        try:
            return await handler(), []
        except Exception:  # a bug costs one response, never the node
            log.exception("admin.page_bug", extra=fields(path=path))
            return Page(b"internal error\n", "text/plain", 500), []

    def _check_key(self, headers: Iterable[tuple[bytes, bytes]], source: str) -> str | None:
        """None if the request carries an admin key; else why not (a wrong key is a failed login)."""
        auth = next((v for k, v in headers if k == b"authorization"), None)
        if auth is None:
            return "this address needs an admin key (Authorization: Bearer ID:SECRET, or Basic)"
        scheme, _, value = auth.decode("latin-1").partition(" ")
        text = value.strip()
        if scheme.lower() == "basic":
            try:
                text = base64.b64decode(text, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                text = ""
        elif scheme.lower() != "bearer":
            text = ""
        kid, _, secret = text.partition(":")
        key = self.keys.get(kid) if kid else None
        good = key is not None and secret.isascii() and key.secret == Secret(secret) and key.allows("admin")
        if good:
            return None
        if self.limiter.failed(source):
            log.warning("auth.source_blocked", extra=fields(source=source))
        return "bad credentials or not an admin key"


def _response(conn: h11.Connection, page: Page, extra: list[tuple[bytes, bytes]], *, head_only: bool) -> bytes:
    """The bytes of one whole response."""
    headers = [
        (b"content-type", page.content_type.encode()),
        (b"content-length", str(len(page.body)).encode()),
        *_SECURITY_HEADERS,
        *extra,
    ]
    out = conn.send(h11.Response(status_code=page.status, headers=headers, reason=HTTPStatus(page.status).phrase))
    if not head_only:
        out = (out or b"") + (conn.send(h11.Data(data=page.body)) or b"")
    return (out or b"") + (conn.send(h11.EndOfMessage()) or b"")


async def _next(conn: h11.Connection, reader: asyncio.StreamReader, timeout: float) -> object:
    """The next h11 event, reading as needed (within ``timeout`` seconds)."""
    async with asyncio.timeout(timeout):
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
                continue
            if event is h11.PAUSED:
                return None
            return event
