"""HTTP gateway test support: real HTTP and WebSocket targets, an HTTP/1.1 client, processes.

The targets are asyncio servers on 127.0.0.1 written with h11 and wsproto (not the product's
code): an HTTP/1.1 echo server that reports what it received in an ``x-echo`` header (JSON:
method, path, headers, body length and hash, which TCP connection) and sends the request body
back, and a WebSocket echo server. The client speaks h11 over a plain asyncio connection so a
test controls every byte (keep-alive, pipelining, chunked bodies, raw garbage).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import ssl
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)

from tests.helpers import EchoServer, NodeProc, pattern, proc_env, spawn

#: Upper bound of any single wait (the nodes answer in milliseconds).
TIMEOUT = 10.0
#: ``GET /blob/N`` answers N bytes of :func:`tests.helpers.pattern` (chunked).
BLOB = "/blob/"
_READ = 1 << 18


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the HTTP target ----------------------------------------------------------------------------------
@dataclass
class HttpEcho(EchoServer):
    """An HTTP/1.1 echo server (h11 + asyncio) on 127.0.0.1 with keep-alive and chunked bodies.

    Every response carries ``x-echo`` (JSON of what the request was) and the request body
    as its body; ``GET /blob/N`` answers N pattern bytes with chunked encoding instead.
    ``connections`` counts the TCP connections accepted (``x-echo``'s ``conn`` numbers them
    from 1).
    """

    #: TCP connections open now.
    open: int = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        conn_id = self.connections
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = await _next(conn, reader)
                if not isinstance(event, h11.Request):
                    break
                body = bytearray()
                while isinstance(part := await _next(conn, reader), h11.Data):
                    body += part.data
                if not isinstance(part, h11.EndOfMessage):
                    break
                await self._respond(conn, writer, event, bytes(body), conn_id)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except (h11.ProtocolError, ConnectionError, OSError, TimeoutError):
            pass
        finally:
            self.open -= 1
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _respond(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, req: h11.Request, body: bytes, conn_id: int
    ) -> None:
        meta = {
            "method": req.method.decode(),
            "path": req.target.decode("latin-1"),
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in req.headers],
            "length": len(body),
            "sha256": sha(body),
            "conn": conn_id,
        }
        # a hop-by-hop header the gateway must not pass back to the client
        headers = [(b"x-echo", json.dumps(meta).encode()), (b"keep-alive", b"timeout=30")]
        path = req.target.decode("latin-1")
        if req.method == b"GET" and path.startswith(BLOB):
            blob = pattern(int(path[len(BLOB) :]))
            writer.write(
                conn.send(h11.Response(status_code=200, headers=[*headers, (b"transfer-encoding", b"chunked")]))
            )
            for i in range(0, len(blob), 1 << 16):
                writer.write(conn.send(h11.Data(data=blob[i : i + (1 << 16)])))
                await writer.drain()
        else:
            length = (b"content-length", str(len(body)).encode())
            writer.write(conn.send(h11.Response(status_code=200, headers=[*headers, length])))
            writer.write(conn.send(h11.Data(data=body)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()


async def _next(conn: h11.Connection, reader: asyncio.StreamReader) -> object:
    while (event := conn.next_event()) is h11.NEED_DATA:
        async with asyncio.timeout(60.0):
            conn.receive_data(await reader.read(_READ))
    return event


@contextlib.asynccontextmanager
async def http_echo() -> AsyncIterator[HttpEcho]:
    srv = await HttpEcho().start()
    try:
        yield srv
    finally:
        await srv.close()


async def settles(what: str, check: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """Poll ``check()`` (another process's effect, e.g. a close reaching a target) until true."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not check():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


# -- the WebSocket target -----------------------------------------------------------------------------
@dataclass
class WsEcho(EchoServer):
    """A WebSocket echo server (wsproto + asyncio): each message comes back as it was sent."""

    #: The handshake requests it accepted: (target, headers).
    handshakes: list[tuple[str, list[tuple[str, str]]]] = field(default_factory=list)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        text: list[str] = []
        binary = bytearray()
        try:
            while data := await reader.read(_READ):
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, Request):
                        heads = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.extra_headers]
                        self.handshakes.append((event.target, heads))
                        writer.write(ws.send(AcceptConnection()))
                    elif isinstance(event, TextMessage):
                        text.append(event.data)
                        if event.message_finished:
                            writer.write(ws.send(TextMessage(data="".join(text))))
                            text.clear()
                    elif isinstance(event, BytesMessage):
                        binary += event.data
                        if event.message_finished:
                            writer.write(ws.send(BytesMessage(data=bytes(binary))))
                            binary.clear()
                    elif isinstance(event, Ping):
                        writer.write(ws.send(event.response()))
                    elif isinstance(event, CloseConnection):
                        writer.write(ws.send(event.response()))
                        await writer.drain()
                        return
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()


