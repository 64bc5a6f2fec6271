"""The WebSocket tunnel, in process over loopback TCP: the upgrade checks (bytes in, a 101 or
one HTTP error out), then a real server (one HTTP head parsed with h11, then
:func:`serve_tunnel`, whose inner end is spliced to a real target as the node would) and the
real client (:func:`open_tunnel`), or a raw client that writes frames by hand.

Every wait is under ``asyncio.timeout``; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import h11
import pytest

from homenet.node import wstunnel
from homenet.node.address import DEFAULT_PORT, AddressError, Endpoint, ListenId, Route, parse_url
from homenet.node.dialer import connect, wait_writable
from homenet.node.splice import Splices
from homenet.node.tls import TLSError, accept_tls
from homenet.node.wstunnel import (
    SUBPROTOCOL,
    TUNNEL_PATH,
    TunnelError,
    accept_upgrade,
    open_tunnel,
    refusal_response,
    serve_tunnel,
    start_tunnel,
)
from tests.helpers import EchoServer, echo_server
from tests.ws_support import (
    BINARY,
    CLOSE,
    PING,
    PONG,
    TEXT,
    Certs,
    accept_token,
    close_code,
    frame,
    head_of,
    make_certs,
    raw_exchange,
    raw_upgrade,
    upgrade_bytes,
)

MiB = 1 << 20
TIMEOUT = 10.0
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


# -- ws:// and wss:// URLs -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "tls", "ws"),
    [
        ("hn://relay/a", False, False),
        ("hns://relay/a", True, False),
        ("ws://relay/a", False, True),
        ("wss://relay/a", True, True),
    ],
)
def test_the_scheme_names_the_first_hops_transport(url: str, tls: bool, ws: bool) -> None:
    route = parse_url(url)
    assert (route.tls, route.ws) == (tls, ws)
    assert route.entry == Endpoint("relay", DEFAULT_PORT)  # one port for every transport
    assert route.scheme == url.split("://")[0]


@pytest.mark.parametrize(
    "url", ["ws://relay.example.net:6969/home1/192.168.1.20:22", "wss://[::1]:443/a/b", "ws://r:6969", "wss://r:1/x"]
)
def test_ws_urls_round_trip(url: str) -> None:
    route = parse_url(url)
    assert str(route) == url
    assert parse_url(str(route)) == route


def test_a_prefix_keeps_the_transport() -> None:
    route = parse_url("wss://relay/home1/10.0.0.5:22")
    assert route.prefix(1) == Route(Endpoint("relay", DEFAULT_PORT), (ListenId("home1"),), tls=True, ws=True)
    assert str(route.prefix(0)) == "wss://relay:6969"


@pytest.mark.parametrize("url", ["WS://relay/a", "wsx://relay/a", "http://relay/a", "ws:/relay/a", "wss//relay"])
def test_other_schemes_are_refused_naming_the_good_ones(url: str) -> None:
    with pytest.raises(AddressError, match=r"expected hn://HOST\[:PORT\]/HOP\.\.\. \(or hns://, ws://, wss://\)"):
        parse_url(url)


# -- the upgrade, bytes only ---------------------------------------------------------------------
def parsed(raw: bytes) -> h11.Request:
    """The request head an HTTP plane would hand over (h11's parse of ``raw``)."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    event = conn.next_event()
    assert isinstance(event, h11.Request), event
    return event


def test_a_good_upgrade_gets_101_with_the_subprotocol() -> None:
    ws, response = accept_upgrade(parsed(upgrade_bytes(subprotocols=("chat", SUBPROTOCOL), key=KEY)))
    status, headers, rest = head_of(response)
    assert status == 101
    assert headers["sec-websocket-accept"] == accept_token(KEY) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert headers["sec-websocket-protocol"] == SUBPROTOCOL
    assert headers["upgrade"].lower() == "websocket"
    assert "sec-websocket-extensions" not in headers  # no compression: bytes pass as they are
    assert rest == b""
    assert ws.connection is not None


def test_a_query_string_is_ignored() -> None:
    _, response = accept_upgrade(parsed(upgrade_bytes(target=TUNNEL_PATH + "?v=1")))
    assert head_of(response)[0] == 101


@pytest.mark.parametrize(
    ("raw", "status", "why"),
    [
        (upgrade_bytes(target="/"), 404, f"use {TUNNEL_PATH}"),
        (upgrade_bytes(target="/.hn/tunnel/x"), 404, "no tunnel at /.hn/tunnel/x"),
        (upgrade_bytes(method="POST"), 405, "GET"),
        (upgrade_bytes(subprotocols=()), 400, "homenet.v1 only (offered: none)"),
        (upgrade_bytes(subprotocols=("chat", "homenet.v2")), 400, "offered: chat, homenet.v2"),
        (upgrade_bytes(version="8"), 426, "Sec-WebSocket-Version"),
        (upgrade_bytes(key=b"c2hvcnQ="), 400, "16-byte nonce"),
        (upgrade_bytes(key=b"not base64 at all!!!!!!="), 400, "16-byte nonce"),
        (upgrade_bytes(extra=("Content-Length: 5",)), 400, "no body"),
        (upgrade_bytes(extra=("Origin: https://evil.example",)), 403, "not web pages"),
        (upgrade_bytes().replace(b"Upgrade: websocket\r\n", b""), 400, "Upgrade: websocket"),
        (upgrade_bytes().replace(b"Connection: Upgrade\r\n", b""), 400, "Connection: Upgrade"),
        (upgrade_bytes().replace(b"HTTP/1.1", b"HTTP/1.0").replace(b"Host: 127.0.0.1\r\n", b""), 400, "HTTP/1.1"),
    ],
)
def test_anything_else_is_refused_with_one_http_error(raw: bytes, status: int, why: str) -> None:
    with pytest.raises(wstunnel._Refusal) as info:
        accept_upgrade(parsed(raw))
    refusal = info.value
    assert refusal.status == status
    assert why in refusal.reason, refusal.reason
    response = refusal_response(refusal.status, refusal.reason, refusal.headers)
    code, headers, body = head_of(response)
    assert code == status
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    assert body.count(b"\n") == 1
    assert body.endswith(b"\n")
    assert body.startswith(f"{status} ".encode())
    if status == 426:
        assert headers["sec-websocket-version"] == "13"
    if status == 405:
        assert headers["allow"] == "GET"


def test_a_refusal_is_valid_http() -> None:
    """An HTTP client (h11) reads the refusal as one response with its whole body."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    client.receive_data(refusal_response(400, "bad \x00 reason \u00e9"))
    response, data, end = client.next_event(), client.next_event(), client.next_event()
    assert isinstance(response, h11.Response)
    assert response.status_code == 400
    assert isinstance(data, h11.Data)
    assert data.data == b"400 Bad Request: bad ? reason ?\n"
    assert isinstance(end, h11.EndOfMessage)


# -- a real server -------------------------------------------------------------------------------
@dataclass
class TunnelServer:
    """Loopback TCP: each connection's HTTP head is parsed with h11 and handed to
    :func:`serve_tunnel`; each tunnel's inner end is spliced to ``target`` (as the node
    serves an accepted connection)."""

    target: tuple[str, int]
    options: dict[str, Any] = field(default_factory=dict)
    tls: ssl.SSLContext | None = None
    port: int = 0
    #: serve_tunnel calls that returned.
    ended: int = 0
    inner: int = 0
    splices: Splices = field(default_factory=Splices)
    _lsock: socket.socket | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> TunnelServer:
        lsock = socket.create_server(("127.0.0.1", 0))
        lsock.setblocking(False)
        self._lsock, self.port = lsock, lsock.getsockname()[1]
        self._spawn(self._accept_loop(lsock))
        return self

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_loop(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, addr = await loop.sock_accept(lsock)
            sock.setblocking(False)
            self._spawn(self._handle(sock, f"{addr[0]}:{addr[1]}"))

    async def _handle(self, sock: socket.socket, peer: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self.tls is not None:
                sock, _ = await accept_tls(sock, self.tls, TIMEOUT)
            conn = h11.Connection(h11.SERVER)
            async with asyncio.timeout(TIMEOUT):
                while (event := conn.next_event()) is h11.NEED_DATA:
                    conn.receive_data(await loop.sock_recv(sock, 65536))
            assert isinstance(event, h11.Request)
        except (OSError, TimeoutError, TLSError, h11.ProtocolError):
            sock.close()
            return
        try:
            await serve_tunnel(sock, peer, event, bytes(conn.trailing_data[0]), self._serve_inner, **self.options)
        finally:
            self.ended += 1
            self._changed.set()

    def _serve_inner(self, inner: socket.socket, peer: str) -> None:
        assert inner.gettimeout() == 0.0, "the inner end must be non-blocking, like an accepted socket"
        self.inner += 1
        self._spawn(self._splice(inner))

    async def _splice(self, inner: socket.socket) -> None:
        try:
            target = await connect(ipaddress.ip_address(self.target[0]), self.target[1], TIMEOUT)
        except OSError:
            inner.close()
            return
        with contextlib.suppress(OSError):
            await self.splices.start(inner, target)

    async def wait_ended(self, n: int, timeout: float = TIMEOUT) -> None:
        """Until ``n`` tunnels have ended on the server."""
        async with asyncio.timeout(timeout):
            while self.ended < n:
                self._changed.clear()
                await self._changed.wait()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._lsock is not None:
            self._lsock.close()
        self.splices.abort_all("test over")
        self.splices.pool.close()


@contextlib.asynccontextmanager
async def tunnel_server(
    target: tuple[str, int], tls: ssl.SSLContext | None = None, **options: Any
) -> AsyncIterator[TunnelServer]:
    srv = await TunnelServer(target, options, tls).start()
    try:
        yield srv
    finally:
        await srv.close()


@contextlib.asynccontextmanager
async def echo_tunnel(**options: Any) -> AsyncIterator[tuple[TunnelServer, EchoServer]]:
    async with echo_server() as echo, tunnel_server((echo.host, echo.port), **options) as srv:
        yield srv, echo


@contextlib.asynccontextmanager
async def target_server(
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[int]:
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


async def streams(sock: socket.socket) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(sock=sock, limit=MiB)


async def tunnel_to(srv: TunnelServer, **kw: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = await open_tunnel("127.0.0.1", srv.port, tls=None, server_hostname=None, timeout=TIMEOUT, **kw)
    return await streams(sock)


async def read_all(reader: asyncio.StreamReader, timeout: float = TIMEOUT) -> bytes:
    async with asyncio.timeout(timeout):
        return await reader.read(-1)


async def no_live_tunnels() -> None:
    """Client tunnels end once their pumps have closed both sides."""
    async with asyncio.timeout(TIMEOUT):
        while wstunnel.live_tunnels():
            await asyncio.sleep(0.01)


@pytest.fixture(autouse=True)
async def every_tunnel_ends() -> AsyncIterator[None]:
    """No test leaves a client tunnel pumping behind it."""
    yield
    await no_live_tunnels()


def rss() -> int:
    """Resident bytes of this process now (Linux)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def block(i: int) -> bytes:
    """The i-th 64 KiB block of a stream: numbered, so a lost or reordered block shows."""
    return i.to_bytes(8, "big") + hashlib.sha256(i.to_bytes(8, "big")).digest() * 2047 + bytes(24)


