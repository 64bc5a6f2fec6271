"""The WebSocket transport: one HomeNet connection carried in a WebSocket, for clients behind
proxies that pass only HTTP (``ws://`` and ``wss://`` routes, ``--rl ws://RELAY``).

The client asks the node's one port for ``GET /.hn/tunnel`` with ``Upgrade: websocket`` and
the subprotocol ``homenet.v1``. Once switched, the WebSocket carries the byte stream of one
ordinary connection to the node (a data-plane preamble and its bytes, or the HTTP/2 of a gRPC
client):

* binary messages carry the bytes, in order; message boundaries mean nothing;
* an empty binary message ends its sender's direction (a TCP half-close: the other
  direction goes on, so a client's EOF reaches the target and the answer still comes back);
* a Close ends both directions; code 1000 is a clean end, any other code is an error
  (the local side is reset, as the splice resets both sides of a failed session);
* a text message is refused (close 1003), a message over ``max_message`` bytes too (1009).

Both ends bridge the WebSocket to one end of a socketpair, as :mod:`homenet.node.tls`
bridges TLS: the other end is a plain socket that the node serves exactly like an accepted
TCP connection (``serve_inner``), or on which a client opens its route. The WebSocket
protocol is wsproto's (sans-IO); this module is the asyncio shell around it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import http
import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

import h11
from wsproto import WSConnection
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from homenet.node.address import Endpoint
from homenet.node.dialer import connect_first, describe_os_error, system_resolve
from homenet.node.errors import Code, HomeNetError
from homenet.node.log import fields
from homenet.node.tls import TLSError

log = logging.getLogger("homenet.wstunnel")

#: Where a node accepts tunnels (a GET with ``Upgrade: websocket``).
TUNNEL_PATH = "/.hn/tunnel"
#: The one subprotocol (``Sec-WebSocket-Protocol``) a tunnel speaks.
SUBPROTOCOL = "homenet.v1"
#: Bytes read (and sent as one message) at a time on either side: the bound of every buffer.
CHUNK = 64 * 1024
#: Bytes of one received message at most (a message is streamed, never held whole).
MAX_MESSAGE = 1 << 20
#: Seconds the far end has to answer our Close before the connection is cut.
CLOSE_TIMEOUT = 5.0
#: Seconds between a client's pings (they keep proxies from cutting a quiet tunnel).
CLIENT_PING = 20.0
#: Bytes of a refusal's body a client reads for its error message.
_MAX_REFUSAL_BODY = 512

#: Serves the inner end of a tunnel as if it had been accepted on the port: (socket, peer).
ServeInner = Callable[[socket.socket, str], None]

_OPEN = ConnectionState.OPEN
_CLOSED = ConnectionState.CLOSED
_CLEAN = (CloseReason.NORMAL_CLOSURE, CloseReason.NO_STATUS_RCVD)


class TunnelError(HomeNetError):
    """A tunnel could not be opened (refused upgrade, bad handshake); one line for the user."""

    default_code = Code.BAD_GATEWAY


# -- the pump ------------------------------------------------------------------------------------
class Tunnel:
    """An open WebSocket (``conn`` over ``reader``/``writer``) bridged to ``local``, one end
    of a socketpair: what ``local`` delivers goes out as binary messages, what the messages
    carry is written to ``local``. :meth:`run` returns when both are done."""

    def __init__(
        self,
        conn: Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        local: socket.socket,
        *,
        name: str,
        max_message: int = MAX_MESSAGE,
        idle_timeout: float | None = None,
        ping_interval: float | None = None,
    ) -> None:
        self.conn = conn
        self.name = name
        self.max_message = max_message
        self.idle_timeout = idle_timeout
        self.ping_interval = ping_interval
        #: Bytes the WebSocket brought in (to ``local``), and sent out (from ``local``).
        self.bytes_in = 0
        self.bytes_out = 0
        #: The close code the WebSocket ended with (None: it ended without a Close).
        self.close_code: int | None = None
        self._reader, self._writer = reader, writer
        self._local = local
        self._lw: asyncio.StreamWriter | None = None
        self._local_eof = False  # local sent its EOF (we sent the empty message)
        self._peer_eof = False  # the far end sent its empty message
        self._local_gone = False  # local failed or was cut: nothing more is written to it
        self._failed = False  # a protocol error, a timeout or a local failure ended the tunnel
        self._message = 0  # bytes of the message being received
        self._last_data = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._ping_timer: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None

    async def run(self) -> None:
        """Pump both ways until the WebSocket is closed (or cut); owns and closes both sides."""
        loop = asyncio.get_running_loop()
        self._last_data = loop.time()
        try:
            local_reader, self._lw = await asyncio.open_connection(sock=self._local, limit=CHUNK)
        except OSError:
            self._local.close()
            self._writer.transport.abort()
            return
        up = loop.create_task(self._up(local_reader))
        if self.idle_timeout:
            self._idle_timer = loop.call_later(self.idle_timeout, self._check_idle)
        if self.ping_interval:
            self._ping_timer = loop.call_later(self.ping_interval, self._ping)
        clean = False
        try:
            clean = await self._down()
        finally:
            up.cancel()
            for timer in (self._idle_timer, self._ping_timer, self._close_timer):
                if timer is not None:
                    timer.cancel()
            await asyncio.gather(up, return_exceptions=True)
            self._finish(clean)
        log.debug(
            "tunnel.closed",
            extra=fields(tunnel=self.name, code=self.close_code, bytes_in=self.bytes_in, bytes_out=self.bytes_out),
        )

    def _finish(self, clean: bool) -> None:
        """Close both sides: the local one cleanly (its FIN after the last byte) when the
        stream ended well, else with a reset, so its user sees the failure; the WebSocket
        gracefully when we closed it (our Close frame still goes out), else at once."""
        assert self._lw is not None
        if clean and not self._local_gone:
            self._lw.close()
        else:
            self._lw.transport.abort()
        transport = self._writer.transport
        if (clean or self._close_timer is not None) and not transport.is_closing():
            self._writer.close()
            if transport.get_write_buffer_size():  # a far end that reads nothing more is cut
                asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, transport.abort)
        else:
            transport.abort()

    # -- WebSocket -> local ---------------------------------------------------------------------
    async def _down(self) -> bool:
        """Read the WebSocket until it is closed; True when the stream ended well (a clean
        close, or both directions finished)."""
        conn, lw = self.conn, self._lw
        assert lw is not None
        while True:
            for event in conn.events():  # first the frames that came with the handshake
                if not self._on_event(event):
                    await self._linger()
                    return False
            if not self._local_gone and lw.transport.get_write_buffer_size():
                try:
                    await lw.drain()  # backpressure: the WebSocket waits while local is full
                except OSError:
                    self._lose_local("the other end closed the connection")
            if conn.state is _CLOSED:
                break
            try:
                data = await self._reader.read(CHUNK)
            except OSError:
                data = b""
            if not data:  # the connection ended without a (complete) close handshake
                break
            conn.receive_data(data)
        if self._failed:
            return False
        return self.close_code in _CLEAN or (self._local_eof and self._peer_eof)

    async def _linger(self) -> None:
        """After our Close for an error: half-close, then read and drop what the far end still
        sends until it closes (the close timer cuts it after CLOSE_TIMEOUT), so that closing
        sends no reset that could destroy our Close frame on its way."""
        with contextlib.suppress(OSError):
            if self._writer.can_write_eof():
                self._writer.write_eof()
        with contextlib.suppress(OSError):
            while await self._reader.read(CHUNK):
                pass  # the parser gave up on this stream: nothing is fed to it any more

    def _on_event(self, event: Event) -> bool:
        """Handle one event; False when the tunnel must end now (a protocol error)."""
        conn = self.conn
        if isinstance(event, BytesMessage):
            return self._on_bytes(event)
        if isinstance(event, Ping):
            if conn.state is _OPEN:
                self._send_ws(conn.send(event.response()))
        elif isinstance(event, CloseConnection):
            if conn.state is _OPEN:  # wsproto reports a frame it could not parse as a close
                self._fail(event.code, event.reason or "bad frame")
                return False
            self.close_code = event.code
            if conn.state is ConnectionState.REMOTE_CLOSING:
                self._send_ws(conn.send(event.response()))
            if event.code not in _CLEAN:
                log.info("tunnel.closed_by_peer", extra=fields(tunnel=self.name, code=event.code, reason=event.reason))
        elif isinstance(event, TextMessage):
            self._fail(CloseReason.UNSUPPORTED_DATA, f"{SUBPROTOCOL} carries binary messages only")
            return False
        elif not isinstance(event, Pong):  # pragma: no cover - wsproto sends nothing else here
            self._fail(CloseReason.PROTOCOL_ERROR, f"unexpected {type(event).__name__}")
            return False
        return True

    def _on_bytes(self, event: BytesMessage) -> bool:
        n = len(event.data)
        self._message += n
        if self._message > self.max_message:
            self._fail(CloseReason.MESSAGE_TOO_BIG, f"message over {self.max_message} bytes")
            return False
        if n:
            if self._peer_eof:
                self._fail(CloseReason.PROTOCOL_ERROR, "data after the end of the stream")
                return False
            self.bytes_in += n
            self._last_data = asyncio.get_running_loop().time()
            if not self._local_gone:
                assert self._lw is not None
                if self._lw.transport.is_closing():
                    self._lose_local("the other end closed the connection")
                else:
                    self._lw.write(event.data)
        if event.message_finished:
            if self._message == 0 and not self._peer_eof:
                self._peer_eof = True  # the far end's half-close
                if not self._local_gone:
                    assert self._lw is not None
                    with contextlib.suppress(OSError):
                        self._lw.write_eof()
                self._both_done()
            self._message = 0
        return True

    # -- local -> WebSocket ---------------------------------------------------------------------
    async def _up(self, reader: asyncio.StreamReader) -> None:
        conn = self.conn
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await reader.read(CHUNK)
                if conn.state is not _OPEN or self._local_gone:
                    return
                if not data:
                    self._local_eof = True
                    self._send_ws(conn.send(BytesMessage(data=b"")))  # our half-close
                    self._both_done()
                    return
                self.bytes_out += len(data)
                self._last_data = loop.time()
                if not self._send_ws(conn.send(BytesMessage(data=data))):
                    return
                await self._writer.drain()  # backpressure: local waits while the WebSocket is full
        except OSError:
            if not self._writer.transport.is_closing():  # else the WebSocket broke: _down sees it
                self._lose_local("the other end reset the connection")

    # -- ending ---------------------------------------------------------------------------------
    def _send_ws(self, data: bytes) -> bool:
        if self._writer.transport.is_closing():
            return False
        self._writer.write(data)
        return True

    def _both_done(self) -> None:
        if self._local_eof and self._peer_eof:
            self._close(CloseReason.NORMAL_CLOSURE, "")

    def _close(self, code: int, reason: str) -> None:
        """Send our Close (once); the far end has CLOSE_TIMEOUT to answer it."""
        if self.conn.state not in (_OPEN, ConnectionState.REMOTE_CLOSING):
            return
        with contextlib.suppress(LocalProtocolError):
            self._send_ws(self.conn.send(CloseConnection(code=code, reason=reason)))
        if self.close_code is None and self.conn.state is not _CLOSED:
            self.close_code = code
        if self._close_timer is None:
            loop = asyncio.get_running_loop()
            self._close_timer = loop.call_later(CLOSE_TIMEOUT, self._writer.transport.abort)

    def _fail(self, code: int, reason: str) -> None:
        """End the tunnel on an error: our Close with ``code``, the local side reset."""
        log.info("tunnel.failed", extra=fields(tunnel=self.name, code=int(code), reason=reason))
        self._failed = True
        self.close_code = code
        self._close(code, reason)

    def _lose_local(self, reason: str) -> None:
        """The local side failed while bytes were still due: tell the far end (1001)."""
        self._local_gone = True
        self._failed = True
        if self._lw is not None:
            self._lw.transport.abort()
        self._close(CloseReason.GOING_AWAY, reason)

    def _check_idle(self) -> None:
        assert self.idle_timeout is not None
        loop = asyncio.get_running_loop()
        left = self._last_data + self.idle_timeout - loop.time()
        if left > 0:
            self._idle_timer = loop.call_later(left, self._check_idle)
        else:
            self._lose_local(f"idle for {self.idle_timeout:g}s")

    def _ping(self) -> None:
        """Keep intermediaries (proxies) from cutting a quiet tunnel; liveness is the inner
        protocol's business (gRPC keepalive) and the idle timeout's."""
        assert self.ping_interval is not None
        if self.conn.state is not _OPEN:
            return
        self._send_ws(self.conn.send(Ping()))
        self._ping_timer = asyncio.get_running_loop().call_later(self.ping_interval, self._ping)


# -- server side ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Refusal(Exception):
    """An upgrade request we answer with an HTTP error instead of 101."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...] = field(default=())