@contextlib.asynccontextmanager
async def ws_echo() -> AsyncIterator[WsEcho]:
    srv = await WsEcho().start()
    try:
        yield srv
    finally:
        await srv.close()


@dataclass
class WsClient:
    """A wsproto client over a raw asyncio connection."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    ws: WSConnection
    #: The handshake's answer (AcceptConnection, or RejectConnection for a refusal).
    answer: AcceptConnection | RejectConnection

    @classmethod
    async def open(cls, port: int, host: str, target: str, headers: list[tuple[bytes, bytes]]) -> WsClient:
        async with asyncio.timeout(TIMEOUT):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        ws = WSConnection(ConnectionType.CLIENT)
        writer.write(ws.send(Request(host=host, target=target, extra_headers=headers)))
        client = cls(reader, writer, ws, AcceptConnection())
        first = await client._event()
        assert isinstance(first, (AcceptConnection, RejectConnection)), first
        client.answer = first
        return client

    async def _event(self) -> object:
        async with asyncio.timeout(TIMEOUT):
            while True:
                for event in self.ws.events():
                    return event
                data = await self.reader.read(_READ)
                self.ws.receive_data(data or None)

    async def echo(self, message: str | bytes) -> str | bytes:
        """Send one message; the message that comes back (fragments joined)."""
        out = TextMessage(data=message) if isinstance(message, str) else BytesMessage(data=message)
        self.writer.write(self.ws.send(out))
        parts: list[Any] = []
        while True:
            event = await self._event()
            assert isinstance(event, (TextMessage, BytesMessage)), event
            parts.append(event.data)
            if event.message_finished:
                return "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)

    async def close(self) -> CloseConnection:
        """The closing handshake: our close frame, the peer's answer; then the peer's EOF."""
        self.writer.write(self.ws.send(CloseConnection(code=1000, reason="bye")))
        event = await self._event()
        assert isinstance(event, CloseConnection), event
        async with asyncio.timeout(TIMEOUT):
            assert await self.reader.read() == b"", "bytes after the close handshake"
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()
        return event


# -- an HTTP/1.1 client ------------------------------------------------------------------------------
@dataclass
class Resp:
    """A response as read off the wire."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]

    @property
    def names(self) -> list[str]:
        return [k for k, _ in self.headers]

    @property
    def echo(self) -> dict[str, Any]:
        """What the echo target saw (its ``x-echo`` header)."""
        raw = self.header("x-echo")
        assert raw is not None, f"not an answer of the echo target: {self.status} {self.body[:300]!r}"
        seen: dict[str, Any] = json.loads(raw)
        return seen

    @property
    def seen_headers(self) -> list[tuple[str, str]]:
        return [(k, v) for k, v in self.echo["headers"]]


def _resp(event: h11.Response | h11.InformationalResponse, body: bytes) -> Resp:
    heads = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers]
    return Resp(event.status_code, event.reason.decode("latin-1"), heads, body)


Headers = list[tuple[str, str]]


def h11_request(method: str, target: str, headers: Headers) -> h11.Request:
    return h11.Request(method=method, target=target, headers=headers)