# -- bytes both ways -----------------------------------------------------------------------------
async def test_64_mib_both_ways_byte_exact_in_bounded_memory() -> None:
    total = 64 * MiB
    async with echo_tunnel() as (srv, echo):
        reader, writer = await tunnel_to(srv)
        sent, got = hashlib.sha256(), hashlib.sha256()
        base = rss()
        peak = base

        async def send() -> None:
            for i in range(total // len(block(0))):
                data = block(i)
                sent.update(data)
                writer.write(data)
                await writer.drain()
            writer.write_eof()

        async def sample() -> None:
            nonlocal peak
            while True:
                peak = max(peak, rss())
                await asyncio.sleep(0.02)

        sampler = asyncio.create_task(sample())
        sender = asyncio.create_task(send())
        n = 0
        try:
            async with asyncio.timeout(120):
                while chunk := await reader.read(1 << 18):
                    got.update(chunk)
                    n += len(chunk)
                await sender
        finally:
            sampler.cancel()
            sender.cancel()
        assert n == total
        assert got.hexdigest() == sent.hexdigest()
        writer.close()
        await srv.wait_ended(1)
        await no_live_tunnels()
        assert echo.connections == 1
    # every buffer on the way is bounded: 64 MiB in flight both ways never sit in memory
    assert peak - base < 24 * MiB, f"RSS grew by {(peak - base) / MiB:.1f} MiB"


async def test_backpressure_reaches_the_client() -> None:
    """A target that reads nothing: the client can push only what the bounded buffers (and
    the kernel's) hold, then its socket stays full; all of it arrives once the target reads."""
    release = asyncio.Event()
    digest = hashlib.sha256()
    done = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        while chunk := await reader.read(1 << 16):
            digest.update(chunk)
        done.set()
        writer.close()

    async with target_server(slow) as port, tunnel_server(("127.0.0.1", port)) as srv:
        sock = await open_tunnel("127.0.0.1", srv.port, tls=None, server_hostname=None, timeout=TIMEOUT)
        sent = hashlib.sha256()
        pushed = 0
        i = 0
        pending = memoryview(b"")
        with sock:
            while True:  # until the socket stays full for half a second
                if not pending:
                    data = block(i)
                    sent.update(data)
                    pending, i = memoryview(data), i + 1
                try:
                    n = sock.send(pending)
                except BlockingIOError:
                    n = 0
                pushed += n
                pending = pending[n:]
                assert pushed < 48 * MiB, "the tunnel took everything: no backpressure"
                if pending:
                    try:
                        async with asyncio.timeout(0.5):
                            await wait_writable(sock)
                    except TimeoutError:
                        break
            release.set()
            async with asyncio.timeout(TIMEOUT):
                await asyncio.get_running_loop().sock_sendall(sock, pending)
            sock.shutdown(socket.SHUT_WR)
            async with asyncio.timeout(TIMEOUT):
                await done.wait()
        assert digest.hexdigest() == sent.hexdigest()


async def test_half_close_reaches_the_target_and_the_answer_comes_back() -> None:
    async def hasher(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(-1)  # until the client's EOF
        writer.write(f"{len(data)} {hashlib.sha256(data).hexdigest()}\n".encode())
        await writer.drain()
        writer.close()

    payload = os.urandom(300_000)
    async with target_server(hasher) as port, tunnel_server(("127.0.0.1", port)) as srv:
        reader, writer = await tunnel_to(srv)
        writer.write(payload)
        writer.write_eof()
        answer = await read_all(reader)
        assert answer == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}\n".encode()
        writer.close()
        await srv.wait_ended(1)
    await no_live_tunnels()


async def test_the_target_closing_first_ends_the_tunnel_cleanly() -> None:
    blob = os.urandom(200_000)

    async def sender(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(blob)
        await writer.drain()
        writer.close()

    async with target_server(sender) as port, tunnel_server(("127.0.0.1", port)) as srv:
        reader, writer = await tunnel_to(srv)
        assert await read_all(reader) == blob
        # our side is still open: we may still send (the target has gone, so nothing reads it)
        writer.write(b"late")
        writer.write_eof()
        await srv.wait_ended(1)
        writer.close()
    await no_live_tunnels()


async def test_the_client_closing_ends_the_tunnel_on_the_server() -> None:
    async with echo_tunnel() as (srv, _echo):
        reader, writer = await tunnel_to(srv)
        writer.write(b"ping")
        async with asyncio.timeout(TIMEOUT):
            assert await reader.readexactly(4) == b"ping"
        writer.close()  # no half-close first: the whole connection goes
        await srv.wait_ended(1)
    await no_live_tunnels()


async def test_client_tunnel_close_cuts_it() -> None:
    async with echo_tunnel() as (srv, _echo):
        sock = socket.create_connection(("127.0.0.1", srv.port))
        sock.setblocking(False)
        opened = await start_tunnel(sock, host=f"127.0.0.1:{srv.port}", tls=None, server_hostname="x", timeout=TIMEOUT)
        reader, writer = await streams(opened.sock)
        writer.write(b"x")
        async with asyncio.timeout(TIMEOUT):
            assert await reader.readexactly(1) == b"x"
        opened.close()
        await srv.wait_ended(1)
        with contextlib.suppress(ConnectionError):
            assert await read_all(reader) == b""
        writer.close()
    await no_live_tunnels()


async def test_frames_sent_with_the_request_are_not_lost() -> None:
    """A client may pipeline its first bytes after the request: they reach the target."""
    async with echo_tunnel() as (srv, _echo):
        raw = await raw_upgrade(srv.port, after=frame(BINARY, b"early bytes") + frame(BINARY, b""))
        data, closing = await raw.until_close()
        assert data == b"early bytes"
        assert close_code(closing) == 1000  # both directions done: a clean close
        await raw.send(frame(CLOSE, closing.payload if closing else b""))
        assert await raw.eof()
        raw.close()
        await srv.wait_ended(1)


async def test_ping_is_answered_and_empty_message_is_a_half_close() -> None:
    async with echo_tunnel() as (srv, _echo):
        raw = await raw_upgrade(srv.port)
        await raw.send(frame(PING, b"are you there"))
        pong = await raw.next_frame()
        assert pong is not None
        assert (pong.opcode, pong.payload) == (PONG, b"are you there")
        # fragments of one message, then the end of our direction
        await raw.send(frame(BINARY, b"abc", fin=False) + frame(0, b"def") + frame(BINARY, b""))
        data, closing = await raw.until_close()
        assert data == b"abcdef"
        assert close_code(closing) == 1000
        raw.close()


# -- malformed input closes one tunnel, never the server -----------------------------------------
@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (b"\xff\xff\xff\xff\xff\xff\xff\xff", 1002),  # reserved opcode
        (frame(BINARY, b"x", mask=False), 1002),  # a client's frame must be masked
        (frame(BINARY, b"x", rsv=4), 1002),  # no extension was agreed
        (frame(TEXT, b"hello"), 1003),  # homenet.v1 is binary only
        (frame(BINARY, os.urandom(8192)), 1009),  # over max_message
        (frame(BINARY, b"a", fin=False) + frame(BINARY, b"b"), 1002),  # a new message inside one
        (frame(BINARY, b"") + frame(BINARY, b"after the end"), 1002),  # data after our EOF
    ],
    ids=["reserved-opcode", "unmasked", "rsv-bit", "text", "too-big", "interleaved", "after-eof"],
)
async def test_a_bad_frame_closes_that_tunnel_only(bad: bytes, code: int) -> None:
    async with echo_tunnel(max_message=4096) as (srv, echo):
        good = await raw_upgrade(srv.port)
        raw = await raw_upgrade(srv.port)
        await raw.send(bad)
        _, closing = await raw.until_close()
        assert close_code(closing) == code
        assert await raw.eof()
        raw.close()
        await srv.wait_ended(1)
        # the other tunnel still works
        await good.send(frame(BINARY, b"still here"))
        echoed = await good.next_frame()
        assert echoed is not None
        assert echoed.payload == b"still here"
        good.close()
        assert echo.connections == 2