def refusal_response(status: int, reason: str, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """An HTTP/1.1 error response whose body is one text line (``STATUS PHRASE: reason``)."""
    phrase = http.HTTPStatus(status).phrase
    text = "".join(c if " " <= c <= "~" else "?" for c in reason)
    body = f"{status} {phrase}: {text}\n".encode("ascii")
    head = [
        f"HTTP/1.1 {status} {phrase}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{k}: {v}" for k, v in headers),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


def _header_values(request: h11.Request, name: bytes) -> list[bytes]:
    return [v for k, v in request.headers if k == name]


def accept_upgrade(request: h11.Request) -> tuple[WSConnection, bytes]:
    """Check a tunnel request; the server's WebSocket (open) and its 101 response.

    Raises :class:`_Refusal` (status, reason) for anything but a WebSocket upgrade of
    :data:`TUNNEL_PATH` with version 13, a valid key and the ``homenet.v1`` subprotocol. A
    request with an ``Origin`` comes from a web page (a browser adds it to every WebSocket
    request, and lets any site open one to any address): refused, so a page cannot use its
    visitor's browser to reach a node only that visitor can reach (a home node on the LAN).
    """
    if request.method != b"GET":
        raise _Refusal(405, f"a tunnel is opened with GET {TUNNEL_PATH}", (("Allow", "GET"),))
    path = request.target.split(b"?", 1)[0]
    if path != TUNNEL_PATH.encode():
        raise _Refusal(404, f"no tunnel at {path.decode('ascii', 'replace')}: use {TUNNEL_PATH}")
    if request.http_version != b"1.1":
        raise _Refusal(400, "a WebSocket upgrade needs HTTP/1.1")
    if _header_values(request, b"transfer-encoding") or any(
        v.strip() != b"0" for v in _header_values(request, b"content-length")
    ):
        raise _Refusal(400, "a tunnel request has no body")
    ws = WSConnection(ConnectionType.SERVER)
    try:
        ws.initiate_upgrade_connection(list(request.headers), request.target)
    except RemoteProtocolError as exc:
        hint = exc.event_hint
        status = hint.status_code if isinstance(hint, RejectConnection) else 400
        extra = tuple((k.decode(), v.decode()) for k, v in hint.headers) if isinstance(hint, RejectConnection) else ()
        raise _Refusal(status, f"bad WebSocket upgrade: {exc}", extra) from None
    except h11.ProtocolError as exc:
        raise _Refusal(400, f"bad WebSocket upgrade: {exc}") from None
    upgrade = next(iter(ws.events()), None)
    if not isinstance(upgrade, Request):
        raise _Refusal(400, "bad WebSocket upgrade")
    if _header_values(request, b"origin"):  # browsers send it, HomeNet clients never do
        raise _Refusal(403, "tunnels are for HomeNet clients, not web pages (the request has an Origin)")
    keys = _header_values(request, b"sec-websocket-key")
    try:
        nonce = base64.b64decode(keys[0], validate=True) if len(keys) == 1 else b""
    except (binascii.Error, ValueError):
        nonce = b""
    if len(nonce) != 16:
        raise _Refusal(400, "bad Sec-WebSocket-Key: expected one base64 16-byte nonce")
    if SUBPROTOCOL not in upgrade.subprotocols:
        offered = ", ".join(upgrade.subprotocols) or "none"
        raise _Refusal(400, f"the tunnel speaks the WebSocket subprotocol {SUBPROTOCOL} only (offered: {offered})")
    return ws, ws.send(AcceptConnection(subprotocol=SUBPROTOCOL))


async def serve_tunnel(
    sock: socket.socket,
    peer: str,
    request: h11.Request,
    leftover: bytes,
    serve_inner: ServeInner,
    *,
    max_message: int = MAX_MESSAGE,
    idle_timeout: float | None = None,
    ping_interval: float | None = None,
    timeout: float = CLOSE_TIMEOUT,
) -> None:
    """Serve a WebSocket tunnel on ``sock``, whose HTTP request head was ``request``
    (``leftover``: the bytes read after it). Returns when the tunnel has ended.

    A request that is not a tunnel upgrade gets one HTTP error (a text line) and a close.
    Otherwise the 101 is sent and ``serve_inner(inner, peer)`` gets the inner end of the
    tunnel, to serve as a connection accepted on the port (``Node.serve_accepted``). The
    socket is this function's from the start: it is closed when it returns (or is
    cancelled). ``timeout``: seconds to send the 101 or the refusal.
    """
    try:
        reader, writer = await asyncio.open_connection(sock=sock, limit=CHUNK)
    except OSError:
        sock.close()
        return
    try:
        ws, response = accept_upgrade(request)
    except _Refusal as no:
        log.info("tunnel.refused", extra=fields(peer=peer, status=no.status, reason=no.reason))
        await _refuse(reader, writer, refusal_response(no.status, no.reason, no.headers), timeout)
        return
    conn = ws.connection
    assert conn is not None
    inner, outer = socket.socketpair()
    try:
        writer.write(response)
        async with asyncio.timeout(timeout):
            await writer.drain()
        conn.receive_data(leftover)  # frames the client sent along with its request
        inner.setblocking(False)
        outer.setblocking(False)
        serve_inner(inner, peer)
    except (OSError, TimeoutError) as exc:
        log.info("tunnel.lost", extra=fields(peer=peer, error=str(exc) or type(exc).__name__))
        inner.close()
        outer.close()
        writer.transport.abort()
        return
    except BaseException:
        inner.close()
        outer.close()
        writer.transport.abort()
        raise
    tunnel = Tunnel(
        conn, reader, writer, outer, name=f"ws {peer}", max_message=max_message,
        idle_timeout=idle_timeout, ping_interval=ping_interval,
    )  # fmt: skip
    await tunnel.run()


async def _refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, response: bytes, timeout: float) -> None:
    """Send ``response`` and close; unread input is drained a moment first, or closing
    would send a reset that can destroy the response in flight."""
    try:
        writer.write(response)
        writer.write_eof()
        async with asyncio.timeout(timeout):
            await writer.drain()
            drained = 0
            while drained < CHUNK and (chunk := await reader.read(CHUNK)):
                drained += len(chunk)
    except (OSError, TimeoutError):
        pass
    finally:
        writer.transport.abort()  # the response was flushed, or will never be


