"""The TLS bridge on real loopback sockets: what a client's close and half-close do."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from homenet.node.tls import accept_tls, client_context, connect_tls, server_context
from tests.integration.fleet_support import tls_files


class Server:
    """A TLS server that records what its plain side reads until the end."""

    def __init__(self) -> None:
        self.received = b""
        self.ended = asyncio.Event()
        self.port = 0


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[Server, Path]]:
    ca, cert, key = tls_files(tmp_path, "localhost", ["127.0.0.1"])
    ctx = server_context(str(cert), str(key))
    srv = Server()
    loop = asyncio.get_running_loop()

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket").dup()
        writer.transport.pause_reading()  # type: ignore[attr-defined]  # the TLS layer reads the dup
        inner, _ = await accept_tls(sock, ctx, 5.0)
        try:
            while data := await loop.sock_recv(inner, 65536):
                srv.received += data
                if srv.received.endswith(b"?"):  # a question: answered at once
                    await loop.sock_sendall(inner, b"an answer")
        finally:
            inner.close()
            srv.ended.set()
            writer.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    srv.port = server.sockets[0].getsockname()[1]
    try:
        yield srv, ca
    finally:
        server.close()
        await server.wait_closed()


async def _client(port: int, ca: Path) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5.0)
    sock.setblocking(False)
    return await connect_tls(sock, client_context(str(ca)), "127.0.0.1", 5.0)


async def test_a_client_that_closes_its_socket_ends_the_tls_connection(server: tuple[Server, Path]) -> None:
    srv, ca = server
    inner = await _client(srv.port, ca)
    await asyncio.get_running_loop().sock_sendall(inner, b"bye")
    inner.close()  # no shutdown first: the program is done with the route
    async with asyncio.timeout(5.0):
        await srv.ended.wait()
    assert srv.received == b"bye"


async def test_a_half_closed_client_still_gets_the_reply(server: tuple[Server, Path]) -> None:
    srv, ca = server
    inner = await _client(srv.port, ca)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_sendall(inner, b"question?")
        inner.shutdown(socket.SHUT_WR)  # TLS cannot pass a half-close on: it must stay open for the answer
        async with asyncio.timeout(5.0):
            got = await loop.sock_recv(inner, 65536)
        assert got == b"an answer"
        assert not srv.ended.is_set()
    finally:
        inner.close()
    async with asyncio.timeout(5.0):  # and the full close then ends it
        await srv.ended.wait()