async def test_the_close_frame_survives_a_client_that_keeps_sending() -> None:
    """After a bad frame the server half-closes and drops what still comes, so its Close is
    not destroyed by a reset (closing with unread input would send one)."""
    async with echo_tunnel() as (srv, _echo):
        raw = await raw_upgrade(srv.port)
        await raw.send(b"\xff" * 16)
        flood = asyncio.create_task(raw.send(os.urandom(4 * MiB)))
        try:
            _, closing = await raw.until_close()
        finally:
            flood.cancel()
            await asyncio.gather(flood, return_exceptions=True)
        assert close_code(closing) == 1002
        raw.close()
        await srv.wait_ended(1)


# -- refusals ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (upgrade_bytes(subprotocols=("chat",)), 400),
        (upgrade_bytes(target="/elsewhere"), 404),
        (upgrade_bytes(version="7"), 426),
    ],
)
async def test_a_refused_upgrade_gets_one_http_error_and_reaches_no_target(raw: bytes, status: int) -> None:
    async with echo_tunnel() as (srv, echo):
        answer = await raw_exchange(srv.port, raw + b"junk after the head")
        code, _, body = head_of(answer)
        assert code == status
        assert body.count(b"\n") == 1, body
        await srv.wait_ended(1)
        assert srv.inner == 0
        assert echo.connections == 0