# -- client side ---------------------------------------------------------------------------------
@dataclass(eq=False)
class ClientTunnel:
    """A tunnel a client opened: ``sock`` is its plain end; :attr:`task` pumps the rest."""

    sock: socket.socket
    tunnel: Tunnel
    task: asyncio.Task[None]

    def close(self) -> None:
        """Cut the tunnel now (closing ``sock`` ends it cleanly instead)."""
        self.task.cancel()


#: Tunnels whose pumps are running (a task needs a strong reference while it runs).
_LIVE: set[ClientTunnel] = set()


def live_tunnels() -> int:
    """Client tunnels still pumping in this process."""
    return len(_LIVE)


def host_header(ep: Endpoint) -> str:
    """The ``Host`` a client names for ``ep`` (``[v6]:port`` for an IPv6 address)."""
    try:
        is_v6 = ipaddress.ip_address(ep.host).version == 6
    except ValueError:
        is_v6 = False
    return f"[{ep.host}]:{ep.port}" if is_v6 else f"{ep.host}:{ep.port}"


async def open_tunnel(
    host: str,
    port: int,
    *,
    tls: ssl.SSLContext | None,
    server_hostname: str | None,
    timeout: float,
) -> socket.socket:
    """Dial ``host:port``, open a tunnel (over TLS if ``tls`` is given, verifying the node
    as ``server_hostname``, by default ``host``) and return its plain end: a socket whose
    bytes reach the node as a TCP connection's would. Closing the socket ends the tunnel.

    Raises :class:`TunnelError` (or :class:`~homenet.node.tls.TLSError`) with one line.
    No HTTP proxy is used: the client dials the node (or a proxy's port) itself.
    """
    try:
        addrs = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            async with asyncio.timeout(timeout):
                addrs = await system_resolve(host, port)
        except (OSError, TimeoutError) as exc:
            raise TunnelError(f"cannot resolve {host}: {exc}") from None
    ep = Endpoint(host, port)
    try:
        sock, _ = await connect_first(addrs, port, timeout)
    except TimeoutError:
        raise TunnelError(f"cannot reach node {ep}: timed out") from None
    except OSError as exc:
        raise TunnelError(f"cannot reach node {ep}: {describe_os_error(exc)}") from None
    opened = await start_tunnel(
        sock, host=host_header(ep), tls=tls, server_hostname=server_hostname or host, timeout=timeout
    )
    return opened.sock