@dataclass
class Client:
    """One HTTP/1.1 client connection (h11 over asyncio), to 127.0.0.1 only."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    conn: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))

    @classmethod
    async def open(cls, port: int, tls: ssl.SSLContext | None = None, server_hostname: str | None = None) -> Client:
        async with asyncio.timeout(TIMEOUT):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=tls, server_hostname=server_hostname, limit=1 << 20
            )
        return cls(reader, writer)

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        async with asyncio.timeout(TIMEOUT):
            await self.writer.drain()

    async def request(self, method: str, target: str, headers: Headers, body: bytes | Iterable[bytes] = b"") -> Resp:
        """Send a request (``body`` bytes, or chunks: send with ``transfer-encoding: chunked``)
        and read its response."""
        await self.send_raw(self.conn.send(h11_request(method, target, headers)))
        for piece in [body] if isinstance(body, bytes) else body:
            if piece:
                await self.send_raw(self.conn.send(h11.Data(data=piece)))
        await self.send_raw(self.conn.send(h11.EndOfMessage()))
        return await self.response()

    async def response(self) -> Resp:
        """The next response (1xx skipped); the next cycle is started when both sides allow."""
        while True:
            event = await self._event()
            if isinstance(event, h11.InformationalResponse) and event.status_code != 101:
                continue
            assert isinstance(event, (h11.Response, h11.InformationalResponse)), event
            break
        if isinstance(event, h11.InformationalResponse):
            return _resp(event, b"")
        body = bytearray()
        while isinstance(part := await self._event(), h11.Data):
            body += part.data
        assert isinstance(part, h11.EndOfMessage), part
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return _resp(event, bytes(body))

    async def pipelined(self, requests: list[tuple[str, Headers]]) -> list[Resp]:
        """GET each of ``requests`` (target, headers) in ONE write; the responses, in order."""
        wire = b"".join(h11.Connection(h11.CLIENT).send(h11_request("GET", t, h)) or b"" for t, h in requests)
        await self.send_raw(wire)
        out = []
        for target, heads in requests:
            self.conn.send(h11_request("GET", target, heads))  # the bytes went in the one write
            self.conn.send(h11.EndOfMessage())
            out.append(await self.response())
        return out

    async def _event(self) -> object:
        while (event := self.conn.next_event()) is h11.NEED_DATA:
            async with asyncio.timeout(TIMEOUT):
                self.conn.receive_data(await self.reader.read(_READ))
        return event

    async def eof(self) -> bool:
        """True when the server closed the connection (within TIMEOUT) with nothing more to read."""
        async with asyncio.timeout(TIMEOUT):
            rest = bytes(self.conn.trailing_data[0]) + await self.reader.read()
        return rest == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError, ssl.SSLError):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def client(
    port: int, tls: ssl.SSLContext | None = None, server_hostname: str | None = None
) -> AsyncIterator[Client]:
    c = await Client.open(port, tls, server_hostname)
    try:
        yield c
    finally:
        await c.close()


async def exchange_raw(port: int, data: bytes, timeout: float = TIMEOUT) -> bytes:
    """Send ``data`` to 127.0.0.1:port, then read until the node closes."""
    c = await Client.open(port)
    try:
        with contextlib.suppress(ConnectionResetError):  # the node may answer before reading it all
            await c.send_raw(data)
        return await until_closed(c.reader, timeout)
    finally:
        await c.close()


async def until_closed(reader: asyncio.StreamReader, timeout: float = TIMEOUT) -> bytes:
    """Everything the node sends until it closes; fails (showing what came) if it does not
    close within ``timeout`` seconds."""
    got = bytearray()
    try:
        async with asyncio.timeout(timeout):
            while data := await reader.read(_READ):
                got += data
    except TimeoutError:
        raise AssertionError(f"the node did not close within {timeout:g}s; it sent {bytes(got[:400])!r}") from None
    except ConnectionResetError:  # a reset may destroy an answer in flight: never acceptable
        raise AssertionError(f"the node reset the connection; it sent {bytes(got[:400])!r}") from None
    return bytes(got)


def parse_response(raw: bytes) -> tuple[Resp, bytes]:
    """One whole response of ``raw`` (with h11, the target never sees these), and what followed."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11_request("GET", "/", [("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    conn.receive_data(b"")
    event = conn.next_event()
    assert isinstance(event, h11.Response), (event, raw[:300])
    body = bytearray()
    while isinstance(part := conn.next_event(), h11.Data):
        body += part.data
    assert isinstance(part, h11.EndOfMessage), (part, raw[:300])
    return _resp(event, bytes(body)), bytes(conn.trailing_data[0])


# -- processes ---------------------------------------------------------------------------------------
@dataclass
class Procs:
    """Real ``homenet`` processes of one test. Each has a tier (0: a relay, 1: a node that
    listens on it, 2: one that listens on that node...); they are stopped deepest tier first,
    a tier at a time (a relay's drain would otherwise wait on its listeners' live streams)."""

    tmp: Path
    procs: list[tuple[int, NodeProc]] = field(default_factory=list)

    async def start(
        self,
        args: list[str],
        ready: str = "READY ",
        *,
        tier: int = 0,
        secure: bool = False,
        env: dict[str, str] | None = None,
    ) -> NodeProc:
        full = {**proc_env(self.tmp, secure), **(env or {})}
        proc = await spawn(args, self.tmp, ready, secure, full)
        self.procs.append((tier, proc))
        return proc

    async def stop_all(self) -> None:
        for tier in sorted({t for t, _ in self.procs}, reverse=True):
            await asyncio.gather(*(p.stop() for t, p in self.procs if t == tier))