async def test_the_client_reports_a_refusal_in_one_line() -> None:
    async def refuser(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(refusal_response(403, "tunnels are off here"))
        writer.close()

    async with target_server(refuser) as port:
        with pytest.raises(TunnelError, match=r"^WebSocket upgrade refused: HTTP 403 Forbidden: tunnels are off here$"):
            await open_tunnel("127.0.0.1", port, tls=None, server_hostname=None, timeout=TIMEOUT)


async def test_the_client_names_a_node_without_tunnels() -> None:
    async def old_node(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n")
        writer.write(b"HN/1 400 bad-request not a HomeNet client (expected HN/1 or gRPC)\n")
        writer.close()

    async with target_server(old_node) as port:
        with pytest.raises(TunnelError, match="does not accept WebSocket tunnels"):
            await open_tunnel("127.0.0.1", port, tls=None, server_hostname=None, timeout=TIMEOUT)


async def test_the_client_refuses_a_101_without_the_subprotocol() -> None:
    async def sloppy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        key = next(
            line.split(b":", 1)[1].strip()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key")
        )
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_token(key).encode() + b"\r\n\r\n"
        )
        with contextlib.suppress(OSError):
            await reader.read(-1)
        writer.close()

    async with target_server(sloppy) as port:
        with pytest.raises(TunnelError, match=r"without the homenet\.v1 subprotocol"):
            await open_tunnel("127.0.0.1", port, tls=None, server_hostname=None, timeout=TIMEOUT)


# -- timeouts ------------------------------------------------------------------------------------
async def test_a_silent_node_times_out_the_handshake() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            await reader.read(-1)
        writer.close()

    loop = asyncio.get_running_loop()
    async with target_server(silent) as port:
        start = loop.time()
        with pytest.raises(TunnelError, match=r"no WebSocket handshake within 0.3s"):
            await open_tunnel("127.0.0.1", port, tls=None, server_hostname=None, timeout=0.3)
        assert loop.time() - start < 3.0


async def test_a_closed_port_says_connection_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        with pytest.raises(TunnelError, match=f"cannot reach node 127.0.0.1:{port}: connection refused"):
            await open_tunnel("127.0.0.1", port, tls=None, server_hostname=None, timeout=TIMEOUT)


async def test_an_idle_tunnel_is_closed() -> None:
    async with echo_tunnel(idle_timeout=0.3) as (srv, _echo):
        raw = await raw_upgrade(srv.port)
        await raw.send(frame(BINARY, b"one"))
        first = await raw.next_frame()
        assert first is not None
        assert first.payload == b"one"
        _, closing = await raw.until_close(timeout=5.0)  # then nothing: idle
        assert close_code(closing) == 1001
        assert closing is not None
        assert b"idle for 0.3s" in closing.payload
        await raw.send(frame(CLOSE, closing.payload[:2]))  # our answer ends the close handshake
        assert await raw.eof()
        raw.close()
        await srv.wait_ended(1)


# -- wss -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("wscerts"))


async def test_wss_carries_the_bytes_and_verifies_the_node(certs: Certs) -> None:
    async with echo_server() as echo, tunnel_server((echo.host, echo.port), tls=certs.server()) as srv:
        sock = await open_tunnel("127.0.0.1", srv.port, tls=certs.client(), server_hostname=None, timeout=TIMEOUT)
        reader, writer = await streams(sock)
        payload = os.urandom(3 * MiB)
        writer.write(payload)
        async with asyncio.timeout(TIMEOUT):
            assert await reader.readexactly(len(payload)) == payload
        writer.write_eof()  # a half-close crosses TLS too: it is a message in the tunnel
        assert await read_all(reader) == b""
        writer.close()
        await srv.wait_ended(1)

        with pytest.raises(TLSError, match=r"cannot verify 127\.0\.0\.1"):
            await open_tunnel(
                "127.0.0.1", srv.port, tls=certs.client(certs.other_ca), server_hostname=None, timeout=TIMEOUT
            )
    await no_live_tunnels()