async def start_tunnel(
    sock: socket.socket,
    *,
    host: str,
    tls: ssl.SSLContext | None,
    server_hostname: str,
    timeout: float,
    ping_interval: float | None = CLIENT_PING,
    max_message: int = MAX_MESSAGE,
) -> ClientTunnel:
    """Open a tunnel on ``sock``, a TCP connection to a node (``host``: its Host header):
    TLS first when ``tls`` is given, then the upgrade, within ``timeout`` seconds. The
    socket is the tunnel's from the start (closed on failure)."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await _connect(sock, tls, server_hostname, timeout)
            conn = await _upgrade(reader, writer, host, tls is not None)
    except BaseException as exc:
        if writer is not None:
            writer.transport.abort()
        else:
            sock.close()
        if isinstance(exc, TimeoutError):
            raise TunnelError(f"no WebSocket handshake within {timeout:g}s") from None
        raise
    user, pump = socket.socketpair()
    user.setblocking(False)
    pump.setblocking(False)
    tunnel = Tunnel(
        conn, reader, writer, pump, name=f"ws to {host}", max_message=max_message, ping_interval=ping_interval
    )
    opened = ClientTunnel(user, tunnel, asyncio.get_running_loop().create_task(tunnel.run()))
    _LIVE.add(opened)
    opened.task.add_done_callback(lambda _t: _LIVE.discard(opened))
    return opened


async def _connect(
    sock: socket.socket, tls: ssl.SSLContext | None, server_hostname: str, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if tls is None:
        try:
            return await asyncio.open_connection(sock=sock, limit=CHUNK)
        except OSError as exc:
            raise TunnelError(f"cannot use the connection: {describe_os_error(exc)}") from None
    try:
        return await asyncio.open_connection(
            sock=sock, limit=CHUNK, ssl=tls, server_hostname=server_hostname, ssl_handshake_timeout=timeout
        )
    except ssl.SSLCertVerificationError as exc:
        raise TLSError(f"TLS: cannot verify {server_hostname}: {exc.verify_message} (try --tls-ca)") from None
    except (ssl.SSLError, OSError) as exc:
        why = getattr(exc, "reason", None) or describe_os_error(exc)
        raise TLSError(f"TLS handshake with {server_hostname} failed: {why}") from None


async def _upgrade(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, tls: bool) -> Connection:
    """Ask for the tunnel; the open WebSocket, or :class:`TunnelError` saying why not."""
    ws = WSConnection(ConnectionType.CLIENT)
    writer.write(ws.send(Request(host=host, target=TUNNEL_PATH, subprotocols=[SUBPROTOCOL])))
    first = True
    refused: RejectConnection | None = None
    body = b""
    while True:
        try:
            data = await reader.read(CHUNK)
        except OSError as exc:
            raise TunnelError(f"connection lost during the WebSocket handshake: {describe_os_error(exc)}") from None
        if first and data.startswith(b"HN/1 "):
            line = data.split(b"\n", 1)[0].decode("ascii", "replace").strip()
            raise TunnelError(f"the node does not accept WebSocket tunnels (it answered {line!r})")
        first = False
        if not data:
            if refused is not None:
                raise _refused(refused, body)
            hint = "; does the node require a client certificate (--tls-cert)?" if tls else ""
            raise TunnelError(f"connection closed during the WebSocket handshake{hint}")
        try:
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    if event.subprotocol != SUBPROTOCOL:
                        raise TunnelError(f"the node accepted the WebSocket without the {SUBPROTOCOL} subprotocol")
                    assert ws.connection is not None
                    return ws.connection
                if isinstance(event, RejectConnection):
                    refused = event
                    if not event.has_body:
                        raise _refused(event, b"")
                elif isinstance(event, RejectData):
                    body += event.data
                    if event.body_finished or len(body) >= _MAX_REFUSAL_BODY:
                        assert refused is not None
                        raise _refused(refused, body)
        except RemoteProtocolError as exc:
            raise TunnelError(f"bad WebSocket handshake from the node: {exc}") from None


def _refused(event: RejectConnection, body: bytes) -> TunnelError:
    text = body[:_MAX_REFUSAL_BODY].decode("utf-8", "replace").strip().splitlines()
    why = text[0] if text else ""
    try:
        phrase = http.HTTPStatus(event.status_code).phrase
    except ValueError:
        phrase = ""
    detail = why if why.startswith(str(event.status_code)) else f"{event.status_code} {phrase} {why}".strip()
    return TunnelError(f"WebSocket upgrade refused: HTTP {detail}")
